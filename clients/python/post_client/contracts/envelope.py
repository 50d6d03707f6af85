# GENERATED from the platform's shared/contracts/envelope.py by clients/python/sync_contracts.py:
# do not edit. The platform's tests compare the JSON Schemas of both, field by field.
"""The CloudEvents 1.0 envelope (structured JSON mode) every body travels in."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints

from post_client.contracts.base import _HOSPITAL_RE, Command
from post_client.contracts.subjects import cmd_subject

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"
CONTENT_TYPE = "application/cloudevents+json"


class CloudEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode: the spec's core attributes and the extensions
    the platform knows (correlationid, causationid; traceparent and tracestate of the
    distributed-tracing extension). Any other attribute is refused like an unknown payload
    field (`unknown_field`, counted, never named): an attribute the platform does not know
    is text it would otherwise carry unread."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    time: AwareDatetime | None = None
    datacontenttype: Literal["application/json"] | None = None
    dataschema: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    data: dict[str, Any]

    @property
    def hospital(self) -> str | None:
        return hospital_of_source(self.source)


def hospital_of_source(source: str) -> str | None:
    """``/hospitals/{hospital}/...`` -> hospital, or None when the source names none."""
    parts = source.split("/")
    if (
        len(parts) >= 3
        and parts[0] == ""
        and parts[1] == "hospitals"
        and _HOSPITAL_RE.match(parts[2])
    ):
        return parts[2]
    return None


def new_id() -> str:
    return str(uuid.uuid4())


def make_cloudevent(
    *,
    type_: str,
    source: str,
    data: dict[str, Any],
    id_: str | None = None,
    time: datetime | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> dict[str, Any]:
    ce: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id_ or new_id(),
        "source": source,
        "type": type_,
        "time": (time or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": DATACONTENTTYPE,
        "data": data,
    }
    if correlationid is not None:
        ce["correlationid"] = correlationid
    if causationid is not None:
        ce["causationid"] = causationid
    # The CloudEvents distributed-tracing extension (W3C trace context; shared/tracing.py)
    if traceparent is not None:
        ce["traceparent"] = traceparent
    if tracestate is not None:
        ce["tracestate"] = tracestate
    return ce


def encode(ce: dict[str, Any]) -> bytes:
    return json.dumps(ce, separators=(",", ":")).encode()


def command_message(
    hospital: str,
    command: Command,
    *,
    id_: str | None = None,
    origin: str = "system",
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> tuple[str, bytes, str]:
    """Build what a hospital system publishes: (subject, body, Nats-Msg-Id); with the W3C
    trace context of the sender's span when it traces (the platform's handling joins that
    trace once the command is taken)."""
    ce = make_cloudevent(
        type_=command.type_name,
        source=f"/hospitals/{hospital}/{origin}",
        data=command.to_data(),
        id_=id_,
        traceparent=traceparent,
        tracestate=tracestate,
    )
    return cmd_subject(hospital, command.type_name), encode(ce), ce["id"]
