"""The matching service: the registry, the supporter roster, assignment and the 48-hour timer."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

from services.matching import background, handlers, views
from shared.service import Running, Service


def overdue_timer(running: Running) -> Awaitable[None]:
    """The 48-hour timer (background.OverdueTimer), given what it uses."""

    def held() -> list[int] | None:  # without partitions (no consumer): every hospital
        return running.partitions if running.ownership is not None else None

    timer = background.OverdueTimer(running.pool, running.unit_of_work, running.clock, held)
    return timer.run(running.settings.timer_interval)


service = Service(
    "matching",
    command_handlers={
        "RegisterHospital": handlers.register_hospital,
        "LaunchDepartment": handlers.launch_department,
        "CloseDepartment": handlers.close_department,
        "RegisterSupporter": handlers.register_supporter,
        "RetireSupporter": handlers.retire_supporter,
        "SetMatchingPolicy": handlers.set_matching_policy,
        "SetSupporterAvailability": handlers.set_supporter_availability,
    },
    event_handlers={
        "ReferralCreated": handlers.referral_created,
        "OutreachAccepted": handlers.outreach_recorded,
        "OutreachDeclined": handlers.outreach_recorded,
        "OutreachUnreachable": handlers.outreach_recorded,
        "InteractionCompleted": handlers.outreach_recorded,
        "PhysicianForgotten": handlers.physician_forgotten,
    },
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router],
    background=[overdue_timer],
    description=(
        "Hospitals, departments, the trained supporter roster, their availability and the"
        " matching policies; every ReferralCreated becomes a SupporterAssigned (due in 48 hours)"
        " or a NoSupporterAvailable; overdue assignments are reassigned."
    ),
)
main = service.main
