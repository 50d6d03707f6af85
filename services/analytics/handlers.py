"""The analytics service's one handler: every contract event becomes its fact row
(projection.py), counted for the gauges (gauges.py). It appends no events of its own."""

from __future__ import annotations

from services.analytics import gauges, projection
from shared.contracts import Event
from shared.unit_of_work import UnitOfWork

# The event types the service consumes: every contract event but CommandRejected.
PROJECTIONS = projection.PROJECTIONS


async def project_event(event: Event, uow: UnitOfWork) -> None:
    """Shared has recorded the message in `processed`, in the same transaction."""
    await projection.project(uow.conn, event, uow.stream_seq, uow.message_id)
    gauges.projected(event)
