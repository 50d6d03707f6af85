"""The records service: outreach outcomes, de-identified interactions and survey responses."""

from __future__ import annotations

from pathlib import Path

from services.records import handlers, views
from shared.service import Service

service = Service(
    "records",
    command_handlers={
        "RecordOutreach": handlers.record_outreach,
        "RecordInteraction": handlers.record_interaction,
        "SubmitSurveyResponse": handlers.submit_survey_response,
    },
    event_handlers={
        "HospitalRegistered": handlers.hospital_registered,
        "DepartmentLaunched": handlers.department_launched,
        "DepartmentClosed": handlers.department_closed,
        "ReferralCreated": handlers.referral_created,
        "SupporterAssigned": handlers.supporter_assigned,
    },
    migrations=Path(__file__).parent / "migrations",
    routers=[views.router],
)
main = service.main
