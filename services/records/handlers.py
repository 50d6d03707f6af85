"""Records handlers: one per command or event. Load, decide (domain), append."""

from __future__ import annotations

from datetime import UTC

import structlog
from prometheus_client import Counter, Histogram

from services.records import domain, store
from shared import registry
from shared.contracts import (
    Event,
    InteractionCompleted,
    RecordInteraction,
    RecordOutreach,
    ReferralCreated,
    SubmitSurveyResponse,
    SupporterAssigned,
    SurveyResponseRecorded,
)
from shared.unit_of_work import UnitOfWork

log = structlog.get_logger()

# --- metrics --------------------------------------------------------------------------------

OUTREACH = Counter(
    "post_records_outreach_total",
    "Outreach outcomes recorded, by outcome and decline reason ('' when none)",
    ["hospital", "outcome", "decline_reason"],
)
INTERACTION_MINUTES = Histogram(
    "post_records_interaction_minutes",
    "Length of completed peer support interactions, in minutes",
    ["hospital"],
    buckets=(5, 10, 15, 30, 45, 60, 90, 120, 180, 240, 360, 600),
)
SURVEY_RESPONSES = Counter(
    "post_records_survey_responses_total",
    "Survey responses recorded (a repeated response counts once)",
    ["hospital"],
)


# --- what records learns from other services ------------------------------------------------


# What matching tells records about hospitals and departments: the one rule of shared/registry
# (the names app.py wires).
hospital_registered = department_launched = department_closed = registry.record


async def referral_created(event: ReferralCreated, uow: UnitOfWork) -> None:
    await store.referral_created(uow.conn, uow.hospital, event)


async def supporter_assigned(event: SupporterAssigned, uow: UnitOfWork) -> None:
    await store.supporter_assigned(uow.conn, uow.hospital, event)


# --- commands -------------------------------------------------------------------------------


async def record_outreach(cmd: RecordOutreach, uow: UnitOfWork) -> None:
    stream = domain.outreach_stream(uow.hospital, cmd.referral_id)
    history, version = await uow.load(stream)
    referral = await store.referral(uow.conn, uow.hospital, cmd.referral_id)
    # Raises NotYetKnown (the consumer retries it) while the facts it needs are on their way.
    events = domain.record_outreach(uow.hospital, cmd, referral, history, uow.now())
    await uow.append(stream, version, events)
    OUTREACH.labels(uow.hospital, cmd.outcome, cmd.decline_reason or "").inc()
    log.info("outreach_recorded", outcome=cmd.outcome)


async def record_interaction(cmd: RecordInteraction, uow: UnitOfWork) -> None:
    stream = domain.outreach_stream(uow.hospital, cmd.referral_id)
    history, version = await uow.load(stream)
    referral = await store.referral(uow.conn, uow.hospital, cmd.referral_id)
    events = domain.record_interaction(
        uow.hospital, cmd, referral, history, uow.now().astimezone(UTC).date()
    )
    await uow.append(stream, version, events)
    INTERACTION_MINUTES.labels(uow.hospital).observe(cmd.minutes)
    completed = [e for e in events if isinstance(e, InteractionCompleted)]
    log.info("interaction_recorded", follow_up=any(e.follow_up for e in completed))


async def submit_survey_response(cmd: SubmitSurveyResponse, uow: UnitOfWork) -> None:
    stream = domain.survey_stream(uow.hospital, cmd.response_id)
    history, version = await uow.load(stream)
    known = await registry.lookup(uow.conn, uow.hospital, cmd.department)
    program = domain.Program(
        hospital_registered=known.hospital_registered,
        department_launched=known.department is not None and known.department.launched,
    )
    events: list[Event] = domain.submit_survey_response(
        uow.hospital, cmd, program, history, uow.now().astimezone(UTC).date()
    )
    if not events:
        log.info("survey_response_repeated")
        await uow.repeat(next(e for e in history if isinstance(e, SurveyResponseRecorded)))
        return
    await uow.append(stream, version, events)
    SURVEY_RESPONSES.labels(uow.hospital).inc()
    log.info("survey_response_recorded")
