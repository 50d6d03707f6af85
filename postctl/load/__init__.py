"""The load generator (`postctl load`): a known mix of commands from several hospitals.

It speaks only the contract, through NATS, as hospital systems do: CloudEvents commands
published with `shared.client.PlatformClient` (``Nats-Msg-Id`` = the command id), answers read
back from the ``POST`` stream. Its parts:

- **The mix** (`mix`, pure, seeded): each hospital's roster, then an endless series of *flows*
  drawn with fixed weights (`FLOW_WEIGHTS`, `REFERRAL_FATES`): a referral and the records of its
  fate (accepted, declined, unreachable, an interaction without outreach, an outreach by the
  wrong supporter first, no record at all; a few in a department without supporters), a survey
  response, an identical repeat under a new id, or a command that must be refused
  (`unknown_field`, `unknown_department`). Every planned command knows the answer it must get.
- **The driver** (`run`): sends at most ``rate`` commands a second for ``duration`` seconds (or
  up to ``max_commands``). A referral's records wait for its `SupporterAssigned`, as a supporter
  waits to be told, and each step waits for the answer to the one before. Publishing is retried
  with the same CloudEvents id while NATS is away (harmless by contract).
- **The event log** (`eventlog`): answers come from an ephemeral consumer on the stream,
  recreated from the last sequence seen after any failure, so nothing published while the
  generator was disconnected is missed.
- **The checks** (`report`, `oracle`): every command ended in exactly one outcome event (its
  success event or a `CommandRejected`, the one expected), no event was stored twice, and the
  RE-AIM figures equal those computed here from the commands sent (`expected_reaim`),
  independently of the analytics service. Latency is from the first publish of a command to the
  time its outcome was stored.

The generator needs the platform's NATS user (it reads the stream). Hospitals it creates are
named ``load-{tag}-{n}``, fresh for every run.
"""

from postctl.load.eventlog import EventLog
from postctl.load.mix import (
    FLOW_WEIGHTS,
    NOT_LAUNCHED,
    UNSTAFFED_DEPARTMENT,
    Mix,
    Planned,
    RecordsStep,
)
from postctl.load.oracle import expected_reaim, figure_mismatches
from postctl.load.report import LoadReport, percentile
from postctl.load.run import (
    LoadConfig,
    LoadRun,
    Pacer,
    Sent,
    add_cli,
    check_figures,
)

__all__ = [
    "FLOW_WEIGHTS",
    "NOT_LAUNCHED",
    "UNSTAFFED_DEPARTMENT",
    "EventLog",
    "LoadConfig",
    "LoadReport",
    "LoadRun",
    "Mix",
    "Pacer",
    "Planned",
    "RecordsStep",
    "Sent",
    "add_cli",
    "check_figures",
    "expected_reaim",
    "figure_mismatches",
    "percentile",
]
