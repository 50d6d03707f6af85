"""The AsyncAPI 3.0 document of every subject, command and event, generated from the code.

FastStream writes it: a `NatsBroker` that never connects declares, from the platform's side,
a subscriber for every command of `shared.contracts.COMMANDS` on
``post.{hospital}.cmd.<Type>``, a publisher for every event of `EVENTS` on
``post.{hospital}.evt.<Type>`` and one for the dead-letter subject. Each message's payload
is the CloudEvents envelope of `shared.contracts.CloudEvent` with ``data`` typed as the
command or event model, so the schemas are the ones the services validate with. A few
things FastStream does not express (the ``{hospital}`` parameter, CloudEvents content type,
headers, where the correlation id is) are added to its output by `document`.

    python -m shared.asyncapi > docs/asyncapi.yaml      # after changing a contract
    python -m shared.asyncapi --json                     # the same document as JSON

``tests/unit/test_asyncapi.py`` fails when docs/asyncapi.yaml differs from this output.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Literal

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import AwareDatetime, BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from shared.contracts import (
    COMMANDS,
    CONTENT_TYPE,
    EVENTS,
    HOSPITAL_PATTERN,
    CloudEvent,
    cmd_subject,
    dlq_subject,
    evt_subject,
)

TITLE = "POST platform: integration contract"
CONTRACT_VERSION = "1"  # CONTRACT.md's "Integration contract, version 1"
DESCRIPTION = """\
The NATS subjects of the POST platform (physician peer support for many hospitals), from the
platform's side: it **receives** commands from hospital systems and **sends** events (facts).
The contract in words is `shared/CONTRACT.md`; the guide for hospital IT teams is
`docs/hospital-integration.md`.

- Transport: NATS JetStream, stream `POST` over `post.>`. Publish a command with the header
  `Nats-Msg-Id` set to its CloudEvents `id` (the idempotency key) and wait for the stream's
  acknowledgement.
- `{hospital}` is the tenant; it must equal the hospital of the CloudEvents `source`
  (`/hospitals/{hospital}/...`). A hospital's credentials may publish only
  `post.{hospital}.cmd.>` and subscribe only `post.{hospital}.evt.>` (and its own inbox
  prefix `_INBOX_{hospital}`).
- Every body is a CloudEvents 1.0 event in structured JSON mode
  (`application/cloudevents+json`); `data` is strict: an unknown field is refused. The
  envelope takes CloudEvents' core attributes and the extensions `correlationid`,
  `causationid`, `traceparent`, `tracestate`; any other attribute is refused the same way
  (`unknown_field`; a refusal counts unknown names, it never repeats one, nor a value).
- Limits (shared/limits.py), checked before the body is decoded: a command's body at most
  65536 bytes (`payload_too_large`) and nested at most 16 levels deep (`payload_too_deep`);
  either is answered by a `CommandRejected` under the command's top-level `id`.
- Every command ends in exactly one event whose `causationid` is the command's `id`: its
  success event or a `CommandRejected` with a `reason_code`.
- Ids are pseudonymous; the platform never receives names or free text.
"""
SERVER_DESCRIPTION = (
    "The embedded default (`postctl up`, `make demo`): one node on the loopback interface"
    " only, plaintext (`nats://`). Hospital keys work here with the same permissions as in a"
    " deployment."
)
# A deployment (docker-compose.yml, deploy/): CONTRACT.md 1.2, "Encryption in transit".
PRODUCTION = "production"
PRODUCTION_SERVER: dict[str, Any] = {
    "host": "{host}:{port}",
    "protocol": "nats",
    "description": (
        "A deployment: a cluster of three nodes (give your client all of them), TLS only"
        " (`tls://{host}:{port}`; a plaintext client is refused, and no connection is"
        " anonymous). Each node's certificate names the host and chains to the CA the platform"
        " team sends with your key (`ca.pem`, from `postctl certs`, or production's own). With"
        ' nats-py: `nats.connect(["tls://post.example.org:4222", ...],'
        ' nkeys_seed=FILE, inbox_prefix="_INBOX_<hospital>",'
        ' tls=ssl.create_default_context(cafile="ca.pem"))`.'
    ),
    "variables": {
        "host": {
            "description": "The platform's DNS name, given when the hospital is onboarded.",
            "default": "post.example.org",
        },
        "port": {
            "description": "One port per node of the cluster (docker-compose.yml).",
            "enum": ["4222", "4223", "4224"],
            "default": "4222",
        },
    },
    "tags": [{"name": "tls", "description": "TLS only: the URL scheme is `tls://`."}],
    "security": [{"$ref": "#/components/securitySchemes/hospital-nkey"}],
}
HOSPITAL_KEY = "hospital-nkey"
HOSPITAL_KEY_SCHEME = {
    # NATS NKeys are Ed25519 key pairs: the server sends a nonce, the client signs it.
    "type": "asymmetricEncryption",
    "description": (
        "A hospital's NKey (Ed25519): `postctl hospital onboard <hospital> --out FILE` writes"
        " its seed to FILE (mode 0600); the platform keeps only the public key. nats-py:"
        ' `nats.connect(servers, nkeys_seed=FILE, inbox_prefix="_INBOX_<hospital>")`:'
        " the inbox prefix is required, replies (the stream's acknowledgements) come back only"
        " on `_INBOX_<hospital>.>`. The key may publish `post.<hospital>.cmd.>`, subscribe"
        " `post.<hospital>.evt.>`, pull from its own durable consumer `hospital-<hospital>`,"
        " and nothing else."
    ),
}

# The success events of each command (CONTRACT.md's table); CommandRejected answers any of them.
ANSWERS: dict[str, tuple[str, ...]] = {
    "RegisterHospital": ("HospitalRegistered",),
    "LaunchDepartment": ("DepartmentLaunched",),
    "CloseDepartment": ("DepartmentClosed",),
    "RegisterSupporter": ("SupporterTrained",),
    "RetireSupporter": ("SupporterRetired",),
    "RequestReferral": ("ReferralCreated",),
    "RecordOutreach": ("OutreachAccepted", "OutreachDeclined", "OutreachUnreachable"),
    "RecordInteraction": ("InteractionCompleted",),
    "SubmitSurveyResponse": ("SurveyResponseRecorded",),
    "SetMatchingPolicy": ("MatchingPolicySet",),
    "SetSupporterAvailability": ("SupporterAvailabilityChanged",),
    "ForgetPhysician": ("PhysicianForgotten",),
}
# Events no command answers directly: who sends them, and when.
EMITTED: dict[str, str] = {
    "SupporterAssigned": (
        "Sent by matching after `ReferralCreated` (or a reassignment): `due_at` is 48 hours"
        " after `assigned_at`."
    ),
    "NoSupporterAvailable": "Sent by matching when a referral has no eligible supporter.",
    "AssignmentOverdue": (
        "Sent by matching when no outreach was recorded by `due_at`; a `SupporterAssigned`"
        " with reason `reassigned` follows when another supporter is eligible."
    ),
    "PhysicianForgotten": (
        "The answer to `ForgetPhysician`, and sent on its own when a hospital's retention"
        " forgets a physician. It has a new opaque `forget_id` instead of the id, which now"
        " stands in for it in `referral_ids` (the physician's referrals) and `referred_ids`"
        " (the referrals they made). Their `ReferralCreated` are then published again,"
        " redacted, with the same CloudEvents `id` and the header `Post-Forgotten`; the"
        " originals and every command that named the id are erased from the stream."
    ),
    "CommandRejected": (
        "The answer to a refused command: `command_id` and `causationid` are the command's"
        " `id`, `reason_code` says why."
    ),
}
# shared/consumer.py sets these on a dead letter; the body is the original message, unchanged.
DEAD_LETTER_HEADERS: dict[str, str] = {
    "Post-Dead-Letter-Reason": "why the message could not be handled (at most 500 characters)",
    "Post-Original-Subject": "the subject the message was published to",
    "Post-Service": "the service that gave up on it",
}
DEAD_LETTER = "DeadLetter"


def _answered_by(command: str) -> str:
    events = [*ANSWERS[command], "CommandRejected"]
    return " or ".join(f"`{evt_subject('{hospital}', e)}`" for e in events)


def _described(name: str, text: str) -> tuple[Any, FieldInfo]:
    """CloudEvent's own field (type and constraints) with a description for the document."""
    field = copy.copy(CloudEvent.model_fields[name])
    field.description = text
    return field.annotation, field


def envelope(type_name: str, data: type[BaseModel], *, event: bool) -> type[CloudEvent]:
    """The CloudEvents envelope of one command or event, `data` typed as its model."""
    fields: dict[str, Any] = {
        "type": (Literal[type_name], Field(description="The message type; equals the subject's.")),
        "data": (data, ...),
    }
    if event:  # the platform always sets these on what it sends
        fields["id"] = _described("id", "The event's id (also its `Nats-Msg-Id`).")
        fields["source"] = (str, Field(description="`/hospitals/{hospital}/{service}`."))
        fields["time"] = (AwareDatetime, Field(description="When the platform recorded it."))
        fields["datacontenttype"] = (Literal["application/json"], ...)
        fields["correlationid"] = (
            str,
            Field(description="The id of the command that started the chain."),
        )
        fields["causationid"] = (
            str,
            Field(description="The id of the message that directly caused this event."),
        )
    else:
        fields["id"] = _described(
            "id", "The idempotency key: the same id twice is handled once. Also `Nats-Msg-Id`."
        )
        fields["source"] = _described(
            "source", "`/hospitals/{hospital}/{your-system}`; its hospital must be the subject's."
        )
    suffix = "Event" if event else "Command"
    doc = f"The CloudEvents envelope of a `{type_name}` {suffix.lower()}."
    model: type[CloudEvent] = create_model(
        f"{type_name}{suffix}", __base__=CloudEvent, __doc__=doc, **fields
    )
    return model


def _receiver(model: type[BaseModel]) -> Any:
    """A handler whose one parameter tells FastStream the message's payload type."""

    async def receive(message: Any) -> None:
        return None

    receive.__annotations__ = {"message": model, "return": None}
    return receive


def build_broker() -> NatsBroker:
    """The broker that declares every subject; it is never connected."""
    broker = NatsBroker(
        "nats://127.0.0.1:4222",
        description=SERVER_DESCRIPTION,
    )
    for name, model in COMMANDS.items():
        broker.subscriber(
            cmd_subject("{hospital}", name),
            title=name,
            description=(
                f"Command `{name}`, owned by the {model.owner} service. Answered by"
                f" {_answered_by(name)}, whose `causationid` is this command's `id`."
            ),
        )(_receiver(envelope(name, model, event=False)))
    answering = {e: c for c, events in ANSWERS.items() for e in events}
    for name, event in EVENTS.items():
        about = EMITTED.get(name) or f"The success event of `{answering[name]}`."
        broker.publisher(
            evt_subject("{hospital}", name),
            title=name,
            description=f"Event `{name}`. {about}",
            schema=envelope(name, event, event=True),
        )
    broker.publisher(
        dlq_subject("{hospital}", "{message_type}"),
        title=DEAD_LETTER,
        description=(
            "A message that is not a CloudEvents command at all (bytes that are not JSON, JSON"
            " without an `id`), or one that failed every retry, published unchanged with the"
            " reason in its headers. `{message_type}` is the type of the subject it came from."
            " Read by the platform team; hospital credentials cannot subscribe to it."
        ),
        schema=bytes,
    )
    return broker


# --- what FastStream does not say, added to its output ---------------------------------------


def _rename_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (renames.get(v, v) if k == "$ref" else _rename_refs(v, renames))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rename_refs(v, renames) for v in node]
    return node


# W3C trace context (shared/tracing.py), the same values as the envelope's attributes.
TRACE_HEADERS = {
    "traceparent": "W3C trace context, as the envelope's `traceparent` (optional; on an event"
    " when the platform traces; on a command, taken only once the command is)",
    "tracestate": "W3C trace context, as the envelope's `tracestate` (optional)",
}


def _headers(properties: dict[str, str], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {k: {"type": "string", "description": v} for k, v in properties.items()},
        "required": required,
    }


def _complete(doc: dict[str, Any]) -> dict[str, Any]:
    order = {name: i for i, name in enumerate([*COMMANDS, *EVENTS, DEAD_LETTER])}

    def in_order(items: dict[str, Any]) -> dict[str, Any]:
        # FastStream's order follows set iteration (it changes with PYTHONHASHSEED).
        return dict(sorted(items.items(), key=lambda kv: order[kv[0]]))

    # One message per channel, named after its type: FastStream's `Type:SubscribeMessage`
    # keys hold a colon, which AsyncAPI component keys may not.
    renames: dict[str, str] = {}
    messages: dict[str, Any] = {}
    for key, message in doc["components"]["messages"].items():
        name = key.split(":")[0]
        renames[f"#/components/messages/{key}"] = f"#/components/messages/{name}"
        messages[name] = message
    for key, channel in doc["channels"].items():
        (inner,) = channel["messages"]
        renames[f"#/channels/{key}/messages/{inner}"] = f"#/channels/{key}/messages/{key}"
        channel["messages"] = {key: channel["messages"][inner]}
    schemas: dict[str, Any] = {}
    for key, schema in doc["components"]["schemas"].items():
        name = key.split(":")[0]  # FastStream's `DeadLetter:Message:Payload`
        renames[f"#/components/schemas/{key}"] = f"#/components/schemas/{name}"
        schemas[name] = {**schema, "title": name} if name != key else schema
    doc["components"]["messages"] = in_order(messages)
    doc["components"]["schemas"] = dict(sorted(schemas.items()))
    doc["channels"] = in_order(doc["channels"])
    doc["operations"] = in_order(doc["operations"])
    doc = _rename_refs(doc, renames)

    for key, channel in doc["channels"].items():
        channel["parameters"] = {
            "hospital": {
                "description": f"The hospital (tenant) id, `{HOSPITAL_PATTERN}`.",
                "examples": ["st-mary"],
            }
        }
        if key == DEAD_LETTER:
            channel["parameters"]["message_type"] = {
                "description": "The type of the message that was dead-lettered.",
                "enum": [*COMMANDS, *EVENTS],
            }

    # FastStream knows one server, without TLS or NKeys: the deployment's is added, and both
    # name the hospital key as their security.
    doc["servers"]["development"]["security"] = [
        {"$ref": f"#/components/securitySchemes/{HOSPITAL_KEY}"}
    ]
    doc["servers"][PRODUCTION] = PRODUCTION_SERVER
    doc["components"]["securitySchemes"] = {HOSPITAL_KEY: HOSPITAL_KEY_SCHEME}
    for channel in doc["channels"].values():
        channel["servers"] = [{"$ref": f"#/servers/{name}"} for name in doc["servers"]]

    for name, message in doc["components"]["messages"].items():
        message["name"] = name
        message["title"] = name
        if name in COMMANDS:
            message["contentType"] = CONTENT_TYPE
            message["correlationId"] = {
                "description": "A command's id is its idempotency key and the chain's start.",
                "location": "$message.payload#/id",
            }
            message["headers"] = _headers(
                {
                    "Nats-Msg-Id": "the command's CloudEvents `id` (JetStream deduplication)",
                    **TRACE_HEADERS,
                },
                ["Nats-Msg-Id"],
            )
        elif name in EVENTS:
            message["contentType"] = CONTENT_TYPE
            message["correlationId"] = {
                "description": "The id of the command that started the chain.",
                "location": "$message.payload#/correlationid",
            }
            message["headers"] = _headers(
                {"Nats-Msg-Id": "the event's CloudEvents `id`", **TRACE_HEADERS}, ["Nats-Msg-Id"]
            )
        else:  # the dead letter: the original bytes, whatever they were
            message["contentType"] = "application/octet-stream"
            message.pop("correlationId", None)
            message["headers"] = _headers(DEAD_LETTER_HEADERS, [*DEAD_LETTER_HEADERS])
    return doc


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain data."""
    spec = AsyncAPI(
        build_broker(),
        title=TITLE,
        version=CONTRACT_VERSION,
        description=DESCRIPTION,
        schema_version="3.0.0",
    ).to_specification()
    return _complete(spec.to_jsonable())


HEADER = "# Generated by `python -m shared.asyncapi` from shared/contracts/: do not edit.\n"


def to_yaml(doc: dict[str, Any]) -> str:
    import yaml  # pyyaml is a dev dependency: the services never render the document

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]  # pyyaml ships no types
        def ignore_aliases(self, data: Any) -> bool:
            return True  # no &id001 anchors: every channel reads on its own

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None  # descriptions stay readable Markdown
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    body: str = yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the AsyncAPI document of the contract.")
    parser.add_argument("--json", action="store_true", help="JSON instead of YAML")
    args = parser.parse_args(argv)
    doc = document()
    sys.stdout.write(to_json(doc) if args.json else to_yaml(doc))


if __name__ == "__main__":
    main()
