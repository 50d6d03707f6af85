"""The referral service's reactions: `RequestReferral`, and the facts it follows.

One async function per message: load, decide (services.referral.domain), append.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from prometheus_client import Counter

from services.referral import domain, store
from services.referral.domain import Fact, Intake
from shared import registry
from shared.contracts import (
    Event,
    ReferralCreated,
    Rejected,
    RequestReferral,
)
from shared.unit_of_work import UnitOfWork

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
        _ignore(event, "unknown_referral", "no such referral")
        return
    try:
        after = referral.apply(event)
    except Rejected as rejected:
        _ignore(event, rejected.reason_code.value, rejected.detail)
        return
    await store.update_referral(uow.conn, after, uow.now(), domain.closing_date(event))


def _ignore(event: Event, reason_code: str, detail: str) -> None:
    FACTS_IGNORED.labels(event_type=event.type_name, reason_code=reason_code).inc()
    log.warning(
        "referral_fact_ignored", hospital=event.hospital, reason_code=reason_code, detail=detail
    )


EVENT_HANDLERS: dict[str, Callable[[Any, UnitOfWork], Awaitable[None]]] = {
    # What matching tells us about hospitals and departments: the one rule of shared/registry.
    **registry.EVENT_HANDLERS,
    **{fact.__name__: referral_fact for fact in domain.FACT_TYPES},
}
