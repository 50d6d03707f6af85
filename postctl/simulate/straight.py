"""A simulated region as contract events, written straight into the POST stream
(`postctl simulate region --straight`, and the bench's `replay` and `national` sections).

`postctl.simulate.region_scenario` plans the region (hospitals, departments, supporters,
referrals with their fates, surveys); here each plan becomes the events the services would have
emitted for it, each built with its pydantic model (so each is a valid contract event), as the
relay publishes them: CloudEvents on post.{hospital}.evt.{Type}. Going around the services makes
the setup of a million events take a minute instead of hours.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta

import nats

from postctl.simulate import ReferralPlan, Scenario, region_scenario
from postctl.simulate.region import region_scenarios
from shared.contracts import (
    STREAM_NAME,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    InteractionCompleted,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    ReferralCreated,
    SupporterAssigned,
    SupporterRetired,
    SupporterTrained,
    SurveyResponseRecorded,
    encode,
    evt_subject,
    make_cloudevent,
)
from shared.service import ensure_stream
from shared.settings import nats_servers, nats_tls

SEED = 9
OUTREACH = {
    "accepted": OutreachAccepted,
    "declined": OutreachDeclined,
    "unreachable": OutreachUnreachable,
}


def scenario(hospitals: int, years: int) -> Scenario:
    return region_scenario(hospitals, years, SEED)


def roster_events(plan: Scenario) -> Iterator[Event]:
    for h in plan.hospitals:
        yield HospitalRegistered(
            hospital=h.hospital, name=h.name, physician_count=h.physician_count
        )
    for d in plan.departments:
        yield DepartmentLaunched(
            hospital=d.hospital,
            department=d.department,
            physician_count=d.physician_count,
            launched_on=d.launched_on,
        )
    for s in plan.supporters:
        yield SupporterTrained(
            hospital=s.hospital,
            supporter_id=s.supporter_id,
            department=s.department,
            rank=s.rank,
            interventional=s.interventional,
            trained_on=s.trained_on,
        )


def referral_events(r: ReferralPlan, supporter: str) -> Iterator[Event]:
    common = {"hospital": r.hospital, "referral_id": r.referral_id}
    yield ReferralCreated(
        **common,
        physician_id=r.physician_id,
        department=r.department,
        rank=r.rank,
        source=r.source,
        event_nature=r.event_nature,
        requested_at=r.requested_at,
        referrer_id=r.referrer_id,
    )
    assigned_at = r.requested_at + timedelta(seconds=2)
    yield SupporterAssigned(
        **common,
        supporter_id=supporter,
        department=r.department,
        assigned_at=assigned_at,
        due_at=assigned_at + timedelta(hours=48),
        reason="matched",
    )
    for o in r.outreach:
        yield OUTREACH[o.outcome](
            **common,
            supporter_id=supporter,
            at=o.at,
            decline_reason=o.decline_reason,
            department=r.department,
        )
    for k, i in enumerate(r.interactions):
        yield InteractionCompleted(
            **common,
            supporter_id=supporter,
            occurred_on=i.occurred_on,
            minutes=i.minutes,
            escalated=i.escalated,
            department=r.department,
            follow_up=k > 0,
            implied_acceptance=k == 0 and not r.outreach,
        )


def closing_events(plan: Scenario) -> Iterator[Event]:
    for s in plan.supporters:
        if s.retired_on is not None:
            yield SupporterRetired(
                hospital=s.hospital,
                supporter_id=s.supporter_id,
                retired_on=s.retired_on,
                department=s.department,
            )
    for d in plan.departments:
        if d.closed_on is not None:
            yield DepartmentClosed(
                hospital=d.hospital, department=d.department, closed_on=d.closed_on
            )
    for v in plan.surveys:
        yield SurveyResponseRecorded(
            hospital=v.hospital,
            response_id=v.response_id,
            department=v.department,
            submitted_on=v.submitted_on,
            aware=v.aware,
            had_interaction=v.had_interaction,
            helpful=v.helpful,
            wellbeing_improved=v.wellbeing_improved,
            comfort_improved=v.comfort_improved,
            would_recommend=v.would_recommend,
            satisfaction=v.satisfaction,
        )


def events(plan: Scenario) -> Iterator[Event]:
    """Every event of the region, roster first, then the referrals in time order."""
    yield from roster_events(plan)
    rosters: dict[tuple[str, str], list[str]] = {}
    for s in plan.supporters:
        rosters.setdefault((s.hospital, s.department), []).append(s.supporter_id)
    for n, r in enumerate(plan.referrals):
        roster = rosters[(r.hospital, r.department)]
        yield from referral_events(r, roster[n % len(roster)])
    yield from closing_events(plan)


def count_events(plan: Scenario) -> int:
    return (
        len(plan.hospitals)
        + len(plan.departments)
        + len(plan.supporters)
        + sum(2 + len(r.outreach) + len(r.interactions) for r in plan.referrals)
        + sum(1 for s in plan.supporters if s.retired_on is not None)
        + sum(1 for d in plan.departments if d.closed_on is not None)
        + len(plan.surveys)
    )


def message(event: Event, recorded: datetime) -> tuple[str, bytes]:
    ce = make_cloudevent(
        type_=event.type_name,
        source=f"/hospitals/{event.hospital}/bench",
        data=event.to_data(),
        id_=str(uuid.uuid4()),
        time=recorded,
        correlationid=None,
        causationid=None,
    )
    return evt_subject(event.hospital, event.type_name), encode(ce)


def national(hospitals: int, years: int, chunk: int = 100) -> Iterator[Scenario]:
    """A national region, planned `chunk` hospitals at a time (postctl.simulate.region_scenarios):
    memory holds one chunk's plans, not the region's."""
    return region_scenarios(hospitals, years, SEED, chunk)


async def publish_region(
    nats_url: str,
    plan: Scenario | Iterable[Scenario],
    window: int = 5000,
    on_window: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The region's events (of one plan, or of plans one after another) into the stream: plain
    publishes the stream stores, each `window` closed by one acknowledged publish (acked, so
    everything before it is stored: one connection keeps order). The count stored is checked
    at the end."""
    plans = [plan] if isinstance(plan, Scenario) else plan
    nc = await nats.connect(
        nats_servers(nats_url),
        name="post-simulate-straight",
        pending_size=64 * 1024 * 1024,
        tls=nats_tls(),
    )
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        before = (await js.stream_info(STREAM_NAME)).state.messages
        recorded = datetime.now(UTC)
        sent = 0
        started = time.perf_counter()
        for event in (e for p in plans for e in events(p)):
            subject, body = message(event, recorded)
            sent += 1
            if sent % window:
                await nc.publish(subject, body)
            else:
                await js.publish(subject, body, timeout=60)
                if on_window is not None:  # progress: everything up to here is stored
                    on_window(sent)
        await nc.flush()
        seconds = time.perf_counter() - started
        for _ in range(100):  # the last plain publishes may still be on their way in
            stored = (await js.stream_info(STREAM_NAME)).state.messages - before
            if stored >= sent:
                break
            await asyncio.sleep(0.1)
        assert stored == sent, f"{sent} published, {stored} stored"
        return {
            "events": sent,
            "seconds": round(seconds, 3),
            "per_second": round(sent / seconds, 1) if seconds else 0.0,
        }
    finally:
        await nc.close()
