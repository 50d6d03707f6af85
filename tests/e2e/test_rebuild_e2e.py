"""`postctl analytics rebuild` without downtime (issue #15): the old read models answer while
the new ones are built, and nothing the live consumer handles meanwhile is lost in the swap."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date
from typing import Any

import httpx
import pytest

from shared.client import PlatformClient, wait_consumed
from shared.contracts import LaunchDepartment, RegisterHospital, SubmitSurveyResponse
from shared.runtime import SERVICES, Platform
from shared.settings import Settings
from tests.conftest import region_token_for

pytestmark = pytest.mark.e2e

DEPARTMENT = "icu"


def survey(n: int) -> SubmitSurveyResponse:
    return SubmitSurveyResponse(
        response_id=f"q{n}-{uuid.uuid4().hex[:6]}",
        department=DEPARTMENT,
        submitted_on=date(2025, 5, 1),
        aware=True,
        had_interaction=True,
    )


async def test_a_rebuild_answers_throughout_and_loses_nothing_handled_meanwhile(
    client: PlatformClient, stack: Platform, hospital: str
) -> None:
    from services.analytics.rebuild import rebuild

    h = hospital
    for command, answer in (
        (RegisterHospital(name="Rebuilt", physician_count=20), "HospitalRegistered"),
        (
            LaunchDepartment(
                department=DEPARTMENT, physician_count=20, launched_on=date(2025, 1, 1)
            ),
            "DepartmentLaunched",
        ),
    ):
        assert (await client.send_and_wait(h, command, timeout=30))["type"] == answer
    for n in range(20):
        assert (await client.send_and_wait(h, survey(n), timeout=30))["type"] == (
            "SurveyResponseRecorded"
        )
    for service in SERVICES:
        await wait_consumed(stack.nats_url, service)
    url = f"http://127.0.0.1:{stack.service_ports['analytics']}"
    headers = {"Authorization": f"Bearer {region_token_for(stack, 'rebuild')}"}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as web:

        async def respondents() -> int:
            resp = await web.get(f"/reaim/{h}")
            assert resp.status_code == 200, resp.text
            answer: dict[str, Any] = resp.json()
            return int(answer["effectiveness"]["respondents_with_interaction"])

        assert await respondents() == 20
        task = asyncio.create_task(
            rebuild(Settings(nats_url=stack.nats_url, database_url=stack.db_url))
        )
        seen, sent = [], 20
        while not task.done():  # answers all along, never fewer than before (no empty models)
            seen.append(await respondents())
            if sent < 40:
                await client.send(h, survey(sent))
                sent += 1
            await asyncio.sleep(0.02)
        summary = await task
        assert summary["swap_attempts"] >= 1
        assert seen and min(seen) >= 20, seen
        while sent < 40:
            await client.send(h, survey(sent))
            sent += 1
        await wait_consumed(stack.nats_url, "records")
        await wait_consumed(stack.nats_url, "analytics")
        for _ in range(100):
            if await respondents() == 40:
                break
            await asyncio.sleep(0.1)
        assert await respondents() == 40
