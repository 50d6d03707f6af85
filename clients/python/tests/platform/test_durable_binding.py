"""Against the real platform with the hospital's own key: the durable consumer through
FastStream, what FastStream cannot do there, and the package's answer to it."""

from __future__ import annotations

import asyncio
from datetime import date

import nats
import pytest
from faststream.middlewares import AckPolicy as FsAckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig

from post_client import (
    DepartmentLaunched,
    Envelope,
    Hospital,
    HospitalRegistered,
    LaunchDepartment,
    NotOnboarded,
    RegisterHospital,
    connect,
)


async def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def all_acknowledged(kit_platform, hospital: str) -> None:  # type: ignore[no-untyped-def]
    nc = await nats.connect(kit_platform.nats_url)
    try:
        js = nc.jetstream()
        for _ in range(600):
            info = await js.consumer_info("POST", f"hospital-{hospital}")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"hospital-{hospital} still has events not acknowledged")
    finally:
        await nc.close()


async def test_the_key_may_neither_create_a_consumer_nor_read_the_stream(
    kit_platform, hospital_keys, new_hospital
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    nc = await nats.connect(
        kit_platform.nats_url, nkeys_seed=str(on.seed_file), inbox_prefix=f"_INBOX_{new_hospital}"
    )
    try:
        js = nc.jetstream(timeout=1)
        with pytest.raises(Exception):  # noqa: B017  (refused by NATS: no answer, or an error)
            await js.add_consumer("POST", ConsumerConfig(durable_name=f"mine-{new_hospital}"))
        with pytest.raises(Exception):  # noqa: B017
            await js.stream_info("POST")
        info = await js.consumer_info("POST", f"hospital-{new_hospital}")  # its own: allowed
        assert info.config.filter_subject == f"post.{new_hospital}.evt.>"
    finally:
        await nc.close()


async def test_faststream_alone_tries_to_create_a_missing_consumer_the_kit_says_why(
    kit_platform, hospital_keys, new_hospital
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    platform_nc = await nats.connect(kit_platform.nats_url)
    await platform_nc.jetstream().delete_consumer("POST", f"hospital-{new_hospital}")
    await platform_nc.close()

    # FastStream on its own: its pull subscriber (nats-py `pull_subscribe`) asks for the
    # consumer's info and, not finding it, creates one: a permissions violation for a hospital's
    # key, which NATS answers by breaking the connection. All the caller sees is a timeout.
    broker = NatsBroker(
        kit_platform.nats_url, nkeys_seed=str(on.seed_file), inbox_prefix=f"_INBOX_{new_hospital}"
    )

    @broker.subscriber(
        f"post.{new_hospital}.evt.>",
        stream=JStream("POST", declare=False),
        durable=f"hospital-{new_hospital}",
        pull_sub=PullSub(batch_size=1, timeout=1),
        ack_policy=FsAckPolicy.NACK_ON_ERROR,
    )
    async def handle(body: bytes) -> None:
        pass

    with pytest.raises(NatsTimeoutError):
        await broker.start()
    await broker.stop()

    # The kit looks first (nats-py consumer_info) and says what is wrong.
    hospital = Hospital(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)

    @hospital.durable(HospitalRegistered)
    async def registered(event: HospitalRegistered) -> None:
        pass

    with pytest.raises(NotOnboarded, match="onboard"):
        await hospital.start()
    await hospital.stop()


async def test_durable_handlers_get_every_event_in_order_once_acknowledged(
    kit_platform, hospital_keys, new_hospital
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    # Events published while no handler runs: a send-only tool, then it is gone.
    tool = await connect(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)
    await (await tool.send(RegisterHospital(name="Kit General", physician_count=40)))
    for i in range(3):
        await (
            await tool.send(
                LaunchDepartment(
                    department=f"dept-{i}", physician_count=10, launched_on=date(2026, 1, 1)
                )
            )
        )
    await tool.stop()

    seen: list[tuple[str, str]] = []
    failed_once: set[str] = set()
    loop = asyncio.get_running_loop()
    failed_at: list[float] = []
    redelivered_at: list[float] = []

    def listener() -> Hospital:
        hospital = Hospital(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)

        @hospital.durable(HospitalRegistered)
        async def registered(event: HospitalRegistered, envelope: Envelope) -> None:
            seen.append(("HospitalRegistered", envelope.id))

        @hospital.durable(DepartmentLaunched)
        async def launched(event: DepartmentLaunched, envelope: Envelope) -> None:
            if event.department == "dept-1":
                if "dept-1" not in failed_once:
                    failed_once.add("dept-1")
                    failed_at.append(loop.time())
                    raise RuntimeError("the hospital's own system is down for a moment")
                redelivered_at.append(loop.time())
            seen.append((event.department, envelope.id))

        return hospital

    async with listener():
        await until(lambda: len(seen) == 4)
        await all_acknowledged(kit_platform, new_hospital)
    # In stream order; the one that failed came back (at least once) before the next.
    assert [s[0] for s in seen] == ["HospitalRegistered", "dept-0", "dept-1", "dept-2"]
    assert failed_once == {"dept-1"}
    # Asked for again after a delay (0.5 s at the first failure), not at once: a lower bound,
    # which a slow machine can only make longer.
    assert redelivered_at[0] - failed_at[0] >= 0.4

    # Acknowledged events are not delivered again after a restart; new ones are.
    tool = await connect(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)
    await (
        await tool.send(
            LaunchDepartment(department="dept-3", physician_count=5, launched_on=date(2026, 2, 1))
        )
    )
    await tool.stop()
    async with listener():
        await until(lambda: len(seen) == 5)
        await asyncio.sleep(1)  # nothing else comes
    assert [s[0] for s in seen] == ["HospitalRegistered", "dept-0", "dept-1", "dept-2", "dept-3"]
    assert len({s[1] for s in seen}) == 5


async def test_live_handlers_run_on_the_key_and_leave_its_connection_up(
    kit_platform, hospital_keys, new_hospital
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    hospital = Hospital(new_hospital, kit_platform.nats_url, nkeys_seed=on.seed_file)
    launched: list[str] = []

    @hospital.on(DepartmentLaunched)
    async def tell(event: DepartmentLaunched) -> str:
        launched.append(event.department)
        return "a result FastStream would send to the platform's reply inbox by default"

    async with hospital:
        await (await hospital.send(RegisterHospital(name="Kit Live", physician_count=9)))
        for name in ("icu", "ward"):
            answer = await (
                await hospital.send(
                    LaunchDepartment(
                        department=name, physician_count=4, launched_on=date(2026, 1, 5)
                    )
                )
            )
            assert isinstance(answer, DepartmentLaunched)
        await until(lambda: launched == ["icu", "ward"])
        assert hospital.broker.connection.is_connected
