"""The analytics metrics are registered when a service starts, never at import, and only once
however many analytics services one process runs."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from services.analytics import gauges


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
