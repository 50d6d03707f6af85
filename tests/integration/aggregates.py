"""The tables the aggregate triggers keep (services/analytics/migrations/005), read as rows."""

from __future__ import annotations

import asyncpg

from services.analytics import projection

# What tells the aggregate tables' rows apart from none: a row whose count is zero (a
# contribution taken back by the triggers) answers as a missing one.
COUNTED = {
    "agg_interactions": "n",
    "agg_minutes": "n",
    "agg_delays": "n",
    "agg_referrals": "referrals",
    "agg_surveys": None,
    "referral_days": None,
    "supported_days": None,
    "supported_grid": "n",
}


async def aggregate_rows(
    conn: asyncpg.Connection, hospital: str | None = None
) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table the triggers keep, without rows of zeros, in order; with
    `hospital`, only that hospital's (the region's tables left out)."""
    assert set(COUNTED) == set(projection.AGGREGATE_TABLES)
    rows = {}
    for table, count in COUNTED.items():
        where = [f"{count} <> 0"] if count else []
        if hospital is not None:
            if table == "supported_grid":
                continue
            where.append("hospital = $1")
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")
        fetched = await conn.fetch(sql, *([hospital] if hospital is not None else []))
        rows[table] = sorted(tuple(r.values()) for r in fetched)
    return rows
