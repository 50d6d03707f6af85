"""The hospitals and departments a service learns from matching's facts: one rule for every copy.

Referral, records and analytics each keep their own copy, in their own schema, fed by
`HospitalRegistered`, `DepartmentLaunched` and `DepartmentClosed`. The tables have one shape:

    hospitals   (hospital text PRIMARY KEY, physician_count integer NOT NULL DEFAULT 0)
    departments (hospital text, department text, physician_count integer NOT NULL DEFAULT 0,
                 launched_on date, closed_on date, PRIMARY KEY (hospital, department))

The upserts are order-independent (a closing may be seen before its launch: `launched_on` is
null until the launch comes) and a closing is final: matching never relaunches a closed
department, so a launch seen after its closing leaves the closing be.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import TYPE_CHECKING, Any

from shared.contracts import DepartmentClosed, DepartmentLaunched, HospitalRegistered

if TYPE_CHECKING:
    import asyncpg

    from shared.unit_of_work import UnitOfWork

HOSPITAL_SQL = """
INSERT INTO hospitals (hospital, physician_count) VALUES ($1, $2)
ON CONFLICT (hospital) DO UPDATE SET physician_count = EXCLUDED.physician_count
"""
LAUNCH_SQL = """
INSERT INTO departments (hospital, department, physician_count, launched_on)
VALUES ($1, $2, $3, $4)
ON CONFLICT (hospital, department) DO UPDATE SET
    physician_count = EXCLUDED.physician_count,
    launched_on = LEAST(departments.launched_on, EXCLUDED.launched_on)
"""
CLOSE_SQL = """
INSERT INTO departments (hospital, department, closed_on) VALUES ($1, $2, $3)
ON CONFLICT (hospital, department) DO UPDATE SET closed_on = EXCLUDED.closed_on
"""

Fact = HospitalRegistered | DepartmentLaunched | DepartmentClosed
FACT_TYPES = (HospitalRegistered, DepartmentLaunched, DepartmentClosed)


def upsert(fact: Fact) -> tuple[str, tuple[Any, ...]]:
    """The statement that records one fact, and its arguments (the hospital first)."""
    if isinstance(fact, HospitalRegistered):
        return HOSPITAL_SQL, (fact.hospital, fact.physician_count)
    if isinstance(fact, DepartmentLaunched):
        return LAUNCH_SQL, (fact.hospital, fact.department, fact.physician_count, fact.launched_on)
    return CLOSE_SQL, (fact.hospital, fact.department, fact.closed_on)


async def record(fact: Fact, uow: UnitOfWork) -> None:
    """The event handler: record one fact in the service's copy, in the unit's transaction."""
    sql, args = upsert(fact)
    await uow.conn.execute(sql, *args)


# A service's event handlers for its copy: `event_handlers={**registry.EVENT_HANDLERS, ...}`.
EVENT_HANDLERS = {fact.__name__: record for fact in FACT_TYPES}


@dataclass(frozen=True)
class Department:
    """A department as the service knows it; `launched_on` None: its launch not seen yet."""

    launched_on: date | None
    closed_on: date | None = None

    @property
    def launched(self) -> bool:
        return self.launched_on is not None

    def closed_at(self, moment: datetime) -> bool:
        # A date stands for the start of that day, UTC (CONTRACT.md).
        if self.closed_on is None:
            return False
        return moment >= datetime.combine(self.closed_on, time(0), tzinfo=UTC)


@dataclass(frozen=True)
class Registration:
    """What a command needs: whether its hospital is registered, and its department."""

    hospital_registered: bool
    department: Department | None  # None: nothing seen of it


async def lookup(conn: asyncpg.Connection, hospital: str, department: str) -> Registration:
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM hospitals WHERE hospital = $1) AS registered,"
        " d.launched_on, d.closed_on, d.department IS NOT NULL AS seen"
        " FROM (SELECT 1) AS one"
        " LEFT JOIN departments d ON d.hospital = $1 AND d.department = $2",
        hospital,
        department,
    )
    seen = Department(row["launched_on"], row["closed_on"]) if row["seen"] else None
    return Registration(bool(row["registered"]), seen)
