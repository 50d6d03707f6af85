-- Version 1.1: matching policies and supporter availability (CONTRACT.md).
-- Both follow matching's own events (MatchingPolicySet, SupporterAvailabilityChanged), written
-- by the transaction that appends them, like every table of 001 but `referrals`.

-- The latest SupporterAvailabilityChanged of each supporter: each replaces the one before.
ALTER TABLE supporters
    ADD COLUMN available            boolean NOT NULL DEFAULT true,
    ADD COLUMN max_open_assignments integer CHECK (max_open_assignments >= 1);

-- The latest MatchingPolicySet per department; department '' is the hospital's own policy.
-- No row means same_department, the rules of version 1.
CREATE TABLE policies (
    hospital   text NOT NULL,
    department text NOT NULL,
    policy     text NOT NULL
        CHECK (policy IN ('same_department', 'other_department', 'same_then_other')),
    PRIMARY KEY (hospital, department)
);

-- Waiting referrals are served hospital-wide (a policy may look in other departments).
CREATE INDEX referrals_waiting_in_order ON referrals (hospital, requested_at, referral_id)
    WHERE status = 'waiting';
