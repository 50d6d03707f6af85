-- The referral service's own tables (its schema). Pseudonymous ids only; no names, no free text.

-- Hospitals and departments as the matching service announced them.
CREATE TABLE IF NOT EXISTS hospitals (
    hospital      text        PRIMARY KEY,
    registered_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS departments (
    hospital    text NOT NULL,
    department  text NOT NULL,
    launched_on date,                                 -- NULL: a closing seen before its launch
    closed_on   date,
    PRIMARY KEY (hospital, department)
);

-- The current state of each referral: created here, then moved by the other services' facts.
CREATE TABLE IF NOT EXISTS referrals (
    hospital          text        NOT NULL,
    referral_id       text        NOT NULL,
    department        text        NOT NULL,
    source            text        NOT NULL,
    requested_at      timestamptz NOT NULL,
    status            text        NOT NULL,
    supporter_id      text,
    assignment_reason text,
    interactions      integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (hospital, referral_id)
);

-- Who was referred from which safety event, so one physician is not referred twice for it.
CREATE TABLE IF NOT EXISTS safety_event_referrals (
    hospital     text NOT NULL,
    referral_id  text NOT NULL,
    safety_key   text NOT NULL,                       -- domain.safety_event_key
    physician_id text NOT NULL,
    PRIMARY KEY (hospital, referral_id)
);
CREATE INDEX IF NOT EXISTS safety_event_referrals_lookup
    ON safety_event_referrals (hospital, safety_key, physician_id);
