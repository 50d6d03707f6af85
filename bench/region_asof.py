"""The region's department and supporter figures at national scale (issue 26): the two queries
that read every department and supporter of the region (store.DEPARTMENTS_SQL and
SUPPORTERS_SQL, as before migration 007) against the steps per day that replace them
(store.REGION_ASOF_SQL), on the same rows and the same new periods, answers compared.

The rows are written straight with `generate_series`, in the proportions of the national
bench region (7 departments and 59 supporters a hospital, one availability change for every
fourth supporter, about 37 referral days a department over five years): only these tables
take part in the two queries. Migrations 001-006 first, the rows, then 007, whose backfill
builds the steps from them (timed: what an upgrade costs).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from bench.common import Section, fmt_ms, fmt_ratio
from services.analytics import store
from services.analytics.reaim import Period
from services.analytics.rebuild import MIGRATIONS
from shared.eventstore import create_pool, migrate
from shared.runtime import Platform

HOSPITALS = 6000
START = date(2021, 1, 1)
DAYS = 5 * 365
PERIODS = 30

ROWS_SQL = """
INSERT INTO hospitals SELECT 'h-' || h, 200 + h % 300 FROM generate_series(1, $1) h;
INSERT INTO departments
SELECT 'h-' || h, 'dept-' || d, 10 + (h * d) % 50,
    DATE '2021-01-01' + ((h * 7 + d * 31) % 365),
    CASE WHEN (h + d) % 23 = 0 THEN DATE '2021-01-01' + 400 + (h * d) % 1000 END
FROM generate_series(1, $1) h, generate_series(1, 7) d;
INSERT INTO supporters
SELECT 'h-' || h, 's-' || s, 'dept-' || (1 + s % 7),
    DATE '2021-01-01' + ((h * 13 + s * 17) % 1500),
    CASE WHEN (h + s) % 9 = 0 THEN DATE '2021-01-01' + 1500 + (h + s) % 300 END
FROM generate_series(1, $1) h, generate_series(1, 59) s;
INSERT INTO availability_changes
SELECT 'h-' || h, 'a-' || h || '-' || s, 's-' || s, 'dept-' || (1 + s % 7),
    DATE '2021-01-01' + ((h * 5 + s * 11) % 1800), (h + s) % 3 = 0, h * 100 + s
FROM generate_series(1, $1) h, generate_series(1, 59, 4) s;
INSERT INTO referral_days
SELECT DISTINCT 'h-' || h, 'dept-' || d, DATE '2021-01-01' + ((h * 37 + d * 101 + k * 49) % 1825)
FROM generate_series(1, $1) h, generate_series(1, 7) d, generate_series(1, 37) k;
"""


def _periods(rng: random.Random) -> list[Period]:
    found = []
    for _ in range(PERIODS):
        a, b = sorted(rng.sample(range(-30, DAYS + 30), 2))
        found.append(Period(START + timedelta(days=a), START + timedelta(days=b)))
    return found


async def run(platform: Platform, scale: float = 1.0) -> Section:
    hospitals = max(50, int(HOSPITALS * scale))
    schema = f"bench_asof_{uuid.uuid4().hex[:6]}"
    before = Path(tempfile.mkdtemp(prefix="asof-migrations-"))
    for path in MIGRATIONS.glob("*.sql"):
        if path.name < "007":
            shutil.copy(path, before / path.name)
    pool = await create_pool(platform.db_url, schema, max_size=2)
    try:
        await migrate(pool, schema, before)
        started = time.perf_counter()
        async with pool.acquire() as conn:
            await conn.execute(ROWS_SQL.replace("$1", str(hospitals)))
            await conn.execute("ANALYZE")
            counts = {
                t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                for t in ("departments", "supporters", "availability_changes", "referral_days")
            }
        written = time.perf_counter() - started
        periods = _periods(random.Random(26))
        old_sql = [
            store._sql("departments", store.DEPARTMENTS_SQL, "region"),
            store._sql("supporters", store.SUPPORTERS_SQL, "region"),
        ]
        old_ms, old_answers = [], []
        async with pool.acquire() as conn:
            for period in periods:
                args = (period.start, period.end, None, None)
                t0 = time.perf_counter()
                rows = [dict(await conn.fetchrow(sql, *args)) for sql in old_sql]
                old_ms.append((time.perf_counter() - t0) * 1000)
                old_answers.append({**rows[0], **rows[1]})
        t0 = time.perf_counter()
        await migrate(pool, schema, MIGRATIONS)  # 007 and its backfill
        backfill = time.perf_counter() - t0
        new_ms: list[float] = []
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE")
            for period, old in zip(periods, old_answers, strict=True):
                args = (period.start, period.end, None, None)
                t0 = time.perf_counter()
                row = await conn.fetchrow(store.REGION_ASOF_SQL, *args, *store.pieces(period))
                new_ms.append((time.perf_counter() - t0) * 1000)
                new = dict(row)
                for key, value in old.items():
                    if key == "slugs":  # a set, in no particular order
                        same = sorted(value or []) == sorted(new[key] or [])
                    else:
                        same = value == new[key]
                    if not same:
                        raise AssertionError(f"{key}: {value!r} before, {new[key]!r} now")
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()
        shutil.rmtree(before, ignore_errors=True)
    old_ms.sort()
    new_ms.sort()

    def p(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    results: dict[str, Any] = {
        "hospitals": hospitals,
        "rows": counts,
        "rows_written_seconds": round(written, 1),
        "migration_007_backfill_seconds": round(backfill, 1),
        "before_p50_ms": round(p(old_ms, 0.5), 1),
        "before_p99_ms": round(p(old_ms, 0.99), 1),
        "after_p50_ms": round(p(new_ms, 0.5), 1),
        "after_p99_ms": round(p(new_ms, 0.99), 1),
        "ratio_p50_before_vs_after": round(p(old_ms, 0.5) / p(new_ms, 0.5), 1),
        "answers_equal": True,
    }
    rows = [
        (f"region departments + supporters, {hospitals} hospitals: rows", str(counts), ""),
        (
            "before (every row): p50 / p99",
            f"{fmt_ms(p(old_ms, 0.5))} / {fmt_ms(p(old_ms, 0.99))}",
            "",
        ),
        (
            "after (steps per day): p50 / p99",
            f"{fmt_ms(p(new_ms, 0.5))} / {fmt_ms(p(new_ms, 0.99))}",
            "a small part of 200 ms",
        ),
        ("before / after, p50", fmt_ratio(p(old_ms, 0.5) / p(new_ms, 0.5)), "answers equal"),
        ("migration 007 backfill", f"{backfill:.1f} s", ""),
    ]
    return Section("region_asof", results, rows)
