"""`python -m bench` (`make bench`): the whole harness, one run, one table. See bench/README.md.

Each section runs on embedded nats-server and PostgreSQL processes of its own (free ports, a
fresh directory under /tmp), so none sees another's data. Results go to
bench/results/<time>.json (and latest.json); the table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as host
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import e2e, fence, publish, region_asof, replay, scaleout, store
from bench.common import Section, embedded_platform, sample_sizes
from shared.runtime import Platform

RESULTS = Path(__file__).resolve().parent / "results"

SECTIONS: dict[str, Callable[[Platform, float], Coroutine[Any, Any, Section]]] = {
    "store": store.run,
    "publish": publish.run,
    "e2e": e2e.run,
    "replay": replay.run,
    "scaleout": scaleout.run,
    "national": replay.run_national,  # issue 15: analytics at national scale
    "fence": fence.run,  # the aggregates' fence: what several partitions writing at once cost
    "region_asof": region_asof.run,  # issue 26: the region's departments and supporters
}


def table(sections: list[Section]) -> str:
    width = max(len(what) for s in sections for what, _, _ in s.rows) + 2
    lines = []
    for section in sections:
        lines.append(f"\n{section.name.upper()}")
        for what, measured, target in section.rows:
            lines.append(f"  {what:<{width}}{measured:>16}  {target}".rstrip())
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "python": sys.version.split()[0],
        "platform": host.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="workload size (0.1 for a quick look)"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    started = time.perf_counter()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "scale": args.scale,
        "sizes": sample_sizes(),
        "sections": {},
    }
    sections: list[Section] = []
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        section_started = time.perf_counter()
        load_before = os.getloadavg()[0]
        with embedded_platform() as plat:
            section = asyncio.run(SECTIONS[name](plat, args.scale))
        section.figures["seconds"] = round(time.perf_counter() - section_started, 1)
        # How busy the machine was (neighbours included): absolutes move with it.
        section.figures["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        sections.append(section)
        results["sections"][name] = section.figures
        print(table([section]), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    body = json.dumps(results, indent=2, default=str)
    (RESULTS / f"{stamp}.json").write_text(body)
    (RESULTS / "latest.json").write_text(body)
    print("\n=== POST platform benchmark: ratios hold on a noisy machine, absolutes do not ===")
    print(table(sections))
    print(f"\n{results['seconds']:.0f} s; results in {RESULTS / (stamp + '.json')}")


if __name__ == "__main__":
    main()
