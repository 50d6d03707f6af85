"""The referral service's SQL: the `referrals` rows (written from its own `ReferralCreated` and
moved by the other services' facts), the safety events' index, and what forgetting and
retention read and rewrite. The HTTP reads are in views.py; the stored events are
shared/eventstore.py's.

`referrals` follows this service's own `ReferralCreated` (in the transaction that appends it)
and the facts of matching and records (`domain.FACT_TYPES`): a replay of the stream rebuilds
it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime

import asyncpg

from services.referral.domain import Referral, Status
from services.referral.domain.forgetting import FORGET_PREFIX, Job
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


# --- forgetting ---------------------------------------------------------------------------------


async def waiting_bodies(
    conn: asyncpg.Connection, hospital: str, subject: str, before_seq: int
) -> list[bytes]:
    """The bodies of the hospital's messages on `subject` kept in `waiting` (shared/inbox.py)
    from before stream sequence `before_seq`."""
    rows = await conn.fetch(
        "SELECT body FROM waiting WHERE hospital = $1 AND subject = $2 AND stream_seq < $3",
        hospital,
        subject,
        before_seq,
    )
    return [bytes(r["body"]) for r in rows]


async def rename_in_referrals(
    conn: asyncpg.Connection,
    hospital: str,
    column: str,
    old: str,
    new: str,
    only: Sequence[str] | None = None,
) -> list[str]:
    """`column` (physician_id or referrer_id) from `old` to `new` in the hospital's referral
    rows (of the referrals `only`, when given); returns the referrals it named, sorted."""
    assert column in ("physician_id", "referrer_id")
    rows = await conn.fetch(
        f"UPDATE referrals SET {column} = $3 WHERE hospital = $1 AND {column} = $2"
        " AND ($4::text[] IS NULL OR referral_id = ANY($4::text[])) RETURNING referral_id",
        hospital,
        old,
        new,
        None if only is None else list(only),
    )
    return sorted(r["referral_id"] for r in rows)


async def drop_safety_events(
    conn: asyncpg.Connection, hospital: str, referral_ids: Sequence[str]
) -> None:
    """A safety event's id goes with the physician it named."""
    await conn.execute(
        "DELETE FROM safety_event_referrals WHERE hospital = $1 AND referral_id = ANY($2)",
        hospital,
        referral_ids,
    )


async def rename_reporter(
    conn: asyncpg.Connection,
    hospital: str,
    referral_ids: Sequence[str],
    physician_id: str,
    forget_id: str,
) -> None:
    """A safety event without an id is known by who reported it and when: the reporter's id
    in its key becomes the forget's."""
    await conn.execute(
        """
        UPDATE safety_event_referrals SET safety_key = 'by:' || $3 || substr(safety_key,
            length($4) + 4)
        WHERE hospital = $1 AND referral_id = ANY($2::text[])
          AND left(safety_key, length($4) + 4) = 'by:' || $4 || '@'
        """,
        hospital,
        referral_ids,
        forget_id,
        physician_id,
    )


async def queue_forget_job(
    conn: asyncpg.Connection,
    *,
    forget_id: str,
    hospital: str,
    physician_id: str,
    command_seq: int | None,
    referral_ids: Sequence[str],
    referred_ids: Sequence[str],
) -> None:
    """The stream's half of a forget, to do after the commit (background.Scrubber): the one
    place the id is kept meanwhile. A forget done again after a restore (its forget_id known)
    keeps the job already queued."""
    await conn.execute(
        "INSERT INTO forget_jobs (forget_id, hospital, physician_id, command_seq, referral_ids,"
        " referred_ids) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (forget_id) DO NOTHING",
        forget_id,
        hospital,
        physician_id,
        command_seq,
        referral_ids,
        referred_ids,
    )


def _job(row: asyncpg.Record) -> Job:
    return Job(
        row["forget_id"],
        row["hospital"],
        row["physician_id"],
        row["command_seq"],
        frozenset(row["referral_ids"]),
        frozenset(row["referred_ids"]),
    )


async def named_in(
    conn: asyncpg.Connection, hospital: str, referral_ids: Sequence[str]
) -> list[asyncpg.Record]:
    """Who the referrals `referral_ids` name now, as physician and as referrer."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT referral_id, physician_id, referrer_id FROM referrals"
        " WHERE hospital = $1 AND referral_id = ANY($2::text[])",
        hospital,
        list(referral_ids),
    )
    return rows


async def lock_next_jobs(conn: asyncpg.Connection, limit: int) -> list[tuple[Job, float]]:
    """The oldest job nobody is running, with up to `limit` jobs of its hospital nobody is
    running, locked until the transaction ends; each with its age in seconds."""
    first = await conn.fetchval(
        "SELECT hospital FROM forget_jobs ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1"
    )
    if first is None:
        return []
    rows = await conn.fetch(
        "SELECT *, extract(epoch FROM now() - created_at) AS age FROM forget_jobs"
        " WHERE hospital = $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        first,
        limit,
    )
    return [(_job(row), float(row["age"])) for row in rows]


async def delete_jobs(conn: asyncpg.Connection, forget_ids: Sequence[str]) -> None:
    await conn.execute("DELETE FROM forget_jobs WHERE forget_id = ANY($1::text[])", forget_ids)


async def jobs_pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM forget_jobs"))


# --- retention ----------------------------------------------------------------------------------

# Every id the hospital's referrals name (as physician or referrer) whose referrals all closed
# (a last outreach or interaction, business date) before the cutoff; not a forget's own id.
RETENTION_SQL = """
WITH named AS (
    SELECT physician_id AS id, last_contact_on FROM referrals WHERE hospital = $1
    UNION ALL
    SELECT referrer_id, last_contact_on FROM referrals
    WHERE hospital = $1 AND referrer_id IS NOT NULL
)
SELECT id FROM named
WHERE left(id, length($3)) <> $3
GROUP BY id
HAVING bool_and(last_contact_on IS NOT NULL AND last_contact_on < $2)
ORDER BY id
LIMIT $4
"""
RETENTION_BATCH = 500


async def set_retention(conn: asyncpg.Connection, hospital: str, days: int | None) -> None:
    """`postctl hospital retention`: `days` None removes it."""
    if days is None:
        await conn.execute("DELETE FROM retention WHERE hospital = $1", hospital)
        return
    await conn.execute(
        "INSERT INTO retention (hospital, days) VALUES ($1, $2)"
        " ON CONFLICT (hospital) DO UPDATE SET days = EXCLUDED.days, set_at = now()",
        hospital,
        days,
    )


async def retentions(pool: asyncpg.Pool) -> list[tuple[str, int]]:
    """(hospital, days) of every hospital with a retention."""
    rows = await pool.fetch("SELECT hospital, days FROM retention ORDER BY hospital")
    return [(r["hospital"], r["days"]) for r in rows]


async def expired_ids(
    conn: asyncpg.Connection | asyncpg.Pool,
    hospital: str,
    cutoff: date,
    limit: int = RETENTION_BATCH,
) -> list[str]:
    rows = await conn.fetch(RETENTION_SQL, hospital, cutoff, FORGET_PREFIX, limit)
    return [r["id"] for r in rows]


async def lock_retention(conn: asyncpg.Connection, hospital: str) -> None:
    """Until the transaction ends: one sweep of the hospital at a time forgets each id once."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"retention:{hospital}"
    )


async def still_expired(
    conn: asyncpg.Connection, hospital: str, physician_id: str, cutoff: date
) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT bool_and(last_contact_on IS NOT NULL AND last_contact_on < $3)"
            " FROM referrals WHERE hospital = $1 AND (physician_id = $2 OR referrer_id = $2)",
            hospital,
            physician_id,
            cutoff,
        )
    )
