"""The 48-hour promise: assignments without outreach by `due_at` go overdue and are reassigned.

Driven by the `due_at` column, never by in-memory sleeps, so a restart loses nothing. Safe with
several matching instances sweeping at once: the assignment's row is locked (`FOR UPDATE`)
and its status checked in the transaction that appends the overdue, and the append expects the
stream's version, so each overdue fires once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg
import structlog
from prometheus_client import Counter, Gauge

from services.matching import domain, store
from services.matching.handlers import count, serve_waiting_if_freed
from shared.clock import Clock
from shared.unit_of_work import UnitOfWork, events_and_version

log = structlog.get_logger()

OVERDUE = Counter(
    "post_matching_overdue_total",
    "Assignments that reached due_at (48 hours) without outreach.",
    ["hospital"],
)
OPEN_ASSIGNMENTS = Gauge(
    "post_matching_open_assignments",
    "Assignments waiting for outreach, per department (refreshed by the timer).",
    ["hospital", "department"],
)

# An overdue sweep takes at most this many assignments per tick, so one tick stays short.
OVERDUE_BATCH = 500


async def expire_assignment(uow: UnitOfWork, referral_id: str, supporter_id: str) -> bool:
    """Record one overdue assignment and reassign its referral; False if no longer due."""
    due_at = await store.lock_open_assignment(uow.conn, uow.hospital, referral_id, supporter_id)
    if due_at is None or due_at > uow.now():
        return False  # outreach came in, or someone else expired it first
    found = await store.load_referral(uow.conn, uow.hospital, referral_id)
    if found is None:
        return False
    referral, _ = found
    stream = domain.assignment_stream(uow.hospital, referral_id)
    stored = await uow.store.read_stream(uow.conn, stream)
    history, version = events_and_version(stored)
    # No message woke the timer: its events follow from the assignment that went overdue, in
    # the chain of the command that started it (the referral's RequestReferral).
    assigned = [s for s in stored if s.event_type == "SupporterAssigned"]
    if assigned:
        uow.caused_by(assigned[-1].event_id, assigned[-1].metadata.get("correlation_id", ""))
    policy = domain.policy_in_force(
        await store.policies(uow.conn, uow.hospital), referral.department
    )
    candidates, department_open = await store.candidates(uow.conn, referral, policy)
    choice, events = domain.expire_assignment(
        referral,
        domain.assignment_from(history),
        candidates,
        department_open=department_open,
        now=uow.now(),
        policy=policy,
    )
    if choice is None:
        log.warning("overdue_row_without_open_assignment", referral_stream=stream)
        return False
    # The reassignment is caused by the overdue (chained), not by the expired assignment.
    await uow.append(stream, version, events, chained=True)
    await store.project_all(uow.conn, events, uow.now())
    OVERDUE.labels(uow.hospital).inc()
    count(uow.hospital, choice)
    # One open assignment fewer may take the late supporter below their cap.
    await serve_waiting_if_freed(uow, supporter_id)
    return True


class OverdueTimer:
    """Every `interval` seconds: expire due assignments (from the table: restart-safe), and
    every `GAUGE_TICKS` of them refresh the open-assignments gauge. Both look at the hospitals
    of the partitions this instance holds only (`held`; None: every hospital), so the work does
    not grow with the instances (issue 23). It remembers which gauge labels it exported."""

    GAUGE_TICKS = 5  # a gauge scraped every 15 s needs no refresh every second

    def __init__(
        self,
        pool: asyncpg.Pool,
        unit_of_work: Callable[[str], AbstractAsyncContextManager[UnitOfWork]],
        clock: Clock,
        held: Callable[[], list[int] | None],
    ) -> None:
        self.pool = pool
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.held = held
        self._exported: set[tuple[str, str]] = set()

    async def sweep(self) -> int:
        """Expire every open assignment whose due_at has passed; returns how many were."""
        rows = await store.due_assignments(self.pool, self.clock.now(), OVERDUE_BATCH, self.held())
        expired = 0
        for row in rows:
            try:
                async with self.unit_of_work(row["hospital"]) as uow:
                    if await expire_assignment(uow, row["referral_id"], row["supporter_id"]):
                        expired += 1
            except Exception as exc:  # one bad row must not stop the others; retried next tick
                log.warning("overdue_failed", error=repr(exc), hospital=row["hospital"])
        return expired

    async def refresh_open_gauge(self) -> None:
        """Only the hospitals this instance holds: a sum over instances counts each once (and
        a hospital that moved to another instance leaves this one's /metrics)."""
        exported = set()
        for row in await store.open_by_department(self.pool, self.held()):
            labels = (row["hospital"], row["department"])
            OPEN_ASSIGNMENTS.labels(*labels).set(row["open"])
            exported.add(labels)
        for labels in self._exported - exported:
            OPEN_ASSIGNMENTS.remove(*labels)
        self._exported = exported

    async def run(self, interval: float) -> None:
        """Background, forever."""
        tick = 0
        while True:
            try:
                await self.sweep()
                if tick % self.GAUGE_TICKS == 0:
                    await self.refresh_open_gauge()
                tick += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away for a moment: try next tick
                log.warning("overdue_timer_failed", error=repr(exc))
            await asyncio.sleep(interval)
