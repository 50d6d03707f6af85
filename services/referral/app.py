"""The referral service: intake of referrals (NATS and HTTP) and where each one stands."""

from __future__ import annotations

from pathlib import Path

from services.referral import forgetting, handlers, views
from shared import hospitals
from shared.service import Service
from shared.webhook_delivery import delivery as webhook_delivery

service = Service(
    "referral",
    command_handlers={
        "RequestReferral": handlers.request_referral,
        "ForgetPhysician": forgetting.forget_physician,
    },
    # Its own PhysicianForgotten too, read back: a forget holds again after PostgreSQL was
    # restored from a backup taken before it (docs/decisions.md, "Backup and restore").
    event_handlers={
        **handlers.EVENT_HANDLERS,
        "PhysicianForgotten": forgetting.physician_forgotten,
    },
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router],
    # The hospitals' webhooks are delivered by the instance holding their partition; and the
    # referral service, every hospital's front door, reports how far each hospital is behind
    # on its durable consumer (each hospital by the holder of its partition).
    background=[
        forgetting.scrubber,
        forgetting.retention_timer,
        webhook_delivery,
        hospitals.pending_gauge,
    ],
    # The front door also answers commands of a type no service owns (CONTRACT.md: never
    # silence): a CommandRejected, invalid_payload.
    answers_unknown_commands=True,
    description=(
        "Intake of self, third-party and safety-event referrals (`RequestReferral`), "
        "the status of each referral as the other services move it, and forgetting a physician"
        " (`ForgetPhysician`, retention)."
    ),
)
main = service.main
