"""The tables the aggregate triggers keep (services/analytics/migrations/005), read as rows."""

from __future__ import annotations

import asyncpg

from services.analytics import projection

# What tells the aggregate tables' rows apart from none: a row whose counts are zero (a
# contribution taken back by the triggers) answers as a missing one.
_STEPS = "launched <> 0 OR open <> 0 OR eligible <> 0 OR adopted <> 0 OR trained <> 0"
COUNTED = {
    "agg_interactions": "n <> 0",
    "agg_minutes": "n <> 0",
    "agg_delays": "n <> 0",
    "agg_referrals": "referrals <> 0",
    "agg_surveys": None,
    "referral_days": None,
    "supported_days": None,
    "supported_grid": "n <> 0",
    "region_parts": None,
    "region_asof": f"{_STEPS} OR active <> 0 OR available <> 0",
    "region_slugs": None,
    "referred_grid": "n <> 0",
}
# The region's own tables: no hospital column.
REGION_ONLY = {"supported_grid", "region_asof", "region_slugs", "referred_grid"}


async def aggregate_rows(
    conn: asyncpg.Connection, hospital: str | None = None
) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table the triggers keep, without rows of zeros, in order; with
    `hospital`, only that hospital's (the region's tables left out)."""
    assert set(COUNTED) == set(projection.AGGREGATE_TABLES)
    rows = {}
    for table, count in COUNTED.items():
        where = [f"({count})"] if count else []
        if hospital is not None:
            if table in REGION_ONLY:
                continue
            where.append("hospital = $1")
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")
        fetched = await conn.fetch(sql, *([hospital] if hospital is not None else []))
        rows[table] = sorted(tuple(r.values()) for r in fetched)
    return rows
