"""A department lead's tool: register the hospital and a department's supporters, refer a
physician, wait for the assignment, record the outreach.

    export POST_HOSPITAL=st-marys POST_NKEY_SEED=st-marys.nk POST_NATS_URL=nats://127.0.0.1:4222
    python lead_tool.py setup --department emergency-medicine --supporter s-1 --supporter s-2
    python lead_tool.py refer --referral r-1 --physician p-1 --department emergency-medicine
    python lead_tool.py outreach --referral r-1 --supporter s-1 --outcome accepted

Every command's id is derived from what it is (`idempotent_id`): running a step again after a
crash or a lost answer sends the same command, which the platform processes once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, date, datetime

from post_client import (
    CommandRefused,
    Hospital,
    LaunchDepartment,
    NoSupporterAvailable,
    Rank,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SupporterAssigned,
    connect,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospital", default=os.environ.get("POST_HOSPITAL"))
    p.add_argument("--seed", default=os.environ.get("POST_NKEY_SEED"), help="NKey seed file")
    p.add_argument("--servers", default=os.environ.get("POST_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--timeout", type=float, default=60.0)
    sub = p.add_subparsers(dest="step", required=True)

    setup = sub.add_parser("setup", help="register the hospital, a department, its supporters")
    setup.add_argument("--name", default="Our hospital")
    setup.add_argument("--physicians", type=int, default=100)
    setup.add_argument("--department", required=True)
    setup.add_argument("--department-physicians", type=int, default=30)
    setup.add_argument("--supporter", action="append", default=[], help="a supporter id")
    setup.add_argument("--rank", default="senior", choices=[r.value for r in Rank])
    setup.add_argument("--on", type=date.fromisoformat, default=date.today())

    refer = sub.add_parser("refer", help="refer a physician and wait for the assignment")
    refer.add_argument("--referral", required=True)
    refer.add_argument("--physician", required=True)
    refer.add_argument("--department", required=True)
    refer.add_argument("--rank", default="attending", choices=[r.value for r in Rank])
    refer.add_argument("--source", default="third_party", choices=["self", "third_party"])
    refer.add_argument("--nature", default="other", choices=["interventional", "other"])
    refer.add_argument("--assign-to", default=None, help="a supporter (a lead's manual match)")

    outreach = sub.add_parser("outreach", help="record the supporter's outreach")
    outreach.add_argument("--referral", required=True)
    outreach.add_argument("--supporter", required=True)
    outreach.add_argument(
        "--outcome", required=True, choices=["accepted", "declined", "unreachable"]
    )
    outreach.add_argument(
        "--decline-reason",
        choices=["no_time", "no_need", "privacy", "discomfort", "medicolegal", "other"],
    )
    return p


async def setup(hospital: Hospital, args: argparse.Namespace) -> None:
    h = hospital.idempotent_id
    await (
        await hospital.send(
            RegisterHospital(name=args.name, physician_count=args.physicians),
            id=h("RegisterHospital"),
        )
    )
    print(f"hospital {hospital.id} registered")
    await (
        await hospital.send(
            LaunchDepartment(
                department=args.department,
                physician_count=args.department_physicians,
                launched_on=args.on,
            ),
            id=h("LaunchDepartment", args.department),
        )
    )
    print(f"department {args.department} launched")
    for supporter in args.supporter:
        await (
            await hospital.send(
                RegisterSupporter(
                    supporter_id=supporter,
                    department=args.department,
                    rank=Rank(args.rank),
                    interventional=True,
                    trained_on=args.on,
                ),
                id=h("RegisterSupporter", supporter),
            )
        )
        print(f"supporter {supporter} trained")


async def refer(hospital: Hospital, args: argparse.Namespace) -> None:
    sent = await hospital.send(
        RequestReferral(
            referral_id=args.referral,
            physician_id=args.physician,
            department=args.department,
            rank=Rank(args.rank),
            source=args.source,
            event_nature=args.nature,
            requested_at=datetime.now(UTC),
            assign_to=args.assign_to,
        ),
        id=hospital.idempotent_id("RequestReferral", args.referral),
    )
    await sent.answer(timeout=args.timeout)
    print(f"referral {args.referral} created")
    outcome = await sent.followed_by(SupporterAssigned, NoSupporterAvailable, timeout=args.timeout)
    if isinstance(outcome, SupporterAssigned):
        print(
            f"assigned: referral {outcome.referral_id} to supporter {outcome.supporter_id}"
            f" ({outcome.reason}), due {outcome.due_at.isoformat()}"
        )
    elif isinstance(outcome, NoSupporterAvailable):
        print(f"no supporter available for {outcome.referral_id}: {outcome.reason}")


async def outreach(hospital: Hospital, args: argparse.Namespace) -> None:
    answer = await (
        await hospital.send(
            RecordOutreach(
                referral_id=args.referral,
                supporter_id=args.supporter,
                outcome=args.outcome,
                at=datetime.now(UTC),
                decline_reason=args.decline_reason,
            ),
            id=hospital.idempotent_id("RecordOutreach", args.referral, args.supporter),
        )
    )
    print(f"outreach recorded: {answer.type_name}")


async def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.hospital:
        print("--hospital (or POST_HOSPITAL) is required", file=sys.stderr)
        return 2
    hospital = await connect(args.hospital, args.servers, nkeys_seed=args.seed)
    try:
        await {"setup": setup, "refer": refer, "outreach": outreach}[args.step](hospital, args)
    except CommandRefused as refused:
        print(f"refused: {refused.reason_code}: {refused.detail}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        # A step run again is the same command (same id): the platform does not answer twice.
        print(f"no answer: {exc}", file=sys.stderr)
        return 3
    finally:
        await hospital.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
