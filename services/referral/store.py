"""The referral service's SQL: the `referrals` rows (written from its own `ReferralCreated` and
moved by the other services' facts), the safety events' index, and what forgetting and
retention read and rewrite. The HTTP reads are in views.py; the stored events are
shared/eventstore.py's.

`referrals` follows this service's own `ReferralCreated` (in the transaction that appends it)
and the facts of matching and records (`domain.FACT_TYPES`): a replay of the stream rebuilds
it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime

import asyncpg

from services.referral.domain import Referral, Status
from shared.contracts import ReferralCreated

# --- intake -----------------------------------------------------------------------------------


async def lock_safety_event(
    conn: asyncpg.Connection, hospital: str, safety_key: str, physician_id: str
) -> None:
    """Until the transaction ends: two reports of one safety event naming one physician at
    once must not both pass."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"safety:{hospital}:{safety_key}:{physician_id}",
    )


async def open_safety_referral(
    conn: asyncpg.Connection,
    hospital: str,
    safety_key: str,
    physician_id: str,
    closed: Iterable[Status],
) -> str | None:
    """The oldest referral of this safety event and physician not yet closed."""
    return await conn.fetchval(  # type: ignore[no-any-return]
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
        physician_id,
        [s.value for s in closed],
    )


async def insert_referral(
    conn: asyncpg.Connection, event: ReferralCreated, safety_key: str | None, now: datetime
) -> None:
    """The row of a referral just created (and its safety event's, when it has one)."""
    await conn.execute(
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
        await conn.execute(
            "INSERT INTO safety_event_referrals (hospital, referral_id, safety_key, physician_id)"
            " VALUES ($1, $2, $3, $4)",
            event.hospital,
            event.referral_id,
            safety_key,
            event.physician_id,
        )


# --- the life of a referral ---------------------------------------------------------------------


async def lock_referral(
    conn: asyncpg.Connection, hospital: str, referral_id: str
) -> Referral | None:
    """The referral as it stands, its row locked until the transaction ends."""
    row = await conn.fetchrow(
        "SELECT status, supporter_id, assignment_reason, interactions FROM referrals"
        " WHERE hospital = $1 AND referral_id = $2 FOR UPDATE",
        hospital,
        referral_id,
    )
    if row is None:
        return None
    return Referral(
        hospital=hospital,
        referral_id=referral_id,
        status=Status(row["status"]),
        supporter_id=row["supporter_id"],
        assignment_reason=row["assignment_reason"],
        interactions=row["interactions"],
    )


async def update_referral(
    conn: asyncpg.Connection, after: Referral, now: datetime, contact_on: date | None
) -> None:
    """Store where a referral now stands; `contact_on` (a closing outreach or interaction's
    business date) moves `last_contact_on` forward only."""
    await conn.execute(
        """
        UPDATE referrals
        SET status = $3, supporter_id = $4, assignment_reason = $5, interactions = $6,
            updated_at = $7, last_contact_on = GREATEST(last_contact_on, $8)
        WHERE hospital = $1 AND referral_id = $2
        """,
        after.hospital,
        after.referral_id,
        after.status.value,
        after.supporter_id,
        after.assignment_reason,
        after.interactions,
        now,
        contact_on,
    )
