"""The POST study replayed through the running platform reproduces the paper's figures.

`simulate post-2023` speaks only the contract, through NATS; the figures are read back from the
analytics service's GET /reaim. Region scope must hold the 2-hospital system alone, so this
module runs its own platform (servers and the four services) rather than the shared `stack`,
where other tests' hospitals would count too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from postctl import paper, showcase
from postctl.simulate import post_2023_scenario, run_post_2023
from shared.client import wait_consumed
from shared.runtime import Platform
from shared.settings import Settings
from tests.conftest import dedicated_platform, region_token_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def post_platform() -> Iterator[Platform]:
    with dedicated_platform("post-2023-") as platform:
        yield platform


@pytest.fixture(scope="module")
async def analytics(post_platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    port = post_platform.service_ports["analytics"]
    headers = {"Authorization": f"Bearer {region_token_for(post_platform)}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers
    ) as http:
        yield http


@pytest.fixture(scope="module")
async def replayed(post_platform: Platform) -> dict[str, Any]:
    summary = await run_post_2023(post_platform.nats_url)
    # Every answer of the replay is in the stream: wait until analytics has read it all.
    await wait_consumed(post_platform.nats_url, "analytics", db_url=post_platform.db_url)
    return summary


async def reaim_when_caught_up(
    http: httpx.AsyncClient, params: dict[str, str] | None = None
) -> dict[str, Any]:
    """GET /reaim (the `replayed` fixture has waited for the projection)."""
    response = await http.get("/reaim", params=params)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def mismatches(answer: dict[str, Any]) -> list[str]:
    return [
        f"{r.label}: paper {r.paper}, expected {r.expected}, platform {r.platform}"
        for r in paper.compare(answer)
        if not r.match
    ]


async def test_replay_sends_every_command_of_the_scenario(replayed: dict[str, Any]) -> None:
    scenario = post_2023_scenario()
    assert replayed["commands"] == scenario.command_count()
    assert replayed["by_type"]["RecordInteraction"] == 306
    assert replayed["by_type"]["RecordOutreach"] == 40
    assert replayed["by_type"]["SubmitSurveyResponse"] == 75
    assert replayed["referrals_without_supporter"] == 0


async def test_reaim_without_a_period_matches_the_paper(
    replayed: dict[str, Any], analytics: httpx.AsyncClient
) -> None:
    answer = await reaim_when_caught_up(analytics)
    assert mismatches(answer) == [], paper.format_table(paper.compare(answer))
    assert [m["month"] for m in answer["reach"]["monthly"]][::35] == ["2019-06", "2022-05"]


async def test_reaim_over_the_study_period_matches_the_paper(
    replayed: dict[str, Any], analytics: httpx.AsyncClient
) -> None:
    start, end = paper.PERIOD
    answer = await reaim_when_caught_up(analytics, {"from": start, "to": end})
    assert mismatches(answer) == [], paper.format_table(paper.compare(answer))


async def test_each_hospital_holds_its_part(
    replayed: dict[str, Any], analytics: httpx.AsyncClient
) -> None:
    await reaim_when_caught_up(analytics)
    parts = []
    for hospital in paper.HOSPITALS:
        response = await analytics.get(f"/reaim/{hospital}")
        response.raise_for_status()
        parts.append(response.json())
    assert sum(p["reach"]["interactions"] for p in parts) == 306
    assert sum(p["reach"]["supporters_trained"] for p in parts) == 59
    assert sum(p["adoption"]["departments_launched"] for p in parts) == 11
    assert sum(p["reach"]["eligible_physicians"] for p in parts) == 530


async def test_rebuild_gives_the_same_answer(
    replayed: dict[str, Any], post_platform: Platform, analytics: httpx.AsyncClient
) -> None:
    from services.analytics.rebuild import rebuild

    before = await reaim_when_caught_up(analytics)
    await rebuild(Settings(nats_url=post_platform.nats_url, database_url=post_platform.db_url))
    after = await reaim_when_caught_up(analytics)
    assert after == before
    assert mismatches(after) == []


async def test_replaying_again_changes_nothing(
    replayed: dict[str, Any], post_platform: Platform, analytics: httpx.AsyncClient
) -> None:
    """Command ids derive from the scenario: a second replay is deduplicated, not doubled."""
    from postctl.simulate import SimulationError

    before = await reaim_when_caught_up(analytics)
    # The platform answers nothing to commands it has already handled, so a fresh client
    # waits in vain: the replay stops with a clear error instead of double counting.
    with pytest.raises(SimulationError, match="already sent"):
        await asyncio.wait_for(_replay_quickly(post_platform.nats_url), 60)
    after = await reaim_when_caught_up(analytics)
    assert after == before


async def _replay_quickly(nats_url: str) -> dict[str, Any]:
    from postctl.simulate import Driver
    from shared.client import PlatformClient

    client = await PlatformClient.connect(nats_url)
    try:
        return await Driver(client, post_2023_scenario(), timeout=3.0).drive()
    finally:
        await client.close()


async def test_the_demos_showcase_of_contract_1_1_leaves_the_papers_figures(
    replayed: dict[str, Any], post_platform: Platform, analytics: httpx.AsyncClient
) -> None:
    """`make demo` shows a policy, an availability, a FHIR report and a forgotten physician
    after the figures; the next `make demo` on the same data must still match the paper."""
    lines = await showcase.run(
        post_platform.nats_url,
        str(analytics.base_url).rstrip("/"),
        region_token_for(post_platform, "showcase"),
    )
    assert any("-> PhysicianForgotten forgotten-" in line for line in lines), lines
    assert any(line.endswith("after forgetting: unchanged") for line in lines), lines
    assert "SetMatchingPolicy same_department -> MatchingPolicySet" in "\n".join(lines)
    assert any("-> SupporterAvailabilityChanged" in line for line in lines)
    assert sum("RequestReferral ae-" in line for line in lines) == 2
    await wait_consumed(post_platform.nats_url, "analytics", db_url=post_platform.db_url)
    answer = await reaim_when_caught_up(analytics)
    assert mismatches(answer) == [], paper.format_table(paper.compare(answer))
    assert (
        answer["implementation"]["supporters_available"]
        == (answer["maintenance"]["supporters_active"])
    )
