"""What a load run found: the exactly-once count of answers, latencies, and the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (as numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max in milliseconds, to a tenth."""
    return {
        "p50": _ms(percentile(latencies, 50)),
        "p90": _ms(percentile(latencies, 90)),
        "p99": _ms(percentile(latencies, 99)),
        "max": _ms(max(latencies, default=None)),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class LoadReport:
    hospitals: list[str]
    commands: int
    answered: int
    rejected: int
    by_type: dict[str, int]
    missing: list[str]
    doubled: list[str]
    unexpected: list[str]
    stored_twice: int
    unpublished: int
    publish_retries: int
    stalled_flows: int
    elapsed: float
    latency_ms: dict[str, float | None]
    figures_checked: bool = False
    figure_mismatches: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.doubled
            or self.unexpected
            or self.stored_twice
            or self.unpublished
            or self.stalled_flows
            or any(self.figure_mismatches.values())
        )

    @property
    def throughput(self) -> float:
        return self.commands / self.elapsed if self.elapsed > 0 else 0.0

    def problems(self) -> list[str]:
        out = [f"no outcome: {i}" for i in self.missing[:20]]
        out += [f"more than one outcome: {i}" for i in self.doubled[:20]]
        out += self.unexpected[:20]
        if self.stored_twice:
            out.append(f"{self.stored_twice} event(s) stored more than once")
        if self.unpublished:
            out.append(f"{self.unpublished} command(s) never published")
        if self.stalled_flows:
            out.append(f"{self.stalled_flows} flow(s) stalled waiting for an answer")
        for hospital, mismatches in self.figure_mismatches.items():
            out += [f"{hospital}: {m}" for m in mismatches]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "hospitals": self.hospitals,
            "commands": self.commands,
            "answered": self.answered,
            "rejected_as_planned": self.rejected,
            "elapsed_s": round(self.elapsed, 2),
            "throughput_per_s": round(self.throughput, 1),
            "latency_ms": self.latency_ms,
            "publish_retries": self.publish_retries,
            "errors": {
                "missing": len(self.missing),
                "doubled": len(self.doubled),
                "unexpected": len(self.unexpected),
                "stored_twice": self.stored_twice,
                "unpublished": self.unpublished,
                "stalled_flows": self.stalled_flows,
            },
            "figures_checked": self.figures_checked,
            "by_type": self.by_type,
            "problems": self.problems(),
        }

    def format(self) -> str:
        lat = self.latency_ms
        lines = [
            f"hospitals    {', '.join(self.hospitals)}",
            f"commands     {self.commands} in {self.elapsed:.1f} s"
            f" ({self.throughput:.1f}/s), {self.rejected} refused as planned",
            "latency ms   "
            + "  ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in lat.items()),
            f"retries      {self.publish_retries} publish retries",
            f"outcomes     {self.answered} of {self.commands} commands answered exactly once",
        ]
        if self.figures_checked:
            same = not any(self.figure_mismatches.values())
            verdict = "as computed from the commands sent" if same else "DIFFERENT from the sent"
            lines.append(f"RE-AIM       {verdict}")
        lines.append("nothing lost, nothing doubled." if self.ok else "PROBLEMS:")
        lines += [f"  {p}" for p in self.problems()]
        return "\n".join(lines)
