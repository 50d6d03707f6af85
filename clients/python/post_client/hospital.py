"""A hospital's connection to the POST platform, as a FastStream application.

`Hospital` wraps one `faststream.nats.NatsBroker` connected with the hospital's NKey seed and
its inbox prefix (``_INBOX_<hospital>``: the only replies its key may receive). On it:

- ``@hospital.on(EventType)``: a live subscriber on ``post.<hospital>.evt.<EventType>``;
- ``@hospital.durable(EventType)``: a handler on the hospital's durable consumer
  ``hospital-<hospital>`` (every event, in stream order, at least once, also those published
  while the hospital was away); the handler's return acknowledges, an exception delivers
  the event again after a growing pause, before any later event;
- ``hospital.publisher(CommandType)`` / ``hospital.send(command)``: publish a command as a
  CloudEvent with ``Nats-Msg-Id`` set to its id, to JetStream (waits for the stream's ack);
  the returned `Sent` is awaitable: the command's success event, or `CommandRefused`.

Handlers take typed parameters: the event's pydantic model (decoded from the CloudEvent's
``data``), and optionally ``envelope: Envelope`` for the CloudEvents attributes.
"""

import asyncio
import functools
import logging
import uuid
import weakref
from collections.abc import Callable, Generator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from faststream import Depends
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from post_client import contracts as c
from post_client.contracts import CloudEvent

E = TypeVar("E", bound=c.Event)
C = TypeVar("C", bound=c.Command)

# The hospital may read its events and publish its commands, never create or change the stream.
STREAM = JStream(c.STREAM_NAME, declare=False)
DEFAULT_PUBLISH_ATTEMPTS = 3

# A fixed namespace for `idempotent_id`: the same key gives the same id in every process.
_ID_NAMESPACE = uuid.UUID("6f1c3b0e-0c51-4a4e-9d5e-2b1f0a7c9e11")


_log = logging.getLogger("post_client")

REDELIVERY_MAX_SECONDS = 10.0  # well within the consumer's ack wait (30 s)


def delivered_count(message: Any) -> int | None:
    """How many times JetStream delivered `message` (this time included); None when it is not
    a JetStream message (FastStream's TestNatsBroker calls handlers directly)."""
    try:
        metadata = message.raw_message.metadata
    except Exception:
        return None
    return None if metadata is None else int(metadata.num_delivered or 1)


def redelivery_delay(delivered: int, failures: int) -> float:
    """How long to wait before an event whose handler failed `failures` times in this process
    is handled again. An event JetStream delivered before (`delivered` > 1: to a process that
    died or did not acknowledge it within the ack wait) starts further along the doubling."""
    return float(min(0.5 * 2 ** (delivered + failures - 2), REDELIVERY_MAX_SECONDS))


def consumer_name(hospital: str) -> str:
    """The hospital's durable consumer on the `POST` stream (CONTRACT.md "Durable delivery")."""
    return f"hospital-{hospital}"


def inbox_prefix(hospital: str) -> str:
    """The only subjects the hospital's key may receive replies on."""
    return f"_INBOX_{hospital}"


def idempotent_id(hospital: str, *key: str) -> str:
    """A command id that is the same every time it is made from the same key: a process that
    restarts and sends "the referral r-17" again sends the same id, which the platform then
    processes once (CONTRACT.md: a command's id is its idempotency key, however far apart)."""
    return str(uuid.uuid5(_ID_NAMESPACE, "/".join((hospital, *key))))


class NotOnboarded(Exception):
    """The hospital's durable consumer does not exist, or its key may not read it."""


class CommandRefused(Exception):
    """The platform answered a command with `CommandRejected`: `reason_code` says why."""

    def __init__(self, rejected: c.CommandRejected) -> None:
        super().__init__(
            f"{rejected.command_type} refused: {rejected.reason_code}: {rejected.detail}"
        )
        self.rejected = rejected
        self.reason_code = rejected.reason_code
        self.detail = rejected.detail


def decode_event(body: bytes) -> tuple[c.CloudEvent, c.Event | None]:
    """A platform event's body -> its envelope and typed payload (None for a type this version
    of the package does not know). Fields the platform added after this version are ignored,
    so an older client keeps working when the platform grows (the contract only adds)."""
    ce = c.CloudEvent.model_validate_json(body)
    model = c.EVENTS.get(ce.type)
    if model is None:
        return ce, None
    known = {k: v for k, v in ce.data.items() if k in model.model_fields}
    return ce, c.parse_payload(model, known)


def _decoded_payload(msg: NatsMessage) -> Any:
    ce, event = decode_event(msg.body)
    return event if event is not None else ce


def _envelope(message: NatsMessage) -> CloudEvent:
    return c.CloudEvent.model_validate_json(message.body)


# A handler parameter for the CloudEvents attributes: ``envelope: Envelope``.
Envelope = Annotated[c.CloudEvent, Depends(_envelope)]


def _of_type(event_type: type[c.Event]) -> Callable[[NatsMessage], bool]:
    suffix = f".evt.{event_type.type_name}"

    def matches(msg: NatsMessage) -> bool:
        return str(msg.raw_message.subject).endswith(suffix)

    return matches


class Sent(Generic[C]):
    """A command published to the platform. ``await sent`` (or ``await sent.answer()``) gives its
    success event, or raises `CommandRefused`; ``await sent.followed_by(SupporterAssigned)``
    the first later event of its chain (the same `correlationid`) of one of the given types.
    Events are collected from the moment of sending, so none is missed by awaiting late."""

    def __init__(self, command: C, id_: str) -> None:
        self.command = command
        self.id = id_
        self._events: list[tuple[c.CloudEvent, c.Event | None]] = []
        self._changed = asyncio.Event()

    def _add(self, ce: c.CloudEvent, event: c.Event | None) -> None:
        self._events.append((ce, event))
        self._changed.set()

    def _refusal(self) -> c.CommandRejected | None:
        for _, event in self._events:
            if isinstance(event, c.CommandRejected) and event.command_id == self.id:
                return event
        return None

    async def _wait(self, find: Callable[[], Any], timeout: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (found := find()) is None:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                # The platform answers a command once: an id (or a payload) it has already
                # processed is not answered again, so a resend waits here too.
                raise TimeoutError(
                    f"no {what} for {self.command.type_name} {self.id} after {timeout} s"
                    " (a command already processed is not answered again)"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return found

    async def answer(self, timeout: float = 30.0) -> c.Event:
        """The command's success event; `CommandRefused` if the platform refused it."""

        def find() -> c.Event | None:
            if (refused := self._refusal()) is not None:
                raise CommandRefused(refused)
            for ce, event in self._events:
                if ce.causationid == self.id and event is not None:
                    return event
            return None

        result: c.Event = await self._wait(find, timeout, "answer")
        return result

    def __await__(self) -> Generator[Any, None, c.Event]:
        return self.answer().__await__()

    async def followed_by(self, *event_types: type[E], timeout: float = 60.0) -> E:
        """The first event of this command's chain of one of `event_types` (for example the
        `SupporterAssigned` or `NoSupporterAvailable` after a `RequestReferral`)."""

        def find() -> E | None:
            if (refused := self._refusal()) is not None:
                raise CommandRefused(refused)
            for ce, event in self._events:
                if ce.correlationid == self.id and isinstance(event, event_types):
                    return event
            return None

        names = "/".join(t.type_name for t in event_types)
        result: E = await self._wait(find, timeout, names)
        return result


class CommandPublisher(Generic[C]):
    """A typed publisher of one command type: `publish` sets the envelope and the ids."""

    def __init__(self, hospital: "Hospital", command_type: type[C]) -> None:
        self.hospital = hospital
        self.command_type = command_type
        self.subject = c.cmd_subject(hospital.id, command_type.type_name)
        self.publisher = hospital.broker.publisher(
            self.subject,
            stream=STREAM,
            title=f"{self.subject}:publish",
            description=f"{command_type.type_name} (CloudEvents 1.0, structured JSON)",
        )

    async def publish(
        self, command: C, *, id: str | None = None, time: datetime | None = None
    ) -> Sent[C]:
        """Publish `command` with CloudEvents `id` = `id` (a new UUID when None): the same id
        is the same command to the platform, so pass a stable one (`idempotent_id`) when a
        restart may send it again. Retries the publish itself with the same id."""
        if not isinstance(command, self.command_type):
            raise TypeError(f"expected {self.command_type.__name__}, got {type(command).__name__}")
        ce = c.make_cloudevent(
            type_=command.type_name,
            source=f"/hospitals/{self.hospital.id}/{self.hospital.origin}",
            data=command.to_data(),
            id_=id,
            time=time,
        )
        sent: Sent[C] = Sent(command, ce["id"])
        self.hospital._pending[sent.id] = sent  # before publishing: no answer can be missed
        headers = {"Nats-Msg-Id": sent.id, "content-type": c.CONTENT_TYPE}
        for attempt in range(1, self.hospital.publish_attempts + 1):
            try:
                await self.publisher.publish(c.encode(ce), headers=headers)
                break
            except Exception:
                # JetStream's ack did not come: the same Nats-Msg-Id makes a retry safe.
                if attempt == self.hospital.publish_attempts:
                    raise
                await asyncio.sleep(0.5 * attempt)
        return sent


class Hospital:
    """One hospital's FastStream application on the platform's NATS.

    ``Hospital("st-marys", "nats://platform:4222", nkeys_seed="st-marys.nk")`` connects with
    ``nats.connect(servers, nkeys_seed=FILE, inbox_prefix="_INBOX_st-marys")`` underneath.
    Register handlers, then ``async with hospital:`` (or ``await hospital.start()``).
    """

    def __init__(
        self,
        hospital: str,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        nkeys_seed: str | Path | None = None,
        nkeys_seed_str: str | None = None,
        origin: str = "system",
        publish_attempts: int = DEFAULT_PUBLISH_ATTEMPTS,
        pull_timeout: float = 5.0,
        **broker_options: Any,
    ) -> None:
        if not c.is_slug(hospital):
            raise ValueError("a hospital id is a slug: [a-z0-9][a-z0-9-]{0,62}")
        self.id = hospital
        self.origin = origin
        self.publish_attempts = publish_attempts
        self.pull_timeout = pull_timeout
        options: dict[str, Any] = {"inbox_prefix": inbox_prefix(hospital), **broker_options}
        if nkeys_seed is not None:
            options["nkeys_seed"] = str(nkeys_seed)
        if nkeys_seed_str is not None:
            options["nkeys_seed_str"] = nkeys_seed_str
        options.setdefault("name", f"post-client/{hospital}")
        # FastStream logs every message at INFO ("Received", "Processed"): keep that to DEBUG
        options.setdefault("log_level", logging.DEBUG)
        self.broker = NatsBroker(servers, **options)
        self._pending: weakref.WeakValueDictionary[str, Sent[Any]] = weakref.WeakValueDictionary()
        self._publishers: dict[type[c.Command], CommandPublisher[Any]] = {}
        self._durable: Any = None
        self._durable_closed = False
        # Answers to this process's commands come on the live subscription (not durable: an
        # answer awaited by a process that is gone has nobody to give it to).
        answers = self.broker.subscriber(
            c.evt_subject(hospital, ">"), no_reply=True, title=f"post.{hospital}.evt.>:answers"
        )
        answers(self._on_answer_candidate)
        # Every command's publisher exists before the broker starts (and documents it).
        for command_type in c.COMMANDS.values():
            self._publishers[command_type] = CommandPublisher(self, command_type)

    async def _on_answer_candidate(self, message: NatsMessage) -> None:
        if not self._pending:
            return
        ce, event = decode_event(message.body)
        keys = {ce.causationid, ce.correlationid}
        if isinstance(event, c.CommandRejected):
            keys.add(event.command_id)
        for key in keys:
            if key is not None and (sent := self._pending.get(key)) is not None:
                sent._add(ce, event)

    # --- subscribers ----------------------------------------------------------------------

    def on(self, event_type: type[E], **subscriber_options: Any) -> Callable[[Any], Any]:
        """A live subscriber on ``post.<hospital>.evt.<EventType>``: events published while
        the hospital is connected, at most once. For every event, use `durable`."""
        subscriber = self.broker.subscriber(
            c.evt_subject(self.id, event_type.type_name),
            decoder=_decoded_payload,
            # An event on its subject carries the reply inbox of the platform's JetStream
            # publish: FastStream would answer it with the handler's result (and a hospital's
            # key may not publish there: NATS breaks the connection).
            no_reply=True,
            **subscriber_options,
        )

        def register(func: Any) -> Any:
            return subscriber(func)

        return register

    def durable(self, event_type: type[E]) -> Callable[[Any], Any]:
        """A handler on the durable consumer ``hospital-<hospital>``: every event of that type,
        in stream order, at least once (the CloudEvents `id` identifies a redelivery). The
        event is acknowledged when the handler returns; after an exception the handler gets it
        again after a pause (0.5 s, doubling, at most 10 s), before any later event."""
        if self._durable_closed:
            raise RuntimeError("register durable handlers before the hospital starts")
        if self._durable is None:
            self._durable = self.broker.subscriber(
                c.evt_subject(self.id, ">"),
                stream=STREAM,
                durable=consumer_name(self.id),
                # one at a time: FastStream handles a fetched batch concurrently, out of order
                pull_sub=PullSub(batch_size=1, timeout=self.pull_timeout),
                # acknowledged by `_acknowledging`: FastStream's NACK_ON_ERROR redelivers at once,
                # and a handler failing for a while would spin
                ack_policy=AckPolicy.MANUAL,
                decoder=_decoded_payload,
                no_reply=True,
                # nats-py's pull subscription takes its own inbox prefix (default `_INBOX.`),
                # not the connection's: without this the key may not receive the fetched events
                inbox_prefix=f"{inbox_prefix(self.id)}.".encode(),
                title=f"{consumer_name(self.id)}:durable",
            )
        durable = self._durable

        def register(func: Any) -> Any:
            return durable(self._acknowledging(func), filter=_of_type(event_type))

        return register

    def _acknowledging(self, func: Any) -> Any:
        """`func`, acknowledging its event when it returns. On an exception it keeps the event
        (telling JetStream it is in progress, so the ack wait starts again), waits (0.5 s after
        the first failure, doubling, at most `REDELIVERY_MAX_SECONDS`) and hands it to `func`
        again, until it returns. Retrying here, not with a nak, keeps stream order: nothing later
        is fetched meanwhile. A nak would not: nats-server takes acknowledgements and pull
        requests on separate queues, so the next fetch can overtake the nak and bring the next
        event first (seen in CI). If this process dies meanwhile, JetStream delivers the event
        again after the ack wait, before any later one the consumer has not delivered."""
        context = self.broker.context

        @functools.wraps(func)
        async def acknowledging(*args: Any, **kwargs: Any) -> Any:
            message = context.get_local("message")
            failures = 0
            while True:
                try:
                    result = await func(*args, **kwargs)
                except Exception:
                    delivered = delivered_count(message)
                    if delivered is None:
                        raise  # FastStream's TestNatsBroker: the test that delivered it fails
                    failures += 1
                    delay = redelivery_delay(delivered, failures)
                    _log.exception(
                        "durable handler %s failed (%d times); handled again in %.1f s",
                        getattr(func, "__name__", "handler"),
                        failures,
                        delay,
                    )
                    await message.in_progress()
                    await asyncio.sleep(delay)
                    continue
                await message.ack()
                return result

        return acknowledging

    def _close_durable(self) -> None:
        # Events no handler takes are acknowledged: otherwise FastStream finds no handler,
        # the message is redelivered for ever and holds back every later event.
        if self._durable is not None and not self._durable_closed:

            async def not_handled_here(body: Any) -> None:
                return None

            self._durable(self._acknowledging(not_handled_here))
        self._durable_closed = True

    # --- publishers -----------------------------------------------------------------------

    def publisher(self, command_type: type[C]) -> CommandPublisher[C]:
        publisher: CommandPublisher[C] = self._publishers[command_type]
        return publisher

    async def send(
        self, command: C, *, id: str | None = None, time: datetime | None = None
    ) -> Sent[C]:
        """Publish a command (see `CommandPublisher.publish`); await the result for its answer."""
        return await self.publisher(type(command)).publish(command, id=id, time=time)

    def idempotent_id(self, *key: str) -> str:
        return idempotent_id(self.id, *key)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "Hospital":
        self._close_durable()
        connection = await self.broker.connect()
        if self._durable is not None:
            await self._check_durable(connection)
        await self.broker.start()
        return self

    async def _check_durable(self, connection: Any) -> None:
        # FastStream binds to an existing durable consumer, but when there is none it tries to
        # create one (which a hospital's key may not do), and then starts anyway and waits for
        # ever in silence (tests/platform/test_durable_binding.py). So look first, with nats-py.
        name = consumer_name(self.id)
        try:
            await connection.jetstream().consumer_info(c.STREAM_NAME, name)
        except NotFoundError:
            raise NotOnboarded(
                f"no durable consumer {name} on {c.STREAM_NAME}: onboard the hospital first "
                f"(postctl hospital onboard {self.id})"
            ) from None
        except NatsTimeoutError:
            raise NotOnboarded(
                f"no answer to the info of {name}: is this the key of {self.id}?"
            ) from None

    async def stop(self) -> None:
        await self.broker.stop()

    async def __aenter__(self) -> "Hospital":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def connect(
    hospital: str,
    servers: str | list[str] = "nats://127.0.0.1:4222",
    *,
    nkeys_seed: str | Path | None = None,
    **options: Any,
) -> Hospital:
    """Connect in one call (for tools that only send and await answers): a started Hospital."""
    return await Hospital(hospital, servers, nkeys_seed=nkeys_seed, **options).start()
