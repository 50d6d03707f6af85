-- The RE-AIM read models: fact tables keyed by hospital and the domain id (ids are unique
-- within their hospital only). Written by order-independent upserts, so events of different
-- subjects may arrive in any order; the figures are computed from these rows on demand.

CREATE TABLE IF NOT EXISTS hospitals (
    hospital        text    PRIMARY KEY,
    physician_count integer NOT NULL
);

-- A row may exist before its launch is known (a closing seen first): launched_on is null then.
CREATE TABLE IF NOT EXISTS departments (
    hospital        text    NOT NULL,
    department      text    NOT NULL,
    physician_count integer NOT NULL DEFAULT 0,
    launched_on     date,
    closed_on       date,
    PRIMARY KEY (hospital, department)
);

CREATE TABLE IF NOT EXISTS supporters (
    hospital     text NOT NULL,
    supporter_id text NOT NULL,
    department   text,
    trained_on   date,
    retired_on   date,
    PRIMARY KEY (hospital, supporter_id)
);
CREATE INDEX IF NOT EXISTS supporters_department ON supporters (hospital, department);

-- matching_seq: the stream sequence of the latest matching outcome, so "latest" is the
-- highest sequence whatever the order of arrival.
CREATE TABLE IF NOT EXISTS referrals (
    hospital         text NOT NULL,
    referral_id      text NOT NULL,
    department       text,
    physician_id     text,
    source           text,
    requested_at     timestamptz,
    matching_outcome text,
    matching_seq     bigint,
    PRIMARY KEY (hospital, referral_id)
);
CREATE INDEX IF NOT EXISTS referrals_department ON referrals (hospital, department);

-- One row per outreach event (event_id: its CloudEvents id).
CREATE TABLE IF NOT EXISTS outreach (
    hospital       text        NOT NULL,
    event_id       text        NOT NULL,
    referral_id    text        NOT NULL,
    department     text        NOT NULL,
    outcome        text        NOT NULL,
    at             timestamptz NOT NULL,
    decline_reason text,
    stream_seq     bigint,
    PRIMARY KEY (hospital, event_id)
);
CREATE INDEX IF NOT EXISTS outreach_department ON outreach (hospital, department);

-- One row per InteractionCompleted (follow-ups included).
CREATE TABLE IF NOT EXISTS interactions (
    hospital    text    NOT NULL,
    event_id    text    NOT NULL,
    referral_id text    NOT NULL,
    department  text    NOT NULL,
    occurred_on date    NOT NULL,
    minutes     integer NOT NULL,
    escalated   boolean NOT NULL,
    stream_seq  bigint,
    PRIMARY KEY (hospital, event_id)
);
CREATE INDEX IF NOT EXISTS interactions_department ON interactions (hospital, department);

CREATE TABLE IF NOT EXISTS surveys (
    hospital           text    NOT NULL,
    response_id        text    NOT NULL,
    department         text    NOT NULL,
    submitted_on       date    NOT NULL,
    aware              boolean NOT NULL,
    had_interaction    boolean NOT NULL,
    helpful            smallint,
    wellbeing_improved boolean,
    comfort_improved   boolean,
    would_recommend    boolean,
    PRIMARY KEY (hospital, response_id)
);
CREATE INDEX IF NOT EXISTS surveys_department ON surveys (hospital, department);
