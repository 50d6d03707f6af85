"""Each example of clients/python/examples run against the real platform, with the hospital's
own key (and its HTTP token for the FHIR intake), as a hospital would run it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats

from post_client import (
    Hospital,
    LaunchDepartment,
    Rank,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SupporterAssigned,
    connect,
)
from post_client.webhooks import sign

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import fhir_bridge  # noqa: E402
import webhook_receiver  # noqa: E402


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def onboard_with_supporters(kit_platform, hospital_keys, hospital: str) -> Path:  # type: ignore[no-untyped-def]
    on = await hospital_keys.onboard(hospital)
    tool = await connect(hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)
    try:
        await (await tool.send(RegisterHospital(name="Kit", physician_count=50)))
        await (
            await tool.send(
                LaunchDepartment(
                    department="anesthesia", physician_count=20, launched_on=date(2026, 1, 1)
                )
            )
        )
        for supporter in ("s-1", "s-2"):
            await (
                await tool.send(
                    RegisterSupporter(
                        supporter_id=supporter,
                        department="anesthesia",
                        rank=Rank.senior,
                        interventional=True,
                        trained_on=date(2026, 1, 1),
                    )
                )
            )
    finally:
        await tool.stop()
    return on.seed_file


async def test_the_lead_tool_registers_refers_waits_and_records(
    kit_platform, hospital_keys, new_hospital
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    conn = ["--hospital", new_hospital, "--seed", str(on.seed_file)]
    conn += ["--servers", kit_platform.nats_url]
    tool = str(EXAMPLES / "lead_tool.py")

    code, out, err = await run(
        tool, *conn, "setup", "--department", "emergency-medicine",
        "--supporter", "s-1", "--supporter", "s-2", "--on", "2026-01-01",
    )  # fmt: skip
    assert code == 0, err
    assert "supporter s-2 trained" in out

    code, out, err = await run(
        tool, *conn, "refer", "--referral", "r-1", "--physician", "p-1",
        "--department", "emergency-medicine", "--assign-to", "s-2",
    )  # fmt: skip
    assert code == 0, err
    assert "assigned: referral r-1 to supporter s-2 (manual)" in out

    code, out, err = await run(
        tool, *conn, "outreach", "--referral", "r-1", "--supporter", "s-2",
        "--outcome", "accepted",
    )  # fmt: skip
    assert code == 0, err
    assert "outreach recorded: OutreachAccepted" in out

    # A refusal is reported with its reason code, not a traceback.
    code, out, err = await run(
        tool, *conn, "refer", "--referral", "r-2", "--physician", "p-2",
        "--department", "no-such-department",
    )  # fmt: skip
    assert code == 1
    assert "refused: unknown_department" in err


async def referral(hospital: Hospital, referral_id: str) -> None:
    await (
        await hospital.send(
            RequestReferral(
                referral_id=referral_id,
                physician_id=f"p-{referral_id}",
                department="anesthesia",
                rank=Rank.attending,
                source="self",
                event_nature="other",
                requested_at=datetime.now(UTC),
            )
        )
    )


async def read_until(stream: asyncio.StreamReader, pattern: str, lines: list[str]) -> None:
    while not any(pattern in line for line in lines):
        line = await asyncio.wait_for(stream.readline(), timeout=60)
        assert line, f"the listener ended before {pattern!r}: {lines}"
        lines.append(line.decode())


async def test_the_listener_tells_every_assignment_once_across_a_kill(
    kit_platform, hospital_keys, new_hospital, tmp_path
) -> None:
    seed = await onboard_with_supporters(kit_platform, hospital_keys, new_hospital)
    state = tmp_path / "told.txt"
    args = [
        str(EXAMPLES / "assignment_listener.py"),
        *("--hospital", new_hospital, "--seed", str(seed)),
        *("--servers", kit_platform.nats_url, "--state", str(state)),
    ]

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE
        )

    sender = await connect(new_hospital, kit_platform.nats_url, nkeys_seed=seed)
    lines: list[str] = []
    try:
        listener = await start()
        assert listener.stdout is not None
        await referral(sender, "r-1")
        await read_until(listener.stdout, "referral r-1", lines)
        listener.send_signal(signal.SIGKILL)
        await listener.wait()

        await referral(sender, "r-2")  # while the listener is down
        listener = await start()
        assert listener.stdout is not None
        await read_until(listener.stdout, "referral r-2", lines)
        await referral(sender, "r-3")
        await read_until(listener.stdout, "referral r-3", lines)
        listener.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(listener.communicate(), timeout=30)
        lines += rest.decode().splitlines()
        assert listener.returncode == 0
    finally:
        await sender.stop()
    told = [re.search(r"referral (r-\d)", line).group(1) for line in lines if "referral" in line]  # type: ignore[union-attr]
    assert sorted(told) == ["r-1", "r-2", "r-3"]  # each once: none lost, none told twice


async def test_the_webhook_receiver_verifies_and_deduplicates_platform_events(
    kit_platform, hospital_keys, new_hospital, tmp_path
) -> None:
    # Until the platform delivers webhooks itself (h-hooks), sign a real event of the platform
    # exactly as CONTRACT.md "Webhooks" says it is delivered: the same body as on the stream.
    on = await hospital_keys.onboard(new_hospital)
    nc = await nats.connect(kit_platform.nats_url)
    bodies: list[bytes] = []

    async def keep(msg: Any) -> None:
        bodies.append(msg.data)

    sub = await nc.subscribe(f"post.{new_hospital}.evt.>", cb=keep)
    tool = await connect(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)
    await (await tool.send(RegisterHospital(name="Hooked", physician_count=7)))
    await tool.stop()
    while not bodies:
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    await nc.close()
    body = bodies[0]
    webhook_id = json.loads(body)["id"]

    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    handled: list[tuple[str, Any]] = []

    def app() -> Any:
        seen = webhook_receiver.Seen(tmp_path / "seen.sqlite")
        return webhook_receiver.create_app(secret, seen, lambda ce, e: handled.append((ce.id, e)))

    def headers(key: str = secret, stamp: int | None = None) -> dict[str, str]:
        ts = int(time.time()) if stamp is None else stamp
        return {
            "content-type": "application/cloudevents+json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(key, webhook_id, ts, body),
        }

    async def post(application: Any, h: dict[str, str], content: bytes = body) -> int:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
            return (await http.post("/post-events", content=content, headers=h)).status_code

    receiver = app()
    assert await post(receiver, headers()) == 204
    assert [(i, type(e).__name__) for i, e in handled] == [(webhook_id, "HospitalRegistered")]
    assert await post(receiver, headers()) == 204  # sent again: acknowledged, not handled
    assert await post(app(), headers()) == 204  # and after the receiver restarts
    assert len(handled) == 1

    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    assert await post(receiver, headers(key=other)) == 401
    assert await post(receiver, headers(), content=body + b" ") == 401  # body changed
    assert await post(receiver, headers(stamp=int(time.time()) - 3600)) == 401  # a replay
    assert await post(receiver, {"content-type": "application/cloudevents+json"}) == 401
    assert len(handled) == 1


def adverse_event(event_id: str) -> dict[str, Any]:
    recorded = datetime.now(UTC) - timedelta(hours=1)
    return {
        "resourceType": "AdverseEvent",
        "id": event_id,
        "text": {"status": "generated", "div": "<div>Ann Example desaturated</div>"},
        "subject": {"reference": "Patient/MRN-1", "display": "Ann Example"},
        "description": "airway rescued after two attempts",
        "recordedDate": recorded.isoformat(),
        "recorder": {"reference": "Practitioner/lead-9"},
        "contained": [
            {
                "resourceType": "PractitionerRole",
                "id": "role-1",
                "practitioner": {"reference": "Practitioner/p-fhir-1", "display": "Dr Who"},
                "specialty": [
                    {"coding": [{"system": "urn:post:department", "code": "anesthesia"}]}
                ],
                "code": [{"coding": [{"system": "urn:post:rank", "code": "attending"}]}],
            },
            {"resourceType": "Procedure", "id": "proc-1", "note": [{"text": "intubation"}]},
        ],
        "contributor": [{"reference": "#role-1"}, {"reference": "Practitioner/unknown"}],
        "suspectEntity": [{"instance": {"reference": "#proc-1"}}],
    }


async def test_the_fhir_bridge_turns_an_adverse_event_into_assigned_referrals(
    kit_platform, hospital_keys, new_hospital, tmp_path
) -> None:
    from shared.auth import issue_token, tokens_file

    seed = await onboard_with_supporters(kit_platform, hospital_keys, new_hospital)
    token = issue_token(new_hospital, tokens_file({**os.environ, **kit_platform.env()}))
    resource = adverse_event(f"ae-{new_hospital}")
    sent = fhir_bridge.minimal(resource)
    assert "subject" not in sent and "text" not in sent and "description" not in sent
    assert "Ann Example" not in json.dumps(sent) and "Dr Who" not in json.dumps(sent)
    path = tmp_path / "adverse-event.json"
    path.write_text(json.dumps(resource))

    hospital = Hospital(new_hospital, kit_platform.nats_url, nkeys_seed=seed)
    assigned: list[SupporterAssigned] = []

    @hospital.on(SupporterAssigned)
    async def tell(event: SupporterAssigned) -> None:
        assigned.append(event)

    env = {
        "POST_HOSPITAL": new_hospital,
        "POST_API_TOKEN": token,
        "POST_REFERRAL_URL": f"http://127.0.0.1:{kit_platform.service_ports['referral']}",
    }
    async with hospital:
        code, out, err = await run(str(EXAMPLES / "fhir_bridge.py"), str(path), env=env)
        assert code == 0, err
        [referral_id] = re.findall(r"referral (ae-[0-9a-f]{32})", out)
        assert "skipped Practitioner/unknown: not_a_contained_role" in out
        while not assigned:
            await asyncio.sleep(0.05)
    assert assigned[0].referral_id == referral_id

    # The same report again: the same referral, nothing new; a wrong token is refused.
    code, again, err = await run(str(EXAMPLES / "fhir_bridge.py"), str(path), env=env)
    assert code == 0 and referral_id in again
    code, _, err = await run(
        str(EXAMPLES / "fhir_bridge.py"), str(path), env={**env, "POST_API_TOKEN": "nope"}
    )
    assert code == 1 and "refused 401" in err
