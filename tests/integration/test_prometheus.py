"""Prometheus, the alert rules and the Grafana dashboards, checked with the real tools.

- ``promtool`` checks deploy/prometheus/prometheus.yml and alerts.yml as they are;
- a real Prometheus (Debian's ``prometheus`` package) scrapes the running test stack with the
  deploy scrape configuration, its targets moved to this machine and its interval to 1 s;
- some traffic makes every signal move: a referral accepted, one declined, one left past 48
  hours, one without a supporter, a rejected command and a message that is not JSON at all;
- then every PromQL expression of both dashboards (panels and variables) and of the alert
  rules is evaluated through Prometheus' HTTP API: each succeeds and returns data, but for
  the few listed below with the reason.

The deploy configuration scrapes NATS through one prometheus-nats-exporter per node, which
neither Debian nor PyPI packages: that job is left out here, and the dashboard expressions
that read it are the listed exceptions.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from postctl import webhooks
from shared.client import PlatformClient
from shared.contracts import (
    Command,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    RetireSupporter,
    SubmitSurveyResponse,
    cmd_subject,
)
from shared.runtime import SERVICES, Platform, free_port, wait_for_port
from shared.settings import SERVICE_PORTS, Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
INSTALL = "apt-get install -y prometheus (Debian's package; `make test` installs it)"

DEPARTMENT = "emergency-medicine"
UNSTAFFED = "anesthesia"  # launched without supporters: its referral finds nobody
DUE = 48 * 3600
SKIPPED_JOBS = {"nats": "its targets are prometheus-nats-exporter, not packaged here"}
# Grafana's interval macros, as Grafana would fill them for a short time range.
MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m"}

# Expressions that cannot have data on this machine, and why. Anything else must.
NO_DATA: dict[str, str] = {
    'up{job="nats"}': "no prometheus-nats-exporter runs here (the nats job is skipped)",
    'gnatsd_varz_connections{job="nats"}': "a metric of prometheus-nats-exporter",
    "ConsumerLagGrowing": "a healthy stack never has over 100 messages waiting for 10 minutes",
    "ForgetNotFinished": "a healthy stack finishes every forget within seconds",
    "HospitalBehind": "the test client acknowledges each hospital's events as they come",
}
# Dashboard expressions that are empty by design for one choice of the variables.
EMPTY_FOR: dict[tuple[str, str], str] = {
    ("Departments compared: reach", "region"): "departments are listed once a hospital is chosen",
}
EXPORTER_METRICS = re.compile(r"^gnatsd_")


# --- the files, checked by promtool ---------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail(f"promtool is missing: {INSTALL}")
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR
    )


def test_promtool_checks_the_deploy_config_and_its_rules() -> None:
    # The config names its rule file relatively: promtool checks that one too.
    checked = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout
    rules = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout


# --- the expressions of the dashboards and the rules ----------------------------------------


@dataclass(frozen=True)
class Expression:
    source: str  # "reaim.json", "operations.json" or "alerts.yml"
    name: str  # the panel's title, the variable's name or the alert's name
    expr: str


def dashboard_expressions(path: Path) -> tuple[list[Expression], list[Expression]]:
    """(every panel target, every variable's label_values query) of one dashboard."""
    board = json.loads(path.read_text())
    targets: list[Expression] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "prometheus", panel["title"]
                targets.append(Expression(path.name, panel["title"], target["expr"]))

    walk(board["panels"])
    for v in board["templating"]["list"]:
        assert v["query"] == v["definition"], v["name"]  # the string Grafana runs, and shows
    variables = [Expression(path.name, v["name"], v["query"]) for v in board["templating"]["list"]]
    return targets, variables


def alert_expressions() -> list[Expression]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [
        Expression("alerts.yml", rule["alert"], str(rule["expr"]))
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def substitute(expr: str, values: dict[str, str]) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert not re.search(r"\$\w", expr), f"unfilled variable in {expr}"
    return expr


KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "bool", "offset"}
KEYWORDS |= {"group_left", "group_right", "sum", "count", "min", "max", "avg"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (a small PromQL tokenizer, enough for ours)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*|\d[\w.]*)\s*(\()?", text):
        token, call = match.group(1), match.group(2)
        if not token[0].isdigit() and not call and token not in KEYWORDS:
            names.add(token)
    return names


def test_the_expression_tokenizer() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, service) (rate(post_x_bucket{a="b"}[1m])))'
        " or (post_y unless post_y offset 1h) > 0 and on(service) up == 0"
    )
    assert metric_names(expr) == {"post_x_bucket", "post_y", "up"}


# --- traffic: every signal the dashboards and alerts watch ----------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def answer(client: PlatformClient, hospital: str, command: Command, type_: str) -> Any:
    event = await client.send_and_wait(hospital, command, timeout=30)
    assert event["type"] == type_, event["data"]
    return event["data"]


async def assigned(client: PlatformClient, hospital: str, referral_id: str, **more: Any) -> str:
    def mine(e: dict[str, Any]) -> bool:
        data = e["data"]
        return data.get("referral_id") == referral_id and all(data[k] == v for k, v in more.items())

    event = await client.wait_for(hospital, "SupporterAssigned", mine, timeout=30)
    return str(event["data"]["supporter_id"])


def referral(referral_id: str, department: str = DEPARTMENT) -> RequestReferral:
    return RequestReferral(
        referral_id=referral_id,
        physician_id=_id("p"),
        department=department,
        rank=Rank.resident,
        source="third_party",
        event_nature="other",
        requested_at=datetime.now(UTC) - timedelta(hours=3),
        referrer_id="ref-1",
    )


async def drive_traffic(client: PlatformClient, stack: Platform, hospital: str) -> None:
    today = datetime.now(UTC).date()
    # A webhook whose endpoint refuses every connection: its events wait (WebhookBehind).
    await webhooks.register(
        Settings(nats_url=stack.nats_url, database_url=stack.db_url, data_dir=stack.data_dir),
        hospital,
        f"http://127.0.0.1:{free_port()}/refused",
    )
    await answer(
        client, hospital, RegisterHospital(name="Test", physician_count=400), "HospitalRegistered"
    )
    for department, physicians in ((DEPARTMENT, 60), (UNSTAFFED, 20)):
        launch = LaunchDepartment(
            department=department,
            physician_count=physicians,
            launched_on=today - timedelta(days=400),  # two program years
        )
        await answer(client, hospital, launch, "DepartmentLaunched")
    for supporter_id in ("s-1", "s-2"):
        train = RegisterSupporter(
            supporter_id=supporter_id,
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=today - timedelta(days=390),
        )
        await answer(client, hospital, train, "SupporterTrained")

    at = datetime.now(UTC) - timedelta(hours=1)
    accepted, declined, unanswered = _id("r"), _id("r"), _id("r")
    for referral_id in (accepted, declined, unanswered):
        await answer(client, hospital, referral(referral_id), "ReferralCreated")
    supporter = await assigned(client, hospital, accepted)
    outreach = RecordOutreach(
        referral_id=accepted, supporter_id=supporter, outcome="accepted", at=at
    )
    await answer(client, hospital, outreach, "OutreachAccepted")
    talk = RecordInteraction(
        referral_id=accepted, supporter_id=supporter, occurred_on=today, minutes=40, escalated=True
    )
    await answer(client, hospital, talk, "InteractionCompleted")
    supporter = await assigned(client, hospital, declined)
    no = RecordOutreach(
        referral_id=declined,
        supporter_id=supporter,
        outcome="declined",
        at=at,
        decline_reason="no_time",
    )
    await answer(client, hospital, no, "OutreachDeclined")
    survey = SubmitSurveyResponse(
        response_id=_id("q"),
        department=DEPARTMENT,
        submitted_on=today,
        aware=True,
        had_interaction=True,
        helpful=5,
        wellbeing_improved=True,
        comfort_improved=True,
        would_recommend=True,
    )
    await answer(client, hospital, survey, "SurveyResponseRecorded")

    nobody = _id("r")
    await client.send(hospital, referral(nobody, UNSTAFFED))
    await client.wait_for(
        hospital, "NoSupporterAvailable", lambda e: e["data"]["referral_id"] == nobody, timeout=30
    )
    unknown = RetireSupporter(supporter_id="s-unknown", retired_on=today)
    refused = await answer(client, hospital, unknown, "CommandRejected")
    assert refused["reason_code"] == "unknown_supporter"
    # Not a CloudEvent at all: it can only be dead-lettered.
    await client.send_raw(cmd_subject(hospital, "RegisterHospital"), b"\x00 not json")

    # The third referral is left without outreach past 48 hours: matching reassigns it.
    await assigned(client, hospital, unanswered)
    await asyncio.sleep(0.5)  # matching consumes the outreach of the first two (see e2e tests)
    async with httpx.AsyncClient() as http:
        port = stack.service_ports["matching"]
        moved = await http.post(f"http://127.0.0.1:{port}/admin/clock", json={"seconds": DUE + 5})
        moved.raise_for_status()
    await assigned(client, hospital, unanswered, reason="reassigned")


# --- a real Prometheus on the stack ---------------------------------------------------------


def local_config(stack: Platform, prometheus_port: int, down_port: int) -> dict[str, Any]:
    """The deploy config with its targets on this machine, scraping every second."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / rule) for rule in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "post-services":
            # Every replica, found by DNS in compose: here, the stack's one instance each.
            discovered = job.pop("dns_sd_configs")
            found = {n for sd in discovered for n in sd["names"]}
            assert found == set(SERVICES), f"the deploy config scrapes {found}"
            ports = {n: sd["port"] for sd in discovered for n in sd["names"]}
            job["static_configs"] = [{"targets": [f"{n}:{ports[n]}" for n in SERVICES]}]
        if name in SKIPPED_JOBS:
            continue
        for static in job["static_configs"]:
            static["targets"] = [local_target(stack, t, prometheus_port) for t in static["targets"]]
        if name == "post-services":
            # A target where nothing listens stands for a stopped service (ServiceDown).
            job["static_configs"].append({"targets": [f"127.0.0.1:{down_port}"]})
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def local_target(stack: Platform, target: str, prometheus_port: int) -> str:
    host, _, port = target.rpartition(":")
    if host in stack.service_ports:
        assert int(port) == SERVICE_PORTS[host], target
        return f"127.0.0.1:{stack.service_ports[host]}"
    if host == "localhost" and port == "9090":
        return f"127.0.0.1:{prometheus_port}"
    pytest.fail(f"the deploy config scrapes {target}: teach this test where it runs locally")


@dataclass
class RunningPrometheus:
    url: str
    down_target: str  # the target where nothing listens


@pytest.fixture
def prometheus(stack: Platform, tmp_path: Path) -> Iterator[RunningPrometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"prometheus is missing: {INSTALL}")
    port, down_port = free_port(), free_port()
    config = local_config(stack, port, down_port)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    checked = promtool("check", "config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(port, timeout=30, proc=process)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"prometheus did not start: {exc}\n{log.read_text()[-3000:]}")
        yield RunningPrometheus(f"http://127.0.0.1:{port}", f"127.0.0.1:{down_port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def query(http: httpx.AsyncClient, expr: str) -> dict[str, Any]:
    resp = await http.get("/api/v1/query", params={"query": expr})
    body: dict[str, Any] = resp.json()
    return body


def has_data(answer: dict[str, Any]) -> bool:
    return bool(answer.get("data", {}).get("result"))


async def poll(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Run an async check every second until it holds or the time is up; its last answer."""
    deadline = time.monotonic() + timeout
    while not (done := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
    return done


def parse_label_values(definition: str) -> tuple[str, str]:
    """Grafana's `label_values(selector, label)` -> (selector, label)."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
    assert match, f"not a label_values query: {definition}"
    return match.group(1), match.group(2)


async def test_prometheus_scrapes_the_stack_and_every_expression_has_data(
    prometheus: RunningPrometheus, stack: Platform, client: PlatformClient, hospital: str
) -> None:
    await drive_traffic(client, stack, hospital)

    panels: list[Expression] = []
    variables: list[Expression] = []
    for name in ("reaim.json", "operations.json"):
        found, declared = dashboard_expressions(DASHBOARDS / name)
        assert found, f"{name} has no PromQL"
        panels += found
        variables += declared
    alerts = alert_expressions()
    assert {a.name for a in alerts} >= {
        "OutreachPast48Hours",
        "NoSupporterAvailable",
        "ConsumerLagGrowing",
        "DeadLetters",
        "ServiceDown",
        "WebhookBehind",
    }
    # The choices a watcher makes: one department, its hospital ("All" departments), the region.
    choices = {
        "reaim.json": {
            "department": {"hospital": hospital, "department": DEPARTMENT},
            "hospital": {"hospital": hospital, "department": "^$"},
            "region": {"hospital": "^$", "department": "^$"},
        },
        "operations.json": {
            "hospital": {"service": ".*", "hospital": hospital},
            "all": {"service": ".*", "hospital": ".*"},
        },
    }
    checks: dict[tuple[Expression, str], str] = {}
    for e in panels:
        for choice, values in choices[e.source].items():
            checks[(e, choice)] = substitute(e.expr, values)
    for e in alerts:
        checks[(e, "")] = e.expr

    def expects_data(e: Expression, choice: str) -> bool:
        return e.expr not in NO_DATA and e.name not in NO_DATA and (e.name, choice) not in EMPTY_FOR

    async with httpx.AsyncClient(base_url=prometheus.url, timeout=10) as http:

        async def targets_up() -> bool:
            active = (await http.get("/api/v1/targets")).json()["data"]["activeTargets"]
            health = {t["labels"]["instance"]: t["health"] for t in active}
            down = health.pop(prometheus.down_target, None)
            return down == "down" and len(health) == 5 and set(health.values()) == {"up"}

        assert await poll(targets_up, 30), "the stack's four services and Prometheus are not up"

        answers: dict[tuple[Expression, str], dict[str, Any]] = {}

        async def all_answered() -> bool:
            for key, expr in checks.items():
                if key in answers and has_data(answers[key]):
                    continue
                answers[key] = await query(http, expr)
            return all(
                a["status"] == "success" and (has_data(a) or not expects_data(*key))
                for key, a in answers.items()
            )

        # The RE-AIM gauges are recomputed every 15 s, and once more after a change.
        complete = await poll(all_answered, 75)

        failed = [
            f"{key[0].source} {key[0].name!r} [{key[1]}]: {checks[key]} -> {a.get('error')}"
            for key, a in answers.items()
            if a["status"] != "success"
        ]
        assert not failed, "PromQL errors:\n" + "\n".join(failed)
        empty = [
            f"{key[0].source} {key[0].name!r} [{key[1]}]: {checks[key]}"
            for key, a in answers.items()
            if not has_data(a) and expects_data(*key)
        ]
        assert complete and not empty, "no data:\n" + "\n".join(empty)
        # An exception that has data after all is stale: the lists must say what is true.
        stale = [
            checks[key] for key, a in answers.items() if has_data(a) and not expects_data(*key)
        ]
        assert not stale, f"these have data now, drop their exception: {stale}"

        # Every metric the expressions read exists (an `or vector(0)` could hide a typo).
        names = set((await http.get("/api/v1/label/__name__/values")).json()["data"])
        read = {n for e in [*panels, *alerts] for n in metric_names(e.expr)}
        missing = sorted(n for n in read - names if not EXPORTER_METRICS.match(n))
        assert not missing, f"metrics no service exports: {missing}"

        # The pickers list the hospital and department of the traffic.
        for v in variables:
            selector, label = parse_label_values(v.expr)
            values = {"hospital": hospital, "department": DEPARTMENT, "service": ".*"}
            series = await http.get(
                "/api/v1/series", params={"match[]": substitute(selector, values)}
            )
            found = {s.get(label) for s in series.json()["data"]}
            wanted = {"hospital": hospital, "department": DEPARTMENT}.get(label)
            assert found - {None, ""}, f"{v.source} variable {v.name} lists nothing"
            if wanted:
                assert wanted in found, f"{v.source} variable {v.name} misses {wanted}"

        # Prometheus evaluates the rules without error, and the ones the traffic provoked fire.
        groups = (await http.get("/api/v1/rules")).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert {a.name for a in alerts} == set(rules)
        for name, rule in rules.items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
        provoked = {a.name for a in alerts if a.name not in NO_DATA}

        async def alerts_raised() -> bool:
            live = (await http.get("/api/v1/alerts")).json()["data"]["alerts"]
            return provoked <= {a["labels"]["alertname"] for a in live}

        assert await poll(alerts_raised, 15), f"not all of {sorted(provoked)} pending or firing"
