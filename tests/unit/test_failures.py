"""Which failures are passing (retried, holding back only their hospital) and which are final
(answered at once): shared/dispatch.py `is_transient` and `envelope_id` (issue 21)."""

from __future__ import annotations

import asyncpg
import pytest
from pydantic import BaseModel, ValidationError

from shared.contracts import top_level_id
from shared.dispatch import InjectedFault, is_transient
from shared.eventstore import ConcurrencyError


class _Model(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Model.model_validate({"n": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(),
        TimeoutError(),
        asyncpg.exceptions.SerializationError("40001"),
        asyncpg.exceptions.DeadlockDetectedError("40P01"),
        asyncpg.exceptions.LockNotAvailableError("55P03"),
        asyncpg.exceptions.AdminShutdownError("57P01"),
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        ConcurrencyError("stream", 1, 2),
        InjectedFault("test"),
    ],
)
def test_the_database_and_nats_failing_are_passing(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RecursionError(),
        ValueError(),
        KeyError("x"),
        TypeError(),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
        asyncpg.exceptions.NumericValueOutOfRangeError("22003"),
        asyncpg.exceptions.CheckViolationError("23514"),
        _validation_error(),
    ],
)
def test_what_fails_the_same_way_every_time_is_not(exc: BaseException) -> None:
    assert not is_transient(exc)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "c-1", "data": {"id": "inner"}}', "c-1"),
        (b'{"data": {"id": "inner"}, "id": "c-2"}', "c-2"),
        (b'{"data": ' + b"[" * 10_000 + b"]" * 10_000 + b', "id": "c-3"}', "c-3"),
        (b'{"id": "c\\"4"}', 'c"4'),
        (b'{"x": "id", "y": "z"}', None),
        (b'["id", "c-5"]', None),
        (b'{"id": 5}', None),
        (b'{"id": ""}', None),
        (b"not json", None),
    ],
)
def test_the_id_of_any_body_is_found_without_decoding_it(body: bytes, expected: str | None) -> None:
    assert top_level_id(body) == expected
