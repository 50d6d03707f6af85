# GENERATED from the platform's shared/contracts/events.py by clients/python/sync_contracts.py:
# do not edit. The platform's tests compare the JSON Schemas of both, field by field.
"""The events of CONTRACT.md: the facts the platform publishes on ``post.{hospital}.evt.{Type}``."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from post_client.contracts.base import (
    AssignmentReason,
    DeclineReason,
    DepartmentId,
    Event,
    EventNature,
    MatchingPolicy,
    Outcome,
    PseudonymousId,
    Rank,
    Score,
    Source,
)
from post_client.errors import ReasonCode


class HospitalRegistered(Event):
    name: str
    physician_count: int


class DepartmentLaunched(Event):
    department: DepartmentId
    physician_count: int
    launched_on: date


class DepartmentClosed(Event):
    department: DepartmentId
    closed_on: date


class SupporterTrained(Event):
    supporter_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    interventional: bool
    trained_on: date


class SupporterRetired(Event):
    supporter_id: PseudonymousId
    retired_on: date
    department: DepartmentId  # added: the supporter's department


class MatchingPolicySet(Event):
    policy: MatchingPolicy
    department: DepartmentId | None = None


class SupporterAvailabilityChanged(Event):
    supporter_id: PseudonymousId
    available: bool
    max_open_assignments: int | None = None
    changed_on: date
    department: DepartmentId  # added: the supporter's department


class ReferralCreated(Event):
    referral_id: PseudonymousId
    physician_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    source: Source
    event_nature: EventNature
    requested_at: AwareDatetime
    referrer_id: PseudonymousId | None = None
    assign_to: PseudonymousId | None = None
    safety_event_id: PseudonymousId | None = None


class SupporterAssigned(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    department: DepartmentId
    assigned_at: AwareDatetime
    due_at: AwareDatetime
    reason: AssignmentReason


class NoSupporterAvailable(Event):
    referral_id: PseudonymousId
    department: DepartmentId
    reason: str


class AssignmentOverdue(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    due_at: AwareDatetime


class _OutreachRecorded(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    outcome: Outcome
    at: AwareDatetime
    decline_reason: DeclineReason | None = None
    department: DepartmentId  # added: the referral's department


class OutreachAccepted(_OutreachRecorded):
    outcome: Literal["accepted"] = "accepted"


class OutreachDeclined(_OutreachRecorded):
    outcome: Literal["declined"] = "declined"


class OutreachUnreachable(_OutreachRecorded):
    outcome: Literal["unreachable"] = "unreachable"


class InteractionCompleted(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    occurred_on: date
    minutes: int
    escalated: bool = False  # normalised: absent means not escalated
    department: DepartmentId  # added: the referral's department
    follow_up: bool = False  # added: not the referral's first interaction
    implied_acceptance: bool = False  # added: no outreach was recorded before it


class SurveyResponseRecorded(Event):
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


class PhysicianForgotten(Event):
    """Version 1.1: the answer to `ForgetPhysician` (or to a retention sweep). `forget_id` is
    new and opaque; it also stands in for the forgotten id in the physician's referrals, so each
    still counts as the same one physician. Added: the referrals that named the physician, so
    every service (and the hospital) can forget without ever being told the id again."""

    forget_id: PseudonymousId
    requested_on: date
    referral_ids: list[PseudonymousId] = Field(default_factory=list)  # as the physician
    referred_ids: list[PseudonymousId] = Field(default_factory=list)  # as the referrer


class CommandRejected(Event):
    command_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    command_type: str
    reason_code: ReasonCode
    detail: str


EVENTS: dict[str, type[Event]] = {
    e.__name__: e
    for e in (
        HospitalRegistered,
        DepartmentLaunched,
        DepartmentClosed,
        SupporterTrained,
        SupporterRetired,
        ReferralCreated,
        SupporterAssigned,
        NoSupporterAvailable,
        AssignmentOverdue,
        OutreachAccepted,
        OutreachDeclined,
        OutreachUnreachable,
        InteractionCompleted,
        SurveyResponseRecorded,
        CommandRejected,
        MatchingPolicySet,
        PhysicianForgotten,
        SupporterAvailabilityChanged,
    )
}
