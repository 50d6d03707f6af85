"""The records service's SQL: what it keeps of the referrals (from referral's `ReferralCreated`
and matching's `SupporterAssigned`), the rows its decisions read. Its own facts live in the
event store only (shared/eventstore.py); the HTTP reads are in views.py.

`referrals` follows other services' facts and is rebuilt only by a replay of those from the
stream; `hospitals` and `departments` are shared/registry.py's.
"""

from __future__ import annotations

import asyncpg

from services.records.domain import Referral
from shared.contracts import ReferralCreated, SupporterAssigned


async def referral(conn: asyncpg.Connection, hospital: str, referral_id: str) -> Referral | None:
    """The referral as records knows it (department, assigned supporter); None: not seen yet."""
    row = await conn.fetchrow(
        "SELECT department, supporter_id FROM referrals WHERE hospital = $1 AND referral_id = $2",
        hospital,
        referral_id,
    )
    if row is None:
        return None
    return Referral(
        referral_id=referral_id, department=row["department"], supporter_id=row["supporter_id"]
    )


async def referral_created(conn: asyncpg.Connection, hospital: str, event: ReferralCreated) -> None:
    # The assignment may have been seen first (it carries the department too): keep it.
    await conn.execute(
        "INSERT INTO referrals (hospital, referral_id, department, requested_at)"
        " VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (hospital, referral_id) DO UPDATE SET requested_at = EXCLUDED.requested_at",
        hospital,
        event.referral_id,
        event.department,
        event.requested_at,
    )


async def supporter_assigned(
    conn: asyncpg.Connection, hospital: str, event: SupporterAssigned
) -> None:
    # A reassignment replaces the supporter; an older assignment seen late does not.
    await conn.execute(
        "INSERT INTO referrals (hospital, referral_id, department, supporter_id, assigned_at)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (hospital, referral_id) DO UPDATE"
        " SET supporter_id = EXCLUDED.supporter_id, assigned_at = EXCLUDED.assigned_at"
        " WHERE referrals.assigned_at IS NULL OR referrals.assigned_at <= EXCLUDED.assigned_at",
        hospital,
        event.referral_id,
        event.department,
        event.supporter_id,
        event.assigned_at,
    )
