"""The POST study's published figures (Tolins et al., PLoS ONE 18(11): e0292917, 2023) beside
the platform's RE-AIM answer.

Each figure names the RE-AIM object and key it corresponds to, the value the paper states (as
it states it) and the exact value the platform must give once `postctl simulate post-2023` has
replayed the study. All are at region scope (the 2-hospital system), for the answer without a
period or for `PERIOD` (June 2019 to May 2022, `to` exclusive): both give the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

HOSPITALS = ("kp-hospital-a", "kp-hospital-b")
PERIOD = ("2019-06-01", "2022-06-01")  # the study: June 2019 to May 2022
SCOPE = "region"

# Floats from JSON: a figure matches when it equals the expected value up to float noise.
EPSILON = 1e-9

Extract = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Figure:
    label: str
    paper: str  # the value as the paper states it
    path: str  # object.key in the RE-AIM answer (a derived figure says how)
    expected: Any  # what the platform must answer
    extract: Extract


@dataclass(frozen=True)
class Row:
    label: str
    paper: str
    path: str
    expected: Any
    platform: Any
    match: bool


def _key(path: str) -> Extract:
    obj, key = path.split(".")
    return lambda reaim: reaim[obj][key]


def _departments(*slugs: str) -> Extract:
    def extract(reaim: dict[str, Any]) -> int:
        by_department = reaim["reach"]["interactions_by_department"]
        return sum(int(by_department.get(slug, 0)) for slug in slugs)

    return extract


def _departments_without_interactions(reaim: dict[str, Any]) -> int:
    with_some = sum(1 for n in reaim["reach"]["interactions_by_department"].values() if n)
    return int(reaim["adoption"]["departments_launched"]) - with_some


def _program_year(key: str, year: int) -> Extract:
    return lambda reaim: reaim["maintenance"][key][year - 1]


def _figure(label: str, paper: str, path: str, expected: Any) -> Figure:
    return Figure(label, paper, path, expected, _key(path))


FIGURES: tuple[Figure, ...] = (
    # Reach
    _figure("Peer supporters trained", "59", "reach.supporters_trained", 59),
    _figure("Interactions, June 2019 to May 2022", "306", "reach.interactions", 306),
    Figure(
        "Interactions in emergency medicine",
        "213 (69.6%)",
        "reach.interactions_by_department[emergency-medicine]",
        213,
        _departments("emergency-medicine"),
    ),
    Figure(
        "Interactions in anesthesia and ICU",
        "49 (16%)",
        "reach.interactions_by_department[anesthesia + icu]",
        49,
        _departments("anesthesia", "icu"),
    ),
    Figure(
        "Interactions among hospitalists",
        "22 (7.2%)",
        "reach.interactions_by_department[hospitalists]",
        22,
        _departments("hospitalists"),
    ),
    _figure("Departments with no referrals", "3", "adoption.departments_without_referrals", 3),
    Figure(
        "Departments with no interactions",
        "3",
        "adoption.departments_launched - departments with interactions",
        3,
        _departments_without_interactions,
    ),
    _figure("Physicians in the 11 departments", "about 530", "reach.eligible_physicians", 530),
    Figure(
        "Months in the study", "36", "len(reach.monthly)", 36, lambda r: len(r["reach"]["monthly"])
    ),
    _figure("Interactions per month, mean", "8.5", "reach.monthly_mean", 8.5),
    _figure("Interactions per month, median", "8", "reach.monthly_median", 8.0),
    _figure("Interactions per month, fewest", "1", "reach.monthly_min", 1),
    _figure("Interactions per month, most", "27", "reach.monthly_max", 27),
    _figure("Interaction length, mean (minutes)", "68", "reach.minutes_mean", 68.0),
    _figure("Interaction length, median (minutes)", "60", "reach.minutes_median", 60.0),
    _figure("Interaction length, shortest (minutes)", "10", "reach.minutes_min", 10),
    _figure("Interaction length, longest (minutes)", "180", "reach.minutes_max", 180),
    # Effectiveness (department survey, March 2022)
    _figure(
        "Respondents who had an interaction",
        "32",
        "effectiveness.respondents_with_interaction",
        32,
    ),
    _figure("Found it helpful", "31 of 32 (96.9%)", "effectiveness.helpful_rate", 0.9688),
    _figure(
        "Improved well-being", "27 of 32 (84.4%)", "effectiveness.wellbeing_improved_rate", 0.8438
    ),
    _figure(
        "More comfortable talking about emotions",
        "24 of 32 (75%)",
        "effectiveness.comfort_improved_rate",
        0.75,
    ),
    # Adoption
    _figure("Hospitals that adopted POST", "2", "adoption.hospitals_adopted", 2),
    _figure("Departments that adopted POST", "11", "adoption.departments_launched", 11),
    _figure(
        "Share of the system's physicians covered",
        "about 60% (530 of 883)",
        "adoption.physician_coverage",
        0.6002,
    ),
    _figure(
        "Accepted support when reached", "32 of 40 (80%)", "adoption.outreach_acceptance_rate", 0.8
    ),
    _figure(
        "Would recommend to another department",
        "55 of 66 (83.3%)",
        "adoption.would_recommend_rate",
        0.8333,
    ),
    # Maintenance
    _figure("Peer supporters still active", "50", "maintenance.supporters_active", 50),
    _figure(
        "Peer supporters retained",
        "50 of 59 (84.7%)",
        "maintenance.supporter_retention_rate",
        0.8475,
    ),
    _figure("Departments still active", "100%", "maintenance.departments_active_rate", 1.0),
    Figure(
        "Interactions in program year 1",
        "73",
        "maintenance.interactions_by_program_year[0]",
        73,
        _program_year("interactions_by_program_year", 1),
    ),
    Figure(
        "Interactions in program year 2",
        "109",
        "maintenance.interactions_by_program_year[1]",
        109,
        _program_year("interactions_by_program_year", 2),
    ),
    Figure(
        "Interactions in program year 3",
        "124",
        "maintenance.interactions_by_program_year[2]",
        124,
        _program_year("interactions_by_program_year", 3),
    ),
    Figure(
        "Interactions per month in program year 1",
        "6.1",
        "maintenance.monthly_rate_by_program_year[0]",
        6.1,
        _program_year("monthly_rate_by_program_year", 1),
    ),
    Figure(
        "Interactions per month in program year 3",
        "10.3",
        "maintenance.monthly_rate_by_program_year[2]",
        10.3,
        _program_year("monthly_rate_by_program_year", 3),
    ),
)


def _equal(expected: Any, actual: Any) -> bool:
    if isinstance(actual, bool) or actual is None:
        return bool(actual == expected)
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return abs(actual - expected) <= EPSILON
    return bool(actual == expected)


def compare(reaim: dict[str, Any], figures: Sequence[Figure] = FIGURES) -> list[Row]:
    """Each figure of the paper beside the platform's answer (GET /reaim, region scope)."""
    rows: list[Row] = []
    for figure in figures:
        try:
            actual = figure.extract(reaim)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            actual = None  # the answer lacks it: shown as missing, never a match
        rows.append(
            Row(
                figure.label,
                figure.paper,
                figure.path,
                figure.expected,
                actual,
                actual is not None and _equal(figure.expected, actual),
            )
        )
    return rows


def all_match(rows: Sequence[Row]) -> bool:
    return bool(rows) and all(row.match for row in rows)


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: figure, what the paper states, what the platform answers, match."""
    header = ("figure", "paper", "platform", "match", "RE-AIM key")
    lines = [
        (row.label, row.paper, _show(row.platform), "yes" if row.match else "NO", row.path)
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    matched = sum(1 for row in rows if row.match)
    out = [render(header), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    out.append(f"{matched} of {len(rows)} figures of the paper match.")
    return "\n".join(out) + "\n"
