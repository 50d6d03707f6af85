"""Unit-test a hospital's handlers offline, on FastStream's `TestNatsBroker`.

    async with testing.hospital_under_test(hospital) as platform:
        platform.answer_with(RequestReferral, lambda cmd: [referral_created(cmd), assigned])
        sent = await hospital.send(RequestReferral(...))
        await sent.followed_by(SupporterAssigned)
        await platform.deliver(SupporterAssigned(...))      # runs your handlers
        assert platform.commands(RecordOutreach) == [...]

What it is not: `TestNatsBroker` calls handlers directly, with no JetStream, so there is no
storage, dedupe, redelivery or acknowledgement here; durable and live handlers both receive
what `deliver` sends. Behaviour under failure needs a real nats-server (see the README).
"""

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from faststream.nats import NatsMessage, TestNatsBroker

from post_client import contracts as c
from post_client.hospital import STREAM, Hospital, Sent

C = TypeVar("C", bound=c.Command)
Responder = Callable[[Any], Iterable[c.Event] | c.Event | None]


class PlatformDouble:
    """The platform's side of a hospital under test: records the commands it publishes,
    answers them as told, and delivers events to its handlers."""

    def __init__(self, hospital: Hospital, broker: Any) -> None:
        self.hospital = hospital
        self.broker = broker
        self.sent: list[tuple[c.CloudEvent, c.Command]] = []
        self._responders: dict[type[c.Command], Responder] = {}

    def commands(self, command_type: type[C] | None = None) -> list[Any]:
        """The commands the hospital published, in order (of one type, if given)."""
        return [cmd for _, cmd in self.sent if command_type is None or type(cmd) is command_type]

    def envelopes(self) -> list[c.CloudEvent]:
        return [ce for ce, _ in self.sent]

    def answer_with(self, command_type: type[C], responder: Callable[[C], Any]) -> None:
        """Answer every `command_type` the hospital sends with the events `responder` returns
        (one, several, or None), as the platform would: the first is the command's answer
        (`causationid` = the command id), all carry `correlationid` = the command id."""
        self._responders[command_type] = responder

    async def _on_command(self, message: NatsMessage) -> None:
        ce = c.CloudEvent.model_validate_json(message.body)
        command = c.parse_payload(c.COMMANDS[ce.type], ce.data)
        self.sent.append((ce, command))
        responder = self._responders.get(type(command))
        if responder is None:
            return
        answered = responder(command)
        events = [answered] if isinstance(answered, c.Event) else list(answered or [])
        cause = ce.id
        for event in events:
            if isinstance(event, c.CommandRejected):
                event = event.model_copy(update={"command_id": ce.id})
            cause = await self.deliver(event, causationid=cause, correlationid=ce.id)

    async def deliver(
        self,
        event: c.Event,
        *,
        id: str | None = None,
        causationid: str | None = None,
        correlationid: str | None = None,
        time: datetime | None = None,
    ) -> str:
        """Publish an event on ``post.<hospital>.evt.<Type>`` as the platform does (a
        CloudEvent with `data` = the payload); every matching handler runs. Returns its id."""
        ce = c.make_cloudevent(
            type_=event.type_name,
            source=f"/hospitals/{self.hospital.id}/platform",
            data=event.to_data(),
            id_=id,
            time=time,
            correlationid=correlationid,
            causationid=causationid,
        )
        await self.broker.publish(c.encode(ce), c.evt_subject(self.hospital.id, event.type_name))
        return str(ce["id"])

    async def refuse(
        self, sent: Sent[Any], reason_code: c.ReasonCode, detail: str = "refused in a test"
    ) -> None:
        """Answer a sent command with `CommandRejected`, as the platform does."""
        await self.deliver(
            c.CommandRejected(
                hospital=self.hospital.id,
                command_id=sent.id,
                command_type=sent.command.type_name,
                reason_code=reason_code,
                detail=detail,
            ),
            causationid=sent.id,
            correlationid=sent.id,
        )


def refuse_with(
    hospital: str, reason_code: c.ReasonCode, detail: str = "refused in a test"
) -> Callable[[c.Command], c.CommandRejected]:
    """A responder for `answer_with` that refuses each command (with its own id)."""

    def respond(command: c.Command) -> c.CommandRejected:
        return c.CommandRejected(
            hospital=hospital,
            command_id="set-on-delivery",
            command_type=command.type_name,
            reason_code=reason_code,
            detail=detail,
        )

    return respond


@asynccontextmanager
async def hospital_under_test(hospital: Hospital) -> AsyncIterator[PlatformDouble]:
    """Run `hospital` (its handlers and publishers) on `TestNatsBroker`, with a platform
    double that records its commands and delivers events. No nats-server is needed."""
    double: PlatformDouble | None = None

    async def on_command(message: NatsMessage) -> None:
        assert double is not None
        await double._on_command(message)

    # the publishers go to JetStream (the stream `POST`): so does the double's subscription
    hospital.broker.subscriber(c.cmd_subject(hospital.id, ">"), stream=STREAM)(on_command)
    hospital._close_durable()
    async with TestNatsBroker(hospital.broker) as broker:
        double = PlatformDouble(hospital, broker)
        yield double
