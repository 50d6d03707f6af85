"""The pure pieces of scale-out: the partition of a hospital, the fair share, the names and
headers of the work streams, and which outcomes erase a command from the stream."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from shared.dispatch import Outcome
from shared.partitions import (
    PARTITIONS,
    consumer_name,
    fair_share,
    original_subject,
    partition_of,
    source_sequence,
    work_filter,
    work_stream,
)

slugs = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


def test_the_partition_is_nats_fnv1a_32_modulo_the_count() -> None:
    # Known values: nats-server's partition(4,1) put h0..h4 in 1, 2, 3, 0, 1.
    assert [partition_of(f"h{i}", 4) for i in range(5)] == [1, 2, 3, 0, 1]


@given(slugs)
def test_every_hospital_has_one_stable_partition(hospital: str) -> None:
    assert 0 <= partition_of(hospital) < PARTITIONS
    assert partition_of(hospital) == partition_of(hospital)


def test_hospitals_spread_over_every_partition() -> None:
    counts = Counter(partition_of(f"hospital-{n}") for n in range(6000))
    assert set(counts) == set(range(PARTITIONS))
    assert max(counts.values()) < 1.2 * min(counts.values())


@given(st.integers(min_value=1, max_value=40))
def test_the_fair_shares_of_the_live_instances_cover_every_partition(live: int) -> None:
    share = fair_share(live)
    assert share * live >= PARTITIONS
    assert (share - 1) * live < PARTITIONS or share == 1


def test_work_stream_names_and_the_original_subject() -> None:
    assert work_stream("matching") == "POST_WORK_MATCHING"
    assert work_filter("matching", 3) == "work.matching.3.>"
    assert consumer_name("matching", 3) == "matching-p3"
    subject = "work.records.5.kp-hospital-a.cmd.RecordOutreach"
    assert original_subject(subject) == "post.kp-hospital-a.cmd.RecordOutreach"


def test_the_post_sequence_comes_from_the_source_header() -> None:
    header = "POST 1234 post.*.cmd.X work.x.{{partition(8,1)}} post.h.cmd.X abcd"
    assert source_sequence({"Nats-Stream-Source": header}) == 1234
    assert source_sequence({"Nats-Stream-Source": "OTHER 5 x"}) is None
    assert source_sequence(None) is None


def test_which_outcomes_erase_a_command_from_the_stream() -> None:
    assert Outcome("rejected").erases_command
    assert Outcome("dead_letter", "why").erases_command
    assert Outcome("duplicate").erases_command  # a copy sent again
    assert not Outcome("duplicate", same_message=True).erases_command  # redelivered: it stays
    assert not Outcome("ok").erases_command
    assert not Outcome("waiting").erases_command
