"""What tracing costs when it is off (issue 25): one message's way through the pieces that
gained a check (`PartitionWorker._dispatch`, `UnitOfWork.append`, `EventStore.append`,
`OutboxRelay._publish`), with tracing off as shipped, against the same code as it was before
tracing (copied below, verbatim but for the check). No servers: the database and NATS are stubs
that answer at once, so the ratio is of the platform's own CPU work per message, where a check
would show most (a real message adds the database's and NATS's round trips on top).

    .venv/bin/python -m bench.tracing_off [--messages 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from bench.common import sample_event
from shared import tracing
from shared.consumer import Handled, PartitionWorker
from shared.contracts import Event, encode
from shared.dispatch import IGNORED, OK, Fate, Outcome
from shared.eventstore import EventStore, NewEvent
from shared.inbox import Incoming
from shared.outbox import OutboxRelay, cloudevent_of
from shared.settings import Settings
from shared.unit_of_work import UnitOfWork

HOSPITAL = "bench-h001"


class _Conn:
    """The append statement's answer, at once: (version, positions)."""

    async def fetchrow(self, sql: str, *args: Any) -> tuple[int, list[int]]:
        return args[5], list(range(1, len(args[1]) + 1))


class _Js:
    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        return None


# --- the code as it was before tracing -------------------------------------------------------


class _StoreBefore(EventStore):
    async def append(  # type: ignore[override]
        self, conn: Any, stream_id: str, expected_version: int, events: Sequence[NewEvent]
    ) -> list[int]:
        if not events:
            return []
        return await self._append(conn, stream_id, expected_version, events, True)


class _UnitBefore(UnitOfWork):
    async def append(  # type: ignore[override]
        self, stream_id: str, expected_version: int, events: Sequence[Event]
    ) -> None:
        ids = [self.event_id(stream_id, expected_version + n) for n in range(1, len(events) + 1)]
        causes = [self.message_id] * len(events)
        await self.store.append(
            self.conn,
            stream_id,
            expected_version,
            [
                NewEvent(
                    e,
                    {
                        "correlation_id": self.correlation_id,
                        "causation_id": cause,
                        "hospital": e.hospital,
                        "service": self.service,
                    },
                    event_id,
                )
                for e, event_id, cause in zip(events, ids, causes, strict=True)
            ],
        )
        self.emitted.extend(events)


class _RelayBefore(OutboxRelay):
    async def _publish(self, row: Any) -> None:
        subject, ce = cloudevent_of(row, self.service)
        await self.js.publish(subject, encode(ce), headers={"Nats-Msg-Id": ce["id"]})


class _WorkerBefore(PartitionWorker):
    async def _dispatch(self, conn: Any, incoming: Any, settled: bool = False) -> Handled:
        if incoming is None:
            return Handled(IGNORED)
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(event_type=incoming.type, hospital=incoming.hospital)
        try:
            outcome = await self.dispatcher.dispatch(incoming, conn, settled=settled)
            return Handled(outcome, None, time.perf_counter() - started)
        except Exception as exc:
            return Handled(Outcome(Fate.error), exc, time.perf_counter() - started)
        finally:
            structlog.contextvars.unbind_contextvars("event_type", "hospital", "correlation_id")


# --- one message -------------------------------------------------------------------------------


class _Dispatcher:
    """A handler's work without the database: one event appended through the unit of work."""

    def __init__(self, unit: type[UnitOfWork], store: type[EventStore]) -> None:
        self.unit, self.store = unit, store
        self.event = sample_event(HOSPITAL)
        self.n = 0

    async def dispatch(self, incoming: Incoming, conn: Any, *, settled: bool = False) -> Outcome:
        self.n += 1
        uow = self.unit("bench", conn, HOSPITAL, None, f"m-{self.n}", store=self.store())  # type: ignore[arg-type]
        await uow.append(f"referral:{HOSPITAL}:r-{self.n}", 0, [self.event])
        return OK


def _row(event: Event) -> dict[str, Any]:
    return {
        "position": 1,
        "event_id": "0b5e1f0e-8f5c-4bb8-9d8e-111111111111",
        "event_type": event.type_name,
        "data": json.loads(event.model_dump_json()),
        "metadata": {"hospital": HOSPITAL, "correlation_id": "c", "causation_id": "c"},
        "recorded_at": datetime.now(UTC),
    }


def _setup(before: bool) -> tuple[PartitionWorker, OutboxRelay, Incoming, dict[str, Any]]:
    dispatcher = _Dispatcher(
        _UnitBefore if before else UnitOfWork, _StoreBefore if before else EventStore
    )
    worker_type = _WorkerBefore if before else PartitionWorker
    js: Any = _Js()
    worker = worker_type("bench", 0, dispatcher, js, Settings(), "bench")  # type: ignore[arg-type]
    relay = (_RelayBefore if before else OutboxRelay)("bench", js)
    incoming = Incoming(
        subject=f"post.{HOSPITAL}.evt.ReferralCreated",
        hospital=HOSPITAL,
        kind="evt",
        type="ReferralCreated",
        body=b"{}",
        stream_seq=1,
        attempt=1,
        stored_at=None,
    )
    return worker, relay, incoming, _row(dispatcher.event)


async def _round(before: bool, messages: int) -> float:
    worker, relay, incoming, row = _setup(before)
    conn: Any = _Conn()
    started = time.perf_counter()
    for _ in range(messages):
        await worker._dispatch(conn, incoming)
        await relay._publish(row)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / messages


async def measure(messages: int, rounds: int) -> dict[str, Any]:
    assert tracing.TRACER is None, "tracing must be off (no OTEL_* variables)"
    await _round(True, messages // 10)  # warm up both
    await _round(False, messages // 10)
    ratios, befores, offs = [], [], []
    for n in range(rounds):  # interleaved, each first in every other round
        if n % 2:
            off = await _round(False, messages)
            before = await _round(True, messages)
        else:
            before = await _round(True, messages)
            off = await _round(False, messages)
        befores.append(before)
        offs.append(off)
        ratios.append(off / before)
    return {
        "messages_per_round": messages,
        "rounds": rounds,
        "before_us_per_message": round(statistics.median(befores) * 1e6, 2),
        "off_us_per_message": round(statistics.median(offs) * 1e6, 2),
        "ratio_off_vs_before": round(statistics.median(ratios), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_off", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.messages, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
