"""The referral service: intake of referrals (NATS and HTTP) and where each one stands."""

from __future__ import annotations

from collections.abc import Awaitable
from functools import partial
from pathlib import Path

from services.referral import background, handlers, views
from shared import hospitals
from shared.service import Service
from shared.webhook_delivery import delivery as webhook_delivery

# The forget jobs' scrubber: a forget (the command, the retention sweep) wakes it.
scrubber = background.Scrubber()


def forget_jobs(service: Service) -> Awaitable[None]:
    """The stream's half of every forget (background.Scrubber)."""
    return scrubber.run(service.pool, service.js, service.settings.forget_erase_delay)


def retention(service: Service) -> Awaitable[None]:
    """The retention sweep (background.RetentionSweep)."""
    sweep = background.RetentionSweep(
        service.pool, service.unit_of_work, service.clock, service.owns, scrubber.wake
    )
    return sweep.run(service.settings.retention_interval)


service = Service(
    "referral",
    command_handlers={
        "RequestReferral": handlers.request_referral,
        "ForgetPhysician": partial(handlers.forget_physician, queued=scrubber.wake),
    },
    event_handlers=handlers.EVENT_HANDLERS,
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router],
    # The hospitals' webhooks are delivered by the instance holding their partition; and the
    # referral service, every hospital's front door, reports how far each hospital is behind
    # on its durable consumer (each hospital by the holder of its partition).
    background=[
        forget_jobs,
        retention,
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
