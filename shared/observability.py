"""structlog JSON logging and the Prometheus metrics every service shares."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def configure_logging(service: str, level: str = "info") -> None:
    """JSON lines on stdout with the service name; handlers bind correlation id and type."""
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


MESSAGES_HANDLED = Counter(
    "post_messages_handled_total",
    "Messages taken from JetStream, by type and how their handling ended.",
    ["service", "message_type", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "post_handler_seconds",
    "Time to handle one message, database transaction included.",
    ["service", "message_type"],
    buckets=LATENCY_BUCKETS,
)
COMMANDS_REJECTED = Counter(
    "post_commands_rejected_total",
    "Commands answered with CommandRejected, by reason code.",
    ["service", "command_type", "reason_code"],
)
DEAD_LETTERS = Counter(
    "post_dead_letters_total",
    "Messages sent to a dead-letter subject, by type.",
    ["service", "message_type"],
)
COMMANDS_ERASED = Counter(
    "post_commands_erased_total",
    "Command messages erased from the stream once answered: refused, duplicate or dead-lettered"
    " (their bodies may hold what the platform never keeps).",
    ["service", "command_type"],
)
OUTBOX_BACKLOG = Gauge(
    "post_outbox_backlog", "Committed events not yet published to JetStream.", ["service"]
)
OUTBOX_PUBLISHED = Counter(
    "post_outbox_published_total", "Events published by the outbox relay.", ["service"]
)
OUTBOX_PUBLISH_SECONDS = Histogram(
    "post_outbox_publish_seconds",
    "Time to publish one batch from the outbox and have JetStream acknowledge it.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
CONSUMER_PENDING = Gauge(
    "post_consumer_pending_messages",
    "Messages of a partition not yet delivered to the service (lag), by the partition's holder.",
    ["service", "partition"],
)
CONSUMER_ACK_PENDING = Gauge(
    "post_consumer_ack_pending_messages",
    "Messages of a partition delivered to the service but not yet acknowledged.",
    ["service", "partition"],
)
HOSPITALS_HELD_BACK = Gauge(
    "post_hospitals_held_back",
    "Hospitals of a partition whose messages wait behind one that failed for a passing reason"
    " and is tried again (the partition's other hospitals go on).",
    ["service", "partition"],
)
PARTITIONS_HELD = Gauge(
    "post_partitions_held",
    "Partitions of the service this instance holds (summed over instances: every partition).",
    ["service"],
)
DB_ROUND_TRIPS = Counter(
    "post_db_round_trips_total",
    "Statements sent to PostgreSQL and answered (one round trip each; a simple-protocol string"
    " of several statements is one), by the service's connections.",
    ["service"],
)
SERVICE_UP = Gauge("post_service_up", "1 while the service is consuming.", ["service"])
