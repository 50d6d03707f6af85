"""No column that can hold an id or sent text keeps planner statistics.

PostgreSQL's ANALYZE (autovacuum runs it on its own) samples every column's values into
``pg_catalog.pg_statistic``: most common values, histogram bounds. For the columns that hold
ids, slugs, documents or message bodies (an event's data, a waiting command's body, a
processed message's id, a read model's physician and referral ids) that is a copy of what the
platform must be able to forget, or must never keep (a refused command's text in ``waiting``),
outside every table a forgetting or a scan looks at.

The rule, applied by `shared.eventstore.migrate` after each schema's migrations (so a new
table cannot forget it; the analytics rebuild's schema too):

- every column of the schema's tables whose type is text-like (text, varchar, char, name),
  a document (json, jsonb), bytes (bytea), or an array of those, and every expression column
  of their indexes (an index on ``data->>'referral_id'`` has statistics of its own), has its
  statistics target set to 0: ANALYZE no longer samples it. Numbers, times and booleans keep
  theirs (the planner's row estimates for them stay as they were);
- statistics already collected for those columns are removed, which setting the target does
  not do. PostgreSQL 18 has ``pg_clear_attribute_stats`` (the table's owner may call it);
  before 18 only a superuser may delete from ``pg_statistic``, so for the owner (the service's
  role) the column's type is "changed" to itself (``ALTER COLUMN … TYPE`` drops the column's
  statistics and, the type being the same, rewrites nothing), and an expression index is
  re-created from its definition. Both take a short ACCESS EXCLUSIVE lock, only when there is
  something to remove, under a lock timeout: a busy table is left for the next start
  (logged).

What the planner loses: its estimates for equality on these columns fall back to PostgreSQL's
defaults. Every such lookup in the platform goes through an index by key (hospital, stream
id, message id), so the plans do not change.
"""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger()

LOCK_TIMEOUT = "5s"

# The columns whose values are ids or text: text-like, documents, bytes, or arrays of those.
_COLUMNS = """
SELECT c.relname AS relation, a.attname AS column_name, a.attstattarget,
       format_type(a.atttypid, a.atttypmod) AS type_name
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
  AND (t.typcategory = 'S' OR t.typname IN ('json', 'jsonb', 'bytea')
       OR e.typcategory = 'S' OR e.typname IN ('json', 'jsonb', 'bytea'))
ORDER BY c.relname, a.attnum
"""
# The expression columns of the schema's indexes (indkey 0: an expression, not a column).
_INDEX_EXPRESSIONS = """
SELECT i.relname AS relation, a.attnum, a.attname AS column_name, a.attstattarget,
       pg_get_indexdef(i.oid) AS definition,
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid) AS backs_constraint
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_namespace n ON n.oid = i.relnamespace
JOIN pg_attribute a ON a.attrelid = i.oid AND a.attnum > 0
WHERE n.nspname = $1 AND x.indkey[a.attnum - 1] = 0
ORDER BY i.relname, a.attnum
"""
# What ANALYZE kept for them (the owner sees its own tables' rows).
_COLLECTED = """
SELECT tablename AS relation, attname AS column_name, inherited
FROM pg_stats WHERE schemaname = $1
"""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def keep_no_statistics(
    conn: asyncpg.Connection, schema: str, *, clear_function: bool | None = None
) -> dict[str, int]:
    """Apply the rule to `schema` (its tables are the connection's role's): targets set to 0,
    statistics collected before removed. Returns counts (``targets_set``, ``removed``,
    ``left``: what a busy table kept until the next start). `clear_function`: whether to
    remove with ``pg_clear_attribute_stats`` (default: on PostgreSQL 18 and later)."""
    columns = await conn.fetch(_COLUMNS, schema)
    expressions = await conn.fetch(_INDEX_EXPRESSIONS, schema)
    counts = {"targets_set": 0, "removed": 0, "left": 0}
    by_table: dict[str, list[str]] = {}
    for c in columns:
        if c["attstattarget"] != 0:
            by_table.setdefault(c["relation"], []).append(c["column_name"])
    for table, names in by_table.items():
        sets = ", ".join(f"ALTER COLUMN {_q(n)} SET STATISTICS 0" for n in names)
        if await _locked(conn, f"ALTER TABLE {_q(schema)}.{_q(table)} {sets}"):
            counts["targets_set"] += len(names)
    if clear_function is None:
        version = await conn.fetchval("SELECT current_setting('server_version_num')::int")
        clear_function = version >= 180000
    removed, left = await _remove_collected(conn, schema, columns, expressions, clear_function)
    counts["removed"], counts["left"] = removed, left
    # Last: re-creating an index (before PostgreSQL 18) gives its columns the default target.
    for e in await conn.fetch(_INDEX_EXPRESSIONS, schema):
        if e["attstattarget"] != 0:
            statement = (
                f"ALTER INDEX {_q(schema)}.{_q(e['relation'])}"
                f" ALTER COLUMN {e['attnum']} SET STATISTICS 0"
            )
            if await _locked(conn, statement):
                counts["targets_set"] += 1
    if counts["targets_set"] or counts["removed"] or counts["left"]:
        log.info("statistics_kept_none", schema=schema, **counts)
    return counts


async def _remove_collected(
    conn: asyncpg.Connection,
    schema: str,
    columns: list[asyncpg.Record],
    expressions: list[asyncpg.Record],
    clear_function: bool,
) -> tuple[int, int]:
    targets = {(c["relation"], c["column_name"]): c["type_name"] for c in columns}
    indexes = {(e["relation"], e["column_name"]): e for e in expressions}
    collected = [
        r
        for r in await conn.fetch(_COLLECTED, schema)
        if (r["relation"], r["column_name"]) in targets
        or (r["relation"], r["column_name"]) in indexes
    ]
    if not collected:
        return 0, 0
    removed = left = 0
    if clear_function:
        for r in collected:
            await conn.execute(
                "SELECT pg_clear_attribute_stats($1, $2, $3, $4)",
                schema,
                r["relation"],
                r["column_name"],
                r["inherited"],
            )
            removed += 1
        return removed, left
    for r in collected:
        key = (r["relation"], r["column_name"])
        if key in targets:  # the same type again: the statistics go, nothing is rewritten
            ok = await _locked(
                conn,
                f"ALTER TABLE {_q(schema)}.{_q(r['relation'])}"
                f" ALTER COLUMN {_q(r['column_name'])} TYPE {targets[key]}",
            )
            removed, left = removed + ok, left + (not ok)
    # An index on a column whose type was "changed" was re-created with it: look again.
    still = {r["relation"] for r in await conn.fetch(_COLLECTED, schema)}
    for name in sorted({e["relation"] for e in expressions} & still):
        index = next(e for e in expressions if e["relation"] == name)
        if index["backs_constraint"]:
            log.warning("statistics_left", schema=schema, index=name)
            ok = False
        else:
            ok = await _locked(conn, f"DROP INDEX {_q(schema)}.{_q(name)}; {index['definition']}")
        removed, left = removed + ok, left + (not ok)
    return removed, left


async def _locked(conn: asyncpg.Connection, statement: str) -> bool:
    """Run `statement` in a transaction of its own under a lock timeout: False (logged) when
    the table is too busy now."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute(statement)
    except asyncpg.LockNotAvailableError:
        log.warning("statistics_busy", statement=statement[:200])
        return False
    return True
