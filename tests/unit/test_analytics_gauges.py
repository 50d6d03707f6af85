"""The analytics metrics are registered when a service starts, never at import, and only once
however many analytics services one process runs."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest

from services.analytics import domain, gauges, reaim


def test_the_rebuild_imports_neither_fastapi_nor_prometheus_and_importing_registers_nothing() -> (
    None
):
    probe = (
        "import sys\n"
        "import services.analytics.rebuild\n"
        "assert 'fastapi' not in sys.modules, 'fastapi'\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client'\n"
        "from prometheus_client import REGISTRY\n"
        "import services.analytics.app\n"
        "names = list(REGISTRY._names_to_collectors)\n"
        "assert not [n for n in names if 'analytics' in n or 'reaim' in n], names\n"
        "assert not REGISTRY._collectors_without_names\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_two_services_starting_in_one_process_register_the_metrics_once() -> None:
    registry = CollectorRegistry()
    gauges.export(registry)
    gauges.export(registry)  # a second analytics service of the same process
    gauges.COLLECTOR.scopes = {"h": [("interactions", (("h", ""), 3.0))]}
    try:
        text = generate_latest(registry).decode()
    finally:
        gauges.COLLECTOR.scopes = {}
    assert text.count("# TYPE post_reaim_interactions gauge") == 1
    assert 'post_reaim_interactions{department="",hospital="h"} 3.0' in text
    assert text.count("# TYPE post_analytics_events_projected_total counter") == 1
    assert "post_analytics_answer_lookups_total" in text


def test_an_instance_exports_only_the_hospitals_it_holds_and_the_region_with_partition_0() -> None:
    scopes = {
        "": [("interactions", (("", ""), 5.0))],
        "a": [("interactions", (("a", ""), 2.0)), ("interactions", (("a", "em"), 2.0))],
        "b": [("interactions", (("b", ""), 3.0))],
    }
    held = gauges.by_gauge(scopes, lambda hospital: hospital == "b")
    assert held["interactions"] == [(("b", ""), 3.0)]
    assert set(held) == set(gauges.GAUGES)  # every gauge, empty or not
    assert len(gauges.by_gauge(scopes)["interactions"]) == 4


def test_department_gauges_are_opt_in_per_hospital_and_bounded() -> None:
    launched = [("a", 3), ("b", 5), ("c", 2), ("d", 1)]
    assert gauges.department_gauges(launched, "*", 1000) == {"a", "b", "c", "d"}
    assert gauges.department_gauges(launched, "", 1000) == set()
    assert gauges.department_gauges(launched, "b, d", 1000) == {"b", "d"}
    # Whole hospitals in id order while the departments add up to at most the bound.
    assert gauges.department_gauges(launched, "*", 9) == {"a", "b"}
    assert gauges.department_gauges(launched, "c,d", 2) == {"c"}
    assert gauges.department_gauges(launched, "*", 0) == set()


def _national_template(departments: int = 7) -> domain.Facts:
    """One hospital of a national region over five years: launched departments, supporters,
    referrals of every source, declines of every reason, interactions in every program year."""
    h = "h-template"
    slugs = [f"department-{k}" for k in range(departments)]
    start = datetime(2020, 1, 6, 9, 0, tzinfo=UTC)
    referrals, outreach, interactions = [], [], []
    for k in range(400):
        slug, at = slugs[k % departments], start + timedelta(days=4 * k + k % 3)
        rid = f"r{k}"
        referrals.append(
            domain.Referral(
                h, rid, slug, f"p{k % 150}", reaim.SOURCES[k % 3], at,
                domain.NO_SUPPORTER if k % 17 == 0 else domain.ASSIGNED,
            )
        )  # fmt: skip
        outcome = "declined" if k % 5 == 0 else "accepted"
        reason = reaim.DECLINE_REASONS[k % len(reaim.DECLINE_REASONS)] if k % 10 else None
        at_outreach = at + timedelta(hours=k % 60)
        reason = reason if outcome == "declined" else None
        outreach.append(domain.Outreach(h, rid, slug, outcome, at_outreach, reason, k))
        if outcome == "accepted":
            interactions.append(
                domain.Interaction(h, rid, slug, at_outreach.date(), 10 + k % 50, k % 9 == 0, k)
            )
    return domain.Facts(
        hospitals=[domain.Hospital(h, 400)],
        departments=[domain.Department(h, s, 40, date(2020, 1, 1)) for s in slugs],
        supporters=[
            domain.Supporter(h, f"s{k}", slugs[k % departments], date(2020, 1, 2))
            for k in range(20)
        ],
        referrals=referrals,
        outreach=outreach,
        interactions=interactions,
    )


def test_one_instance_scrapes_a_national_region_within_100k_series_and_10_mb() -> None:
    """Issue 26: 6,000 hospitals of 7 departments over five years on one instance: every
    hospital's headline gauges, the region's every figure, and every figure of the hospitals
    the default department setting picks (bounded)."""
    hospitals = [f"h-{k:05d}" for k in range(6000)]
    facts = _national_template()
    detailed = gauges.hospital_samples("h-template", facts, True)
    headline = gauges.hospital_samples("h-template", facts, False)
    assert {key for key, _ in headline} == set(domain.HEADLINE)
    region = reaim.compute(facts, scope=domain.Scope(), period_from=None, period_to=None)
    picked = gauges.department_gauges([(h, 7) for h in hospitals], "*")

    def relabel(scoped: gauges.Scoped, hospital: str) -> gauges.Scoped:
        return [(key, ((hospital, *labels[1:]), value)) for key, (labels, value) in scoped]

    scopes = {"": list(gauges.samples_of(region, "", ""))}
    for h in hospitals:
        scopes[h] = relabel(detailed if h in picked else headline, h)
    registry = CollectorRegistry()
    gauges.export(registry)
    gauges.COLLECTOR.scopes = scopes
    try:
        text = generate_latest(registry)
    finally:
        gauges.COLLECTOR.scopes = {}
    series = sum(1 for line in text.splitlines() if line.startswith(b"post_reaim_"))
    print(f"national scrape: {series} series, {len(text)} bytes, {len(picked)} detailed")
    assert series == sum(len(s) for s in scopes.values())
    assert series <= 100_000
    assert len(text) <= 10 * 1024 * 1024
    # Every hospital is on every headline gauge; the detailed ones on every gauge.
    assert series > 6000 * 8
    assert picked and len(picked) < 100
