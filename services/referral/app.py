"""The referral service: intake of referrals (NATS and HTTP) and where each one stands."""

from __future__ import annotations

from collections.abc import Awaitable
from functools import partial
from pathlib import Path

from services.referral import background, handlers, views
from shared import hospitals
from shared.service import Running, Service
from shared.webhook_delivery import delivery

# The forget jobs' scrubber: a forget (the command, the retention sweep) wakes it.
scrubber = background.Scrubber()


# The background tasks, each given what it uses of the running instance.


def forget_jobs(running: Running) -> Awaitable[None]:
    """The stream's half of every forget (background.Scrubber)."""
    return scrubber.run(running.pool, running.js, running.settings.forget_erase_delay)


def retention(running: Running) -> Awaitable[None]:
    """The retention sweep (background.RetentionSweep)."""
    sweep = background.RetentionSweep(
        running.pool, running.unit_of_work, running.clock, running.owns, scrubber.wake
    )
    return sweep.run(running.settings.retention_interval)


def webhook_delivery(running: Running) -> Awaitable[None]:
    """The hospitals' webhooks (shared/webhook_delivery.py), by the holder of each partition."""
    return delivery(
        running.js, running.settings, lambda: running.partitions, lambda: running.instance
    )


def hospitals_pending(running: Running) -> Awaitable[None]:
    """How far each hospital is behind on its durable consumer (shared/hospitals.py)."""
    gauge = hospitals.PendingGauge(running.js, running.owns)
    return gauge.run(min(5.0, running.settings.timer_interval * 5))


service = Service(
    "referral",
    command_handlers={
        "RequestReferral": handlers.request_referral,
        "ForgetPhysician": partial(handlers.forget_physician, queued=scrubber.wake),
    },
    # Its own PhysicianForgotten too, read back: a forget holds again after PostgreSQL was
    # restored from a backup taken before it (docs/decisions.md, "Backup and restore").
    event_handlers={
        **handlers.EVENT_HANDLERS,
        "PhysicianForgotten": partial(handlers.physician_forgotten, queued=scrubber.wake),
    },
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router],
    # The hospitals' webhooks are delivered by the instance holding their partition; and the
    # referral service, every hospital's front door, reports how far each hospital is behind
    # on its durable consumer (each hospital by the holder of its partition).
    background=[
        forget_jobs,
        retention,
        webhook_delivery,
        hospitals_pending,
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
