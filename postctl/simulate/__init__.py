"""Simulators that speak only the contract, through NATS, as hospital systems would.

Generation is split from driving. A pure, seeded generator produces a `Scenario` as data
(`scenario`: the hospitals, departments, supporters with their training and retirement dates,
referrals with their planned fate, surveys); the driver (`driver`) sends it with
`shared.client.PlatformClient`: the roster first, then each referral (waiting for matching to
pick its supporter, whose id the records commands must carry), then pauses and caps,
retirements, closings and surveys. A region's programs also set matching policies (CONTRACT
1.1). Business times come from the scenario, never from the wall clock, and every command's
outcome is checked.

- `post_2023_scenario()` (`post_2023`) replays the POST study (Tolins et al., PLoS ONE 2023) so
  that the RE-AIM read model reproduces the published figures (see `postctl.paper`).
- `region_scenario(hospitals, years, seed)` (`region`) is a synthetic region calibrated on those
  rates.
"""

from postctl.simulate.driver import Driver, SimulationError, add_cli, run_post_2023
from postctl.simulate.post_2023 import STUDY_END, STUDY_START, post_2023_scenario
from postctl.simulate.region import region_scenario
from postctl.simulate.scenario import (
    ReferralPlan,
    Scenario,
    add_months,
    close_department,
    launch_department,
    record_interaction,
    record_outreach,
    register_hospital,
    register_supporter,
    request_referral,
    retire_supporter,
    set_matching_policy,
    set_supporter_availability,
    submit_survey_response,
)

__all__ = [
    "STUDY_END",
    "STUDY_START",
    "Driver",
    "ReferralPlan",
    "Scenario",
    "SimulationError",
    "add_cli",
    "add_months",
    "close_department",
    "launch_department",
    "post_2023_scenario",
    "record_interaction",
    "record_outreach",
    "region_scenario",
    "register_hospital",
    "register_supporter",
    "request_referral",
    "retire_supporter",
    "run_post_2023",
    "set_matching_policy",
    "set_supporter_availability",
    "submit_survey_response",
]
