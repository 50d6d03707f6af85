"""`postctl simulate region --straight`: the region's facts written straight into the stream,
each a valid contract event, every one stored (issue #15: a national region in minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import nats
import pytest

from postctl.simulate import straight
from postctl.simulate.region import region_scenarios
from shared.contracts import STREAM_NAME, parse_envelope, parse_event, parse_subject
from shared.runtime import Platform


@pytest.fixture
def servers() -> Iterator[Platform]:
    """NATS and PostgreSQL of its own: these facts must not reach the shared servers' stream,
    which other tests' analytics read whole."""
    plat = Platform.on_free_ports("post-straight-", {})
    try:
        plat.start_servers()
        yield plat
    finally:
        plat.stop()
        shutil.rmtree(plat.data_dir, ignore_errors=True)


async def test_the_straight_region_is_stored_whole_and_every_message_is_a_contract_event(
    servers: Platform,
) -> None:
    platform = servers
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        env = {**os.environ, "POST_NATS_URL": platform.nats_url}
        ran = subprocess.run(
            [
                sys.executable,
                "-m",
                "postctl",
                "simulate",
                "region",
                "--straight",
                "--hospitals",
                "3",
                "--years",
                "1",
                "--seed",
                "5",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        summary = json.loads(ran.stdout)
        expected = sum(straight.count_events(p) for p in region_scenarios(3, 1, 5))
        assert summary["events"] == expected > 0
        last = (await js.stream_info(STREAM_NAME)).state.last_seq
        checked = 0
        for seq in range(last - expected + 1, last + 1):
            msg = await js.get_msg(STREAM_NAME, seq)
            hospital, kind, type_ = parse_subject(msg.subject)
            assert kind == "evt"
            event = parse_event(type_, parse_envelope(msg.data).data)
            assert event.hospital == hospital
            checked += 1
        assert checked == expected
    finally:
        await nc.close()
