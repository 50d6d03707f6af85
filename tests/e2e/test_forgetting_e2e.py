"""Forgetting a physician end to end (CONTRACT.md 1.1, "Forgetting a physician").

A hospital's history names one physician as the one referred (outreach, interactions, a
decline, a safety event, a repeated request) and as the referrer of a colleague. Then it asks
the platform to forget them: the answer carries a new `forget_id` and not the id; within the
minute the id is found nowhere, byte by byte: not in the `POST` stream read from its first
message, not in any row of any table of any schema (the event stores included), not in any
log. Every RE-AIM answer is the same before and after, and again after a rebuild; the same id
referred again afterwards is a new physician.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.client import PlatformClient
from shared.contracts import (
    ForgetPhysician,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
)
from shared.runtime import Platform
from shared.settings import Settings
from tests.badinput.test_bad_input import settled
from tests.conftest import region_token_for
from tests.scan import (
    forget_jobs_left,
    log_files,
    rows_containing,
    statistics_containing,
    stream_messages,
)

pytestmark = pytest.mark.e2e

DEPARTMENT = "anesthesia"
OTHER = "surgery"
PERIODS: list[dict[str, str]] = [
    {},
    {"from": "2025-01-01"},
    {"to": "2025-03-01"},
    {"from": "2025-02-01", "to": "2025-06-01"},
]


async def expect(client: PlatformClient, hospital: str, command: Any, type_: str) -> Any:
    answer = await client.send_and_wait(hospital, command, timeout=30)
    assert answer["type"] == type_, answer["data"]
    return answer


def at(day: date, hour: int = 9) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


async def refer(
    client: PlatformClient,
    hospital: str,
    referral_id: str,
    physician_id: str,
    day: date,
    **more: Any,
) -> str:
    """A referral and the supporter it was assigned to."""
    fields: dict[str, Any] = {
        "department": DEPARTMENT,
        "rank": Rank.resident,
        "source": "self",
        "event_nature": "other",
        "requested_at": at(day),
    } | more
    command = RequestReferral(referral_id=referral_id, physician_id=physician_id, **fields)
    await expect(client, hospital, command, "ReferralCreated")
    assigned = await client.wait_for(
        hospital, "SupporterAssigned", lambda e: e["data"]["referral_id"] == referral_id
    )
    return str(assigned["data"]["supporter_id"])


async def supported(
    client: PlatformClient, hospital: str, referral_id: str, supporter: str, day: date
) -> None:
    outreach = RecordOutreach(
        referral_id=referral_id, supporter_id=supporter, outcome="accepted", at=at(day, 10)
    )
    await expect(client, hospital, outreach, "OutreachAccepted")
    for offset in (1, 8):
        interaction = RecordInteraction(
            referral_id=referral_id,
            supporter_id=supporter,
            occurred_on=day + timedelta(days=offset),
            minutes=40,
        )
        await expect(client, hospital, interaction, "InteractionCompleted")


async def answers(
    stack: Platform, hospital: str, departments: tuple[str, ...] = (DEPARTMENT, OTHER)
) -> list[Any]:
    """Every RE-AIM answer of the hospital: its own and each department's, for each period."""
    url = f"http://127.0.0.1:{stack.service_ports['analytics']}"
    found = []
    headers = {"Authorization": f"Bearer {region_token_for(stack, 'forgetting')}"}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as web:
        for path in (
            f"/reaim/{hospital}",
            *(f"/reaim/{hospital}/{d}" for d in departments),
        ):
            for period in PERIODS:
                resp = await web.get(path, params=period)
                assert resp.status_code == 200, resp.text
                found.append((path, period, resp.json()))
    return found


async def forget_jobs_done(stack: Platform, hospital: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout * 5)):
        if await forget_jobs_left(stack.db_url, hospital) == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the forget job did not finish within the minute")


async def referred_then_forgotten(
    client: PlatformClient, stack: Platform, hospital: str, physician: str, name: str
) -> Any:
    """A hospital with a department and a supporter refers `physician` once, then forgets
    them; returns the PhysicianForgotten once the forget job has finished."""
    await expect(
        client, hospital, RegisterHospital(name=name, physician_count=40), ("HospitalRegistered")
    )
    launch = LaunchDepartment(
        department=DEPARTMENT, physician_count=40, launched_on=date(2025, 1, 1)
    )
    await expect(client, hospital, launch, "DepartmentLaunched")
    train = RegisterSupporter(
        supporter_id="s-1",
        department=DEPARTMENT,
        rank=Rank.senior,
        interventional=True,
        trained_on=date(2025, 1, 2),
    )
    await expect(client, hospital, train, "SupporterTrained")
    await refer(client, hospital, "r-1", physician, date(2025, 2, 3))
    forget = ForgetPhysician(physician_id=physician, requested_on=date(2025, 3, 1))
    forgotten = await expect(client, hospital, forget, "PhysicianForgotten")
    await forget_jobs_done(stack, hospital)
    return forgotten


async def leaks_of(client: PlatformClient, stack: Platform, needle: str) -> list[str]:
    raw = needle.encode()
    leaks = [
        f"stream #{seq} {subject}: {body[:200]!r}"
        for seq, subject, body in await stream_messages(client)
        if raw in body
    ]
    leaks += await rows_containing(stack.db_url, needle)
    # The planner's statistics sample the tables' values (until the next ANALYZE, a forgotten
    # id would be there): as they are, then as ANALYZE (autovacuum's, any time) leaves them.
    for analyze in (False, True):
        found = await statistics_containing(stack.db_url, needle, analyze=analyze)
        leaks += [f"pg_statistic: {s}" for s in found]
    for path in log_files(stack):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if raw in line:
                leaks.append(f"{path.name}:{number}: {line[:200]!r}")
    return leaks


async def test_a_forgotten_physician_is_nowhere_and_every_figure_stays(
    client: PlatformClient, stack: Platform, hospital: str
) -> None:
    h = hospital
    tag = uuid.uuid4().hex[:10]
    forgotten, colleague = f"doc-{tag}", f"colleague-{tag}"
    await expect(
        client, h, RegisterHospital(name="Forgetting", physician_count=90), "HospitalRegistered"
    )
    for department in (DEPARTMENT, OTHER):
        launch = LaunchDepartment(
            department=department, physician_count=30, launched_on=date(2024, 6, 1)
        )
        await expect(client, h, launch, "DepartmentLaunched")
    for n, department in enumerate((DEPARTMENT, DEPARTMENT, OTHER)):
        train = RegisterSupporter(
            supporter_id=f"s{n}-{tag}",
            department=department,
            rank=Rank.senior,
            interventional=True,
            trained_on=date(2024, 7, 1),
        )
        await expect(client, h, train, "SupporterTrained")

    # The physician referred by a colleague, supported twice over.
    r1 = f"r1-{tag}"
    supporter = await refer(
        client, h, r1, forgotten, date(2025, 1, 10), source="third_party", referrer_id=f"x-{tag}"
    )
    await supported(client, h, r1, supporter, date(2025, 1, 11))
    # The same request again under a new command id: answered with a copy of the creation.
    repeat = RequestReferral(
        referral_id=r1,
        physician_id=forgotten,
        department=DEPARTMENT,
        rank=Rank.resident,
        source="third_party",
        event_nature="other",
        requested_at=at(date(2025, 1, 10)),
        referrer_id=f"x-{tag}",
    )
    await expect(client, h, repeat, "ReferralCreated")
    # Referred again after a safety event, and declined.
    r2 = f"r2-{tag}"
    supporter = await refer(
        client,
        h,
        r2,
        forgotten,
        date(2025, 3, 3),
        source="safety_event",
        event_nature="interventional",
        safety_event_id=f"ae-{tag}",
        referrer_id=f"x-{tag}",
    )
    decline = RecordOutreach(
        referral_id=r2,
        supporter_id=supporter,
        outcome="declined",
        at=at(date(2025, 3, 4)),
        decline_reason="no_need",
    )
    await expect(client, h, decline, "OutreachDeclined")
    # The physician as the referrer of a colleague in another department.
    r3 = f"r3-{tag}"
    supporter = await refer(
        client,
        h,
        r3,
        colleague,
        date(2025, 4, 2),
        department=OTHER,
        source="third_party",
        referrer_id=forgotten,
    )
    await supported(client, h, r3, supporter, date(2025, 4, 3))

    await settled(client, stack, [h])
    before = await answers(stack, h)
    assert before[0][2]["reach"]["physicians_supported"] == 2, before[0][2]
    assert await leaks_of(client, stack, forgotten), "the history should name the physician"

    answer = await expect(
        client,
        h,
        ForgetPhysician(physician_id=forgotten, requested_on=date.today()),
        "PhysicianForgotten",
    )
    data = answer["data"]
    assert data["forget_id"] and data["forget_id"] != forgotten
    assert data["requested_on"] == date.today().isoformat()
    assert "physician_id" not in data
    assert sorted(data["referral_ids"]) == sorted([r1, r2])
    assert data["referred_ids"] == [r3]

    await forget_jobs_done(stack, h)
    await settled(client, stack, [h])
    assert await leaks_of(client, stack, forgotten) == []
    assert await answers(stack, h) == before

    from services.analytics.rebuild import rebuild

    await rebuild(Settings(nats_url=stack.nats_url, database_url=stack.db_url))
    assert await answers(stack, h) == before
    assert await leaks_of(client, stack, forgotten) == []

    # Referred again later, the same id is a new physician.
    r4 = f"r4-{tag}"
    supporter = await refer(client, h, r4, forgotten, date(2025, 7, 1))
    await supported(client, h, r4, supporter, date(2025, 7, 2))
    await settled(client, stack, [h])
    after = await answers(stack, h)
    assert after[0][2]["reach"]["physicians_supported"] == 3


async def test_forgetting_an_id_never_sent_is_answered_the_same_way(
    client: PlatformClient, stack: Platform, hospital: str
) -> None:
    await expect(
        client, hospital, RegisterHospital(name="Nobody", physician_count=5), "HospitalRegistered"
    )
    never = f"never-{uuid.uuid4().hex[:10]}"
    answer = await expect(
        client,
        hospital,
        ForgetPhysician(physician_id=never, requested_on=date(2025, 5, 1)),
        "PhysicianForgotten",
    )
    assert answer["data"]["referral_ids"] == [] and answer["data"]["referred_ids"] == []
    assert "physician_id" not in answer["data"]
    await forget_jobs_done(stack, hospital)
    # The command itself is erased from the stream like everything else naming the id.
    leaks = [
        f"#{seq} {subject}"
        for seq, subject, body in await stream_messages(client)
        if never.encode() in body
    ]
    assert leaks == []
    assert json.dumps(answer).find(never) == -1


async def test_a_forget_sent_right_after_a_waiting_referral_forgets_it_too(
    client: PlatformClient, stack: Platform, hospital: str
) -> None:
    """Stream order: a referral waiting for its department's launch is sent before the forget,
    so it is among what is forgotten (the forget waits for it) whatever comes in between."""
    h = hospital
    tag = uuid.uuid4().hex[:10]
    physician = f"waiting-doc-{tag}"
    await expect(client, h, RegisterHospital(name="Order", physician_count=9), "HospitalRegistered")
    train = RegisterSupporter(
        supporter_id=f"s-{tag}",
        department=DEPARTMENT,
        rank=Rank.senior,
        interventional=True,
        trained_on=date(2024, 7, 1),
    )
    request = RequestReferral(
        referral_id=f"r-{tag}",
        physician_id=physician,
        department=DEPARTMENT,
        rank=Rank.resident,
        source="self",
        event_nature="other",
        requested_at=at(date(2025, 2, 1)),
    )
    forget = ForgetPhysician(physician_id=physician, requested_on=date(2025, 2, 2))
    launch = LaunchDepartment(
        department=DEPARTMENT, physician_count=9, launched_on=date(2024, 6, 1)
    )
    ids = [await client.send(h, c) for c in (request, forget, launch, train)]
    created, forgotten = [await client.outcome(i, timeout=30) for i in ids[:2]]
    assert created["type"] == "ReferralCreated", created["data"]
    assert forgotten["type"] == "PhysicianForgotten", forgotten["data"]
    assert forgotten["data"]["referral_ids"] == [f"r-{tag}"]
    await forget_jobs_done(stack, h)
    await settled(client, stack, [h])
    assert await leaks_of(client, stack, physician) == []


async def test_retention_forgets_who_closed_long_ago_and_keeps_the_rest(
    client: PlatformClient, stack: Platform, hospital: str
) -> None:
    """`postctl hospital retention <h> --days N`: physicians (and referrers) whose referrals
    all closed (last outreach or interaction, business date) more than N days ago are
    forgotten; an open referral or a recent one keeps its physician. Imported history works
    by business dates: everything here was handled just now."""
    h = hospital
    tag = uuid.uuid4().hex[:10]
    old, still_open, recent, lead = (f"{n}-{tag}" for n in ("old", "open", "recent", "lead"))
    await expect(
        client, h, RegisterHospital(name="Retention", physician_count=50), "HospitalRegistered"
    )
    launch = LaunchDepartment(
        department=DEPARTMENT, physician_count=50, launched_on=date(2023, 1, 1)
    )
    await expect(client, h, launch, "DepartmentLaunched")
    for n in range(2):
        train = RegisterSupporter(
            supporter_id=f"s{n}-{tag}",
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=date(2023, 2, 1),
        )
        await expect(client, h, train, "SupporterTrained")
    today = datetime.now(UTC).date()
    long_ago = date(2024, 1, 10)
    supporter = await refer(
        client, h, f"r1-{tag}", old, long_ago, source="third_party", referrer_id=lead
    )
    await supported(client, h, f"r1-{tag}", supporter, long_ago + timedelta(days=1))
    await refer(client, h, f"r2-{tag}", still_open, long_ago)  # never reached: open
    supporter = await refer(client, h, f"r3-{tag}", recent, today - timedelta(days=12))
    await supported(client, h, f"r3-{tag}", supporter, today - timedelta(days=11))
    await settled(client, stack, [h])
    before = await answers(stack, h, (DEPARTMENT,))

    env = {**os.environ, "POST_DATABASE_URL": stack.db_url, "POST_RETENTION_INTERVAL": "1"}
    ran = subprocess.run(
        [sys.executable, "-m", "postctl", "hospital", "retention", h, "--days", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    told = json.loads(ran.stdout)
    assert told["retention_days"] == 30 and told["physicians_due_now"] == 2  # old and lead

    forgotten: list[Any] = []
    for _ in range(300):  # the sweep looks every second
        forgotten = client.of_type(h, "PhysicianForgotten")
        if len(forgotten) >= 2:
            break
        await asyncio.sleep(0.2)
    assert sorted(f["data"]["referral_ids"] for f in forgotten) == [[], [f"r1-{tag}"]]
    assert sorted(f["data"]["referred_ids"] for f in forgotten) == [[], [f"r1-{tag}"]]
    await forget_jobs_done(stack, h)
    await settled(client, stack, [h])
    assert await leaks_of(client, stack, old) == []
    assert await leaks_of(client, stack, lead) == []
    assert await leaks_of(client, stack, still_open) != []
    assert await leaks_of(client, stack, recent) != []
    assert await answers(stack, h, (DEPARTMENT,)) == before
    # The sweep goes on: nothing more is forgotten, and no forget's own id is forgotten again.
    await asyncio.sleep(3)
    assert len(client.of_type(h, "PhysicianForgotten")) == 2
