"""The analytics service: every contract event into RE-AIM fact tables, figures over HTTP and
as Prometheus gauges. It consumes every hospital's events and appends none of its own."""

from __future__ import annotations

from pathlib import Path

from services.analytics import dashboard, gauges, handlers, views
from shared.service import Service

service = Service(
    "analytics",
    event_handlers={event_type: handlers.project_event for event_type in handlers.PROJECTIONS},
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router, dashboard.router],
    background=[gauges.refresh_gauges],  # registers the metrics, then refreshes
    description=(
        "RE-AIM read models of the POST program (CONTRACT.md): reach, effectiveness, adoption,"
        " implementation and maintenance at region, hospital and department scope, for any"
        " period, computed from fact tables the projection keeps from every contract event."
    ),
)
main = service.main
