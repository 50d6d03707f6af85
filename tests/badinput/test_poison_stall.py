"""A poison message costs one answer, not minutes of a partition (issue 21).

On main before the fix, a command carrying an array nested 10,000 levels deep failed with
`RecursionError` in parsing, was taken for a passing failure, retried 20 times and
dead-lettered after about 6 minutes without an answer. Meanwhile every refusal that waits for
the platform to settle (`unknown_referral`, ...) waited as long, for every hospital of its
partition. These tests give each a bound of seconds.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from shared.client import PlatformClient
from shared.contracts import (
    RecordOutreach,
    RegisterHospital,
    cmd_subject,
    make_cloudevent,
)
from shared.partitions import partition_of

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

DEPTH = 10_000
# Far below the retry path's minutes, far above an answer's seconds (a busy CI machine).
BOUND = 45.0


def deep_command(hospital: str, type_: str, field: str) -> tuple[bytes, str]:
    """A CloudEvent whose `data.<field>` is an array nested DEPTH levels deep."""
    ce = make_cloudevent(type_=type_, source=f"/hospitals/{hospital}/system", data={field: "@"})
    text = json.dumps(ce, separators=(",", ":"))
    body = text.replace('"@"', "[" * DEPTH + "]" * DEPTH)
    return body.encode(), ce["id"]


def neighbour_of(hospital: str) -> str:
    """Another hospital id hashed to the same partition."""
    while True:
        other = f"h-{uuid.uuid4().hex[:10]}"
        if partition_of(other) == partition_of(hospital):
            return other


async def test_a_deeply_nested_command_is_answered_at_once(
    client: PlatformClient, hospital: str
) -> None:
    await client.send_and_wait(hospital, RegisterHospital(name="Deep General", physician_count=9))
    body, command_id = deep_command(hospital, "CloseDepartment", "department")
    await client.send_raw(cmd_subject(hospital, "CloseDepartment"), body, msg_id=command_id)
    answer = await client.outcome(command_id, timeout=BOUND)
    assert answer["type"] == "CommandRejected"
    assert answer["data"]["command_id"] == command_id


async def test_a_poison_message_holds_back_no_refusal_of_its_partition(
    client: PlatformClient, hospital: str
) -> None:
    """The next command of the same hospital, and a neighbour's in the same partition, that
    are refused for want of a fact nobody sent, are refused within seconds."""
    neighbour = neighbour_of(hospital)
    body, command_id = deep_command(hospital, "RecordOutreach", "referral_id")
    await client.send_raw(cmd_subject(hospital, "RecordOutreach"), body, msg_id=command_id)
    outreach = RecordOutreach(
        referral_id="r-never-sent",
        supporter_id="s-1",
        outcome="accepted",
        at=datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
    )
    mine = await client.send(hospital, outreach)
    theirs = await client.send(neighbour, outreach)
    for waited in (command_id, mine, theirs):
        answer = await client.outcome(waited, timeout=BOUND)
        assert answer["type"] == "CommandRejected", answer
