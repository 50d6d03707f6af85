"""Bad input for `SetMatchingPolicy` and `SetSupporterAvailability` (CONTRACT.md 1.1).

The mutations, the onboarded tenant and the checks are test_bad_input.py's: every bad
command is answered with a `CommandRejected` and its reason code, nothing is stored for it, and
every service stays healthy. This file gives the two commands their valid payloads (the
mutations start from them) and adds the values only they can get wrong: a policy that is not
one of the three, a cap outside 1..50, a change dated before the training, a department never
launched, a supporter never trained.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import tests.badinput.test_bad_input as suite
from shared.client import PlatformClient
from shared.contracts import ReasonCode, cmd_subject, encode, make_cloudevent
from shared.runtime import Platform
from tests.badinput.test_bad_input import Tenant, tenant  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

# Valid for the onboarded tenant: its department, and its supporter trained on 2024-01-15.
NEW_BASE: dict[str, dict[str, Any]] = {
    "SetMatchingPolicy": {"policy": "other_department", "department": suite.DEPARTMENT},
    "SetSupporterAvailability": {
        "supporter_id": suite.SUPPORTER,
        "available": False,
        "max_open_assignments": 3,
        "changed_on": "2024-06-01",
    },
}


@pytest.fixture
def new_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's mutations, drawn from these two commands' valid payloads too."""
    for type_, payload in NEW_BASE.items():
        monkeypatch.setitem(suite.BASE, type_, payload)
    monkeypatch.setattr(suite, "DATE_FIELDS", suite.DATE_FIELDS | {"changed_on"})


async def refused_and_nothing_left(
    client: PlatformClient,
    stack: Platform,
    tenant: Tenant,  # noqa: F811
    cases: list[tuple[str, dict[str, Any], str]],
) -> None:
    """Send (type, payload, expected reason code) at once; each is refused with its code."""
    h = tenant.hospital
    sent = [(str(uuid.uuid4()), t, p, reason) for t, p, reason in cases]
    messages = []
    reasons = {}
    for command_id, type_, payload, reason in sent:
        ce = make_cloudevent(
            type_=type_, source=f"/hospitals/{h}/badinput", data=payload, id_=command_id
        )
        body = encode(ce)
        messages.append((cmd_subject(h, type_), body, command_id))
        # A body beyond the size limit is refused for that before it is read.
        too_large = suite.expected_reason("", body) == ReasonCode.payload_too_large
        reasons[id(payload)] = ReasonCode.payload_too_large if too_large else reason
    await suite.publish_all(client, messages)
    got = await suite.answers(client, [s[0] for s in sent])
    suite.check_rejections(
        h, [(c, t, p) for c, t, p, _ in sent], got, lambda payload: reasons[id(payload)]
    )
    await suite.still_healthy_and_nothing_stored(client, stack, tenant)


@pytest.mark.parametrize("mutation", sorted(suite.MUTATIONS))
async def test_bad_policy_and_availability_payloads_are_refused_and_leave_nothing(
    mutation: str,
    client: PlatformClient,
    stack: Platform,
    tenant: Tenant,  # noqa: F811
    new_commands: None,
) -> None:
    # A policy has no date: its bad values are below.
    types = [
        t for t in sorted(NEW_BASE) if (t, mutation) != ("SetMatchingPolicy", "bad_timestamps")
    ]
    drawn = suite.payload_cases(mutation, types, max_examples=40)
    reason = suite.expected_reason(mutation)
    await refused_and_nothing_left(client, stack, tenant, [(t, p, reason) for t, p in drawn])


def _policy(**changes: Any) -> tuple[str, dict[str, Any]]:
    return "SetMatchingPolicy", {**NEW_BASE["SetMatchingPolicy"], **changes}


def _availability(**changes: Any) -> tuple[str, dict[str, Any]]:
    return "SetSupporterAvailability", {**NEW_BASE["SetSupporterAvailability"], **changes}


async def test_values_only_these_commands_can_get_wrong_are_refused(
    client: PlatformClient,
    stack: Platform,
    tenant: Tenant,  # noqa: F811
) -> None:
    invalid = ReasonCode.invalid_payload
    cases = [
        *[
            (*_policy(policy=p), invalid)
            for p in ["same-department", "SAME_DEPARTMENT", "", "none", "other_departments"]
        ],
        (*_policy(department="Emergency Medicine"), invalid),
        *[(*_availability(max_open_assignments=n), invalid) for n in [0, -1, 51, 10**9]],
        (*_availability(max_open_assignments=2.5), invalid),
        (*_availability(changed_on="2023-12-31"), invalid),  # before the training
        (*_availability(available="false"), invalid),
        (*_policy(department="never-launched"), ReasonCode.unknown_department),
        (*_availability(supporter_id="never-trained"), ReasonCode.unknown_supporter),
    ]
    await refused_and_nothing_left(client, stack, tenant, cases)
