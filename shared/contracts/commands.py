"""The commands of CONTRACT.md: what a hospital publishes on ``post.{hospital}.cmd.{Type}``;
`owner` is the service that answers it."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from shared.contracts.base import (
    Command,
    DeclineReason,
    DepartmentId,
    EventNature,
    MatchingPolicy,
    Outcome,
    PseudonymousId,
    Rank,
    Score,
    Source,
)


class RegisterHospital(Command):
    owner = "matching"
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    physician_count: Annotated[int, Field(ge=0, le=1_000_000)]


class LaunchDepartment(Command):
    owner = "matching"
    department: DepartmentId
    physician_count: Annotated[int, Field(ge=0, le=1_000_000)]
    launched_on: date


class CloseDepartment(Command):
    owner = "matching"
    department: DepartmentId
    closed_on: date


class RegisterSupporter(Command):
    owner = "matching"
    supporter_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    interventional: bool
    trained_on: date


class RetireSupporter(Command):
    owner = "matching"
    supporter_id: PseudonymousId
    retired_on: date


class SetMatchingPolicy(Command):
    """Version 1.1: without `department` the hospital's policy, with one that department's."""

    owner = "matching"
    policy: MatchingPolicy
    department: DepartmentId | None = None


class SetSupporterAvailability(Command):
    """Version 1.1: pause or resume a supporter, and cap their open assignments."""

    owner = "matching"
    supporter_id: PseudonymousId
    available: bool
    max_open_assignments: Annotated[int, Field(ge=1, le=50)] | None = None
    changed_on: date


class RequestReferral(Command):
    owner = "referral"
    referral_id: PseudonymousId
    physician_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    source: Source
    event_nature: EventNature
    requested_at: AwareDatetime
    referrer_id: PseudonymousId | None = None
    assign_to: PseudonymousId | None = None
    # Added (optional): the safety report's id, so one physician named twice in the same
    # safety event is referred once. Without it, (referrer_id, requested_at) identify it.
    safety_event_id: PseudonymousId | None = None


class ForgetPhysician(Command):
    """Version 1.1: forget a physician (and the same id as referrer) everywhere the platform
    keeps data; answered with `PhysicianForgotten`, which does not carry the id."""

    owner = "referral"
    physician_id: PseudonymousId
    requested_on: date


class RecordOutreach(Command):
    owner = "records"
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    outcome: Outcome
    at: AwareDatetime
    decline_reason: DeclineReason | None = None


class RecordInteraction(Command):
    owner = "records"
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    occurred_on: date
    minutes: Annotated[int, Field(ge=1, le=600)]
    escalated: bool | None = None


class SubmitSurveyResponse(Command):
    owner = "records"
    response_id: PseudonymousId
    department: DepartmentId
    submitted_on: date
    aware: bool
    had_interaction: bool
    helpful: Score | None = None
    wellbeing_improved: bool | None = None
    comfort_improved: bool | None = None
    would_recommend: bool | None = None
    satisfaction: Score | None = None


COMMANDS: dict[str, type[Command]] = {
    c.__name__: c
    for c in (
        RegisterHospital,
        LaunchDepartment,
        CloseDepartment,
        RegisterSupporter,
        RetireSupporter,
        RequestReferral,
        ForgetPhysician,
        RecordOutreach,
        RecordInteraction,
        SubmitSurveyResponse,
        SetMatchingPolicy,
        SetSupporterAvailability,
    )
}
