"""The one `POST` stream and its subjects: ``post.{hospital}.{cmd|evt|dlq}.{Type}``."""

from __future__ import annotations

STREAM_NAME = "POST"
STREAM_SUBJECTS = ["post.>"]


def cmd_subject(hospital: str, command_type: str) -> str:
    return f"post.{hospital}.cmd.{command_type}"


def evt_subject(hospital: str, event_type: str) -> str:
    return f"post.{hospital}.evt.{event_type}"


def dlq_subject(hospital: str, message_type: str) -> str:
    return f"post.{hospital}.dlq.{message_type}"


def parse_subject(subject: str) -> tuple[str, str, str]:
    """``post.{hospital}.{kind}.{Type}`` -> (hospital, kind, Type); ValueError otherwise."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "post" or parts[2] not in ("cmd", "evt", "dlq"):
        raise ValueError(f"not a POST subject: {subject[:120]!r}")
    return parts[1], parts[2], parts[3]
