"""Forgetting holds through a hospital's durable consumer (CONTRACT.md 1.2 and 1.1).

The hospital's system is down while one of its physicians is referred and then forgotten.
When it comes back and reads its consumer `hospital-<id>` with its own key, the events that
named the physician are gone from the stream and are never delivered; the redacted copy of
the `ReferralCreated` is, and so is `PhysicianForgotten`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from shared import hospitals
from shared.client import HospitalKeys, PlatformClient
from shared.contracts import (
    STREAM_NAME,
)
from shared.runtime import Platform
from tests.e2e.test_forgetting_e2e import referred_then_forgotten

pytestmark = pytest.mark.e2e


async def test_a_forgotten_physician_never_reaches_a_hospital_that_was_away(
    stack: Platform, hospital: str, tmp_path: Path
) -> None:
    assert stack.nats is not None
    seed = await HospitalKeys(stack.nats.tenants_file, tmp_path / "seeds").seed(hospital)
    physician = f"phys-{uuid.uuid4().hex}"
    platform = await PlatformClient.connect(stack.nats_url)  # the hospital's system is away
    try:
        await hospitals.ensure_consumer(platform.js, hospital)
        forgotten = await referred_then_forgotten(platform, stack, hospital, physician, "Away")
    finally:
        await platform.close()

    nc = await nats.connect(stack.nats_url, nkeys_seed=str(seed), inbox_prefix=f"_INBOX_{hospital}")
    delivered: list[bytes] = []
    try:
        sub = await nc.jetstream().pull_subscribe_bind(
            hospitals.consumer_name(hospital), stream=STREAM_NAME
        )
        while True:
            try:
                msgs = await sub.fetch(50, timeout=2.0)
            except (NatsTimeoutError, TimeoutError):
                break
            for msg in msgs:
                delivered.append(msg.data)
                await msg.ack()
    finally:
        await nc.close()
    assert not [d for d in delivered if physician.encode() in d]
    events = [json.loads(d) for d in delivered]
    types = [e["type"] for e in events]
    created = [e for e in events if e["type"] == "ReferralCreated"]
    assert [e["data"]["referral_id"] for e in created] == ["r-1"]  # the redacted copy, once
    assert forgotten["id"] in {e["id"] for e in events}
    assert types[:3] == ["HospitalRegistered", "DepartmentLaunched", "SupporterTrained"]
