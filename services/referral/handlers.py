"""The referral service's reactions: `RequestReferral`, and the facts it follows.

One async function per message: load, decide (services.referral.domain), append.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from prometheus_client import Counter

from services.referral import domain
from services.referral.domain import Fact, Intake, Referral, Status
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
        # Two reports of one safety event naming one physician at once must not both pass.
        await uow.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"safety:{hospital}:{safety_key}:{cmd.physician_id}",
        )
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
            await _record_created(uow, event, safety_key)
            REFERRALS.labels(hospital=hospital, source=event.source).inc()


async def _intake(
    conn: asyncpg.Connection, hospital: str, cmd: RequestReferral, safety_key: str | None
) -> Intake:
    known = await registry.lookup(conn, hospital, cmd.department)
    open_referral: str | None = None
    if safety_key is not None:
        open_referral = await conn.fetchval(
            """
            SELECT s.referral_id
            FROM safety_event_referrals s
            JOIN referrals r USING (hospital, referral_id)
            WHERE s.hospital = $1 AND s.safety_key = $2 AND s.physician_id = $3
              AND r.status <> ALL($4::text[])
            ORDER BY r.created_at
            LIMIT 1
            """,
            hospital,
            safety_key,
            cmd.physician_id,
            [s.value for s in domain.CLOSED],
        )
    return Intake(
        hospital_registered=known.hospital_registered,
        department=known.department,
        open_safety_referral=open_referral,
    )


async def _record_created(uow: UnitOfWork, event: ReferralCreated, safety_key: str | None) -> None:
    now = uow.now()
    await uow.conn.execute(
        """
        INSERT INTO referrals (hospital, referral_id, department, source, requested_at, status,
                               created_at, updated_at, physician_id, referrer_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9)
        """,
        event.hospital,
        event.referral_id,
        event.department,
        event.source,
        event.requested_at,
        Status.requested.value,
        now,
        event.physician_id,
        event.referrer_id,
    )
    if safety_key is not None:
        await uow.conn.execute(
            "INSERT INTO safety_event_referrals (hospital, referral_id, safety_key, physician_id)"
            " VALUES ($1, $2, $3, $4)",
            event.hospital,
            event.referral_id,
            safety_key,
            event.physician_id,
        )


# --- the life of a referral, from the other services' facts --------------------------------


async def referral_fact(event: Fact, uow: UnitOfWork) -> None:
    """Move the referral's status; a fact that makes no sense is logged and counted, not fatal."""
    referral_id = event.referral_id
    row = await uow.conn.fetchrow(
        "SELECT status, supporter_id, assignment_reason, interactions FROM referrals"
        " WHERE hospital = $1 AND referral_id = $2 FOR UPDATE",
        event.hospital,
        referral_id,
    )
    if row is None:
        _ignore(event, "unknown_referral", "no such referral")
        return
    referral = Referral(
        hospital=event.hospital,
        referral_id=referral_id,
        status=Status(row["status"]),
        supporter_id=row["supporter_id"],
        assignment_reason=row["assignment_reason"],
        interactions=row["interactions"],
    )
    try:
        after = referral.apply(event)
    except Rejected as rejected:
        _ignore(event, rejected.reason_code.value, rejected.detail)
        return
    await uow.conn.execute(
        """
        UPDATE referrals
        SET status = $3, supporter_id = $4, assignment_reason = $5, interactions = $6,
            updated_at = $7, last_contact_on = GREATEST(last_contact_on, $8)
        WHERE hospital = $1 AND referral_id = $2
        """,
        event.hospital,
        referral_id,
        after.status.value,
        after.supporter_id,
        after.assignment_reason,
        after.interactions,
        uow.now(),
        domain.closing_date(event),
    )


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
