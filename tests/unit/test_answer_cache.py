"""The answer cache: an answer is served only at the version it was computed at."""

from __future__ import annotations

from datetime import date

from services.analytics.answers import AnswerCache

KEY = ("h1", None, None, None)


def test_an_answer_is_served_only_at_its_version() -> None:
    cache = AnswerCache()
    assert cache.get(KEY, 1) is None
    cache.put(KEY, 1, b"one")
    assert cache.get(KEY, 1) == b"one"
    assert cache.get(KEY, 2) is None  # the hospital has changed since
    assert cache.get(("h1", "icu", None, None), 1) is None  # another scope
    assert cache.get(("h1", None, date(2024, 1, 1), None), 1) is None  # another period
    cache.put(KEY, 2, b"two")
    assert cache.get(KEY, 2) == b"two" and cache.bytes == 3


def test_an_older_answer_never_replaces_a_newer_one() -> None:
    cache = AnswerCache()
    cache.put(KEY, 5, b"new")
    cache.put(KEY, 4, b"old")  # a slow gauge refresh finishing after a query
    assert cache.get(KEY, 5) == b"new"
    assert cache.get(KEY, 4) is None


def test_it_keeps_to_its_byte_budget_evicting_the_least_recently_used() -> None:
    cache = AnswerCache(max_bytes=10)
    for h in ("a", "b", "c"):
        cache.put((h, None, None, None), 1, b"xxxx")
    assert len(cache) == 2 and cache.bytes == 8  # "a" went
    assert cache.get(("a", None, None, None), 1) is None
    assert cache.get(("b", None, None, None), 1) == b"xxxx"  # "b" is now the most recent
    cache.put(("d", None, None, None), 1, b"xxxx")
    assert cache.get(("c", None, None, None), 1) is None
    assert cache.get(("b", None, None, None), 1) == b"xxxx"
    cache.put(("e", None, None, None), 1, b"x" * 11)  # bigger than the whole budget
    assert cache.get(("e", None, None, None), 1) is None and cache.bytes <= 10
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
