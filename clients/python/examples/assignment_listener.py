"""Tell supporters of their assignments (here: print), from the hospital's durable consumer.

    export POST_HOSPITAL=st-marys POST_NKEY_SEED=st-marys.nk POST_NATS_URL=nats://127.0.0.1:4222
    python assignment_listener.py --state told.txt

Restart-safe: it reads the durable consumer `hospital-<hospital>`, so an assignment made while
it was stopped is told when it starts again; an event is acknowledged only after the supporter
was told and the event's id written to the state file, so a kill at any moment loses nothing.
Delivery is at least once: an event told but not yet acknowledged when the process died comes
again, and the state file (the CloudEvents ids already told) keeps it from being told twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from post_client import AssignmentOverdue, Envelope, Hospital, SupporterAssigned


class Told:
    """The CloudEvents ids already acted on, one a line, fsynced before the ack."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids = set(path.read_text().split()) if path.exists() else set()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self.ids

    def add(self, event_id: str) -> None:
        with self.path.open("a") as f:
            f.write(event_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.ids.add(event_id)


def tell(line: str) -> None:
    # Your paging, e-mail or secure-messaging system goes here; the platform never has names.
    print(line, flush=True)


def build(args: argparse.Namespace) -> Hospital:
    hospital = Hospital(args.hospital, args.servers, nkeys_seed=args.seed)
    told = Told(Path(args.state))

    @hospital.durable(SupporterAssigned)
    async def assigned(event: SupporterAssigned, envelope: Envelope) -> None:
        if envelope.id in told:
            return  # a redelivery of one already told
        tell(
            f"supporter {event.supporter_id}: please reach out on referral {event.referral_id}"
            f" ({event.department}) by {event.due_at.isoformat()}"
        )
        told.add(envelope.id)

    @hospital.durable(AssignmentOverdue)
    async def overdue(event: AssignmentOverdue, envelope: Envelope) -> None:
        if envelope.id in told:
            return
        tell(f"supporter {event.supporter_id}: referral {event.referral_id} is overdue")
        told.add(envelope.id)

    return hospital


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospital", default=os.environ.get("POST_HOSPITAL"))
    p.add_argument("--seed", default=os.environ.get("POST_NKEY_SEED"), help="NKey seed file")
    p.add_argument("--servers", default=os.environ.get("POST_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--state", default="told.txt", help="file of the event ids already told")
    args = p.parse_args(argv)
    if not args.hospital:
        print("--hospital (or POST_HOSPITAL) is required", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with build(args):
        print(f"listening on hospital-{args.hospital}", file=sys.stderr, flush=True)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
