"""The referral service's reactions: `RequestReferral`, `ForgetPhysician`, and the facts it follows.

One async function per message: load, decide (services.referral.domain), append.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import Any, Literal

import asyncpg
import structlog
from prometheus_client import Counter

from services.referral import domain, store
from services.referral.domain import Fact, Intake, forgetting
from shared import registry
from shared.contracts import (
    Event,
    ForgetPhysician,
    PhysicianForgotten,
    ReasonCode,
    ReferralCreated,
    Rejected,
    RequestReferral,
    cmd_subject,
)
from shared.unit_of_work import NotYetKnown, UnitOfWork

log = structlog.get_logger()

REFERRALS = Counter(
    "post_referral_referrals_total",
    "Referrals created, by hospital and source.",
    ["hospital", "source"],
)
REJECTIONS = Counter(
    "post_referral_rejections_total",
    "RequestReferral commands refused by the referral rules, by reason code.",
    ["reason_code"],
)
FORGOTTEN = Counter(
    "post_referral_physicians_forgotten_total",
    "Physicians forgotten, by what asked (command: ForgetPhysician; retention: the sweep).",
    ["trigger"],
)
# What asked for a forget: the label of FORGOTTEN.
ForgetTrigger = Literal["command", "retention"]


def count_forgotten(trigger: ForgetTrigger) -> None:
    FORGOTTEN.labels(trigger).inc()


FACTS_IGNORED = Counter(
    "post_referral_facts_ignored_total",
    "Facts of other services that made no sense for the referral they name, by type and why.",
    ["event_type", "reason_code"],
)


# --- the command ----------------------------------------------------------------------------


async def request_referral(cmd: RequestReferral, uow: UnitOfWork) -> None:
    hospital = uow.hospital
    stream = domain.stream_id(hospital, cmd.referral_id)
    history, version = await uow.load(stream)
    safety_key = domain.safety_event_key(cmd) if cmd.source == "safety_event" else None
    if safety_key is not None:
        await store.lock_safety_event(uow.conn, hospital, safety_key, cmd.physician_id)
    intake = await _intake(uow.conn, hospital, cmd, safety_key)
    try:
        events = domain.request_referral(history, hospital, cmd, intake, uow.now())
    except Rejected as rejected:
        REJECTIONS.labels(reason_code=rejected.reason_code.value).inc()
        raise
    if not events:
        log.info("referral_repeated", hospital=hospital)
        await uow.repeat(next(e for e in history if isinstance(e, ReferralCreated)))
        return
    await uow.append(stream, version, events)
    for event in events:
        if isinstance(event, ReferralCreated):
            await store.insert_referral(uow.conn, event, safety_key, uow.now())
            REFERRALS.labels(hospital=hospital, source=event.source).inc()


async def _intake(
    conn: asyncpg.Connection, hospital: str, cmd: RequestReferral, safety_key: str | None
) -> Intake:
    known = await registry.lookup(conn, hospital, cmd.department)
    open_referral: str | None = None
    if safety_key is not None:
        open_referral = await store.open_safety_referral(
            conn, hospital, safety_key, cmd.physician_id, domain.CLOSED
        )
    return Intake(
        hospital_registered=known.hospital_registered,
        department=known.department,
        open_safety_referral=open_referral,
    )


# --- the life of a referral, from the other services' facts --------------------------------


async def referral_fact(event: Fact, uow: UnitOfWork) -> None:
    """Move the referral's status; a fact that makes no sense is logged and counted, not fatal."""
    referral = await store.lock_referral(uow.conn, event.hospital, event.referral_id)
    if referral is None:
        _ignore(event, ReasonCode.unknown_referral, "no such referral")
        return
    try:
        after = referral.apply(event)
    except Rejected as rejected:
        _ignore(event, rejected.reason_code, rejected.detail)
        return
    await store.update_referral(uow.conn, after, uow.now(), domain.closing_date(event))


def _ignore(event: Event, reason_code: ReasonCode, detail: str) -> None:
    FACTS_IGNORED.labels(event_type=event.type_name, reason_code=reason_code.value).inc()
    log.warning(
        "referral_fact_ignored",
        hospital=event.hospital,
        reason_code=reason_code.value,
        detail=detail,
    )


EVENT_HANDLERS: dict[str, Callable[[Any, UnitOfWork], Awaitable[None]]] = {
    # What matching tells us about hospitals and departments: the one rule of shared/registry.
    **registry.EVENT_HANDLERS,
    **{fact.__name__: referral_fact for fact in domain.FACT_TYPES},
}


# --- forgetting a physician (CONTRACT.md 1.1): the stores, in one transaction -----------------
#
# A forget has two halves (docs/decisions.md, "Forgetting a physician"):
#
# 1. The stores, in one transaction (`forget`): the referral service's rows and stored events
#    that name the id (as physician or as referrer) get a new opaque ``forget_id`` in its
#    place, `PhysicianForgotten` is appended with the referrals that named it (so every other
#    service rewrites its own rows by referral id, never told the id again), and a job is
#    queued with what the stream still holds. All of it commits together, or none of it does.
# 2. The stream, after the commit: background.Scrubber runs the job.


async def forget_physician(
    cmd: ForgetPhysician, uow: UnitOfWork, *, queued: Callable[[], None]
) -> None:
    """The command. It waits while an earlier `RequestReferral` naming the id waits for its
    department (stream order: that referral is among what is forgotten, or refused first).
    `queued`: told when the forget's job is queued (app.py: it wakes the scrubber)."""
    if uow.stream_seq is not None and await _earlier_request_waits(uow, cmd.physician_id):
        raise NotYetKnown("an earlier referral of this physician is waiting")
    await forget(uow, cmd.physician_id, cmd.requested_on, command_seq=uow.stream_seq)
    count_forgotten("command")
    queued()


async def _earlier_request_waits(uow: UnitOfWork, physician_id: str) -> bool:
    assert uow.stream_seq is not None
    bodies = await store.waiting_bodies(
        uow.conn, uow.hospital, cmd_subject(uow.hospital, "RequestReferral"), uow.stream_seq
    )
    return any(forgetting.names(forgetting.data_of(body), physician_id) for body in bodies)


async def forget(
    uow: UnitOfWork, physician_id: str, requested_on: date, *, command_seq: int | None
) -> PhysicianForgotten:
    """Rewrite every row and stored event of the hospital that names `physician_id`, append
    `PhysicianForgotten` and queue the stream's job, in `uow`'s transaction."""
    conn, hospital = uow.conn, uow.hospital
    forget_id = forgetting.new_forget_id()
    as_physician, as_referrer = await _rewrite(uow, physician_id, forget_id)
    event = PhysicianForgotten(
        hospital=hospital,
        forget_id=forget_id,
        requested_on=requested_on,
        referral_ids=as_physician,
        referred_ids=as_referrer,
    )
    await uow.append(f"forget:{hospital}:{forget_id}", 0, [event])
    await store.queue_forget_job(
        conn,
        forget_id=forget_id,
        hospital=hospital,
        physician_id=physician_id,
        command_seq=command_seq,
        referral_ids=as_physician,
        referred_ids=as_referrer,
    )
    log.info(
        "physician_forgotten",
        forget_id=forget_id,
        referrals=len(as_physician),
        referred=len(as_referrer),
    )
    return event


async def _rewrite(
    uow: UnitOfWork, physician_id: str, forget_id: str, only: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """The stores' half of a forget: `forget_id` in place of `physician_id` in the rows and
    stored creations of the hospital (of the referrals `only`, when given); returns the
    referrals that named it as the physician and as the referrer."""
    conn, hospital = uow.conn, uow.hospital
    # A safety event's id goes with the physician: the FHIR referral ids are a hash of it and
    # the physician's id.
    as_physician = await _rename(
        uow, "physician_id", physician_id, forget_id, {"safety_event_id": None}, only
    )
    as_referrer = await _rename(uow, "referrer_id", physician_id, forget_id, {}, only)
    if as_physician:
        await store.drop_safety_events(conn, hospital, as_physician)
    if as_referrer:
        await store.rename_reporter(conn, hospital, as_referrer, physician_id, forget_id)
    return as_physician, as_referrer


async def physician_forgotten(
    event: PhysicianForgotten, uow: UnitOfWork, *, queued: Callable[[], None]
) -> None:
    """Our own `PhysicianForgotten`, read back from the stream. Normally its referrals carry
    the `forget_id` already and this does nothing. After PostgreSQL was restored from a backup
    taken before the forget, they name the physician again (the backup is the one place the id
    is left): the forget is done again, by the event's referral ids alone, with its own
    `forget_id`, and a job erases whatever the stream may still hold (docs/decisions.md,
    "Backup and restore")."""
    ids = sorted({*event.referral_ids, *event.referred_ids})
    if not ids:
        return
    rows = await store.named_in(uow.conn, uow.hospital, ids)
    named = {r["physician_id"] for r in rows if r["referral_id"] in event.referral_ids}
    named |= {r["referrer_id"] for r in rows if r["referral_id"] in event.referred_ids}
    named -= {None, event.forget_id}
    for physician_id in sorted(named):
        as_physician, as_referrer = await _rewrite(uow, physician_id, event.forget_id, ids)
        await store.queue_forget_job(
            uow.conn,
            forget_id=event.forget_id,
            hospital=uow.hospital,
            physician_id=physician_id,
            command_seq=None,
            referral_ids=as_physician,
            referred_ids=as_referrer,
        )
        log.info("physician_forgotten_again", forget_id=event.forget_id)
        queued()


async def _rename(
    uow: UnitOfWork,
    column: str,
    old: str,
    new: str,
    also: dict[str, Any],
    only: Sequence[str] | None = None,
) -> list[str]:
    """`column` (physician_id or referrer_id) from `old` to `new` in the referral rows (of the
    referrals `only`, when given) and in their stored creations (the referral's own and any
    repeat's copy), with `also` merged into those; returns the referrals it named."""
    referrals = await store.rename_in_referrals(uow.conn, uow.hospital, column, old, new, only)
    if referrals:
        await uow.store.forget_in_data(
            uow.conn,
            event_type="ReferralCreated",
            hospital=uow.hospital,
            key="referral_id",
            ids=referrals,
            field=column,
            old=old,
            changes={column: new, **also},
        )
    return referrals
