"""The analytics service: every contract event into RE-AIM fact tables, figures over HTTP and
as Prometheus gauges. It consumes every hospital's events and appends none of its own."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

from services.analytics import answers, dashboard, gauges, handlers, views
from shared.service import Running, Service


def gauge_refresh(running: Running) -> Awaitable[None]:
    """The RE-AIM gauges (gauges.GaugeRefresh), given what they use."""

    def exports(hospital: str) -> bool:
        # Each instance exports the hospitals it holds, the region the holder of partition 0:
        # a Prometheus sum over instances counts each once.
        return running.owns(hospital) if hospital else 0 in running.partitions

    refresh = gauges.GaugeRefresh(
        running.pool, answers.cache_for(running.name), exports, lambda: running.partitions
    )
    return refresh.run()


service = Service(
    "analytics",
    event_handlers={event_type: handlers.project_event for event_type in handlers.PROJECTIONS},
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router, dashboard.router],
    background=[gauge_refresh],  # registers the metrics, then refreshes
    description=(
        "RE-AIM read models of the POST program (CONTRACT.md): reach, effectiveness, adoption,"
        " implementation and maintenance at region, hospital and department scope, for any"
        " period, computed from fact tables the projection keeps from every contract event."
    ),
)
main = service.main
