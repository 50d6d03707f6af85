"""Hospitals in partitions: the same partition wherever it is computed.

NATS puts a message in a work stream's partition (`{{partition(8,1)}}` of the subject
transform), the outbox rows carry the partition computed in Python (`partition_of`), and the
migration of older rows computes it in SQL (`post_partition`). If any of the three disagreed,
a hospital's events would be published by one instance while another handles its messages.
Real nats-server and PostgreSQL.
"""

from __future__ import annotations

import random
import string
import uuid

import asyncpg
import nats
import pytest

from shared.eventstore import create_pool, migrate
from shared.partitions import (
    PARTITIONS,
    ensure_work_stream,
    original_subject,
    partition_of,
    source_sequence,
    work_stream,
)
from shared.runtime import Platform
from shared.service import ensure_stream

pytestmark = pytest.mark.integration


def _hospitals(n: int) -> list[str]:
    rng = random.Random(13)
    alphabet = string.ascii_lowercase + string.digits + "-"
    ids = {"a", "kp-hospital-a", "kp-hospital-b", "0", "z" * 63}
    while len(ids) < n:
        ids.add(
            rng.choice(string.ascii_lowercase)
            + "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        )
    return sorted(ids)


async def test_nats_python_and_sql_put_every_hospital_in_the_same_partition(
    platform: Platform,
) -> None:
    hospitals = _hospitals(120)
    service = f"parttest{uuid.uuid4().hex[:6]}"
    event_type = f"Probe{uuid.uuid4().hex[:6]}"
    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    await ensure_work_stream(js, service, [f"post.*.evt.{event_type}"], replicas=1)
    sent = {}
    for hospital in hospitals:
        ack = await js.publish(f"post.{hospital}.evt.{event_type}", b"{}")
        sent[ack.seq] = hospital
    sub = await js.pull_subscribe(f"work.{service}.>", stream=work_stream(service))
    seen: dict[str, int] = {}
    while len(seen) < len(hospitals):
        for msg in await sub.fetch(len(hospitals) - len(seen), timeout=10):
            _, _, nats_partition, hospital, _, _ = msg.subject.split(".")
            assert original_subject(msg.subject) == f"post.{hospital}.evt.{event_type}"
            assert sent[source_sequence(msg.headers) or 0] == hospital  # its place in POST
            seen[hospital] = int(nats_partition)
            await msg.ack()
    await js.delete_stream(work_stream(service))
    await nc.close()

    schema = f"parttest_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    try:
        await migrate(pool, schema, None)
        in_sql = dict(
            await pool.fetch(
                "SELECT h, post_partition(h, $2) FROM unnest($1::text[]) AS h",
                hospitals,
                PARTITIONS,
            )
        )
    finally:
        await pool.close()
        conn = await asyncpg.connect(platform.db_url)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()

    in_python = {h: partition_of(h) for h in hospitals}
    assert seen == in_python == in_sql
    assert set(in_python.values()) == set(range(PARTITIONS))  # every partition gets some
