-- The matching service's read model: the registry, the roster, referrals and assignments.
-- Every row is written by the same transaction that appends the event it follows.

CREATE TABLE hospitals (
    hospital        text    PRIMARY KEY,
    name            text    NOT NULL,
    physician_count integer NOT NULL
);

CREATE TABLE departments (
    hospital        text    NOT NULL,
    department      text    NOT NULL,
    physician_count integer NOT NULL,
    launched_on     date    NOT NULL,
    closed_on       date,
    PRIMARY KEY (hospital, department)
);

CREATE TABLE supporters (
    hospital       text    NOT NULL,
    supporter_id   text    NOT NULL,
    department     text    NOT NULL,
    rank           text    NOT NULL,
    interventional boolean NOT NULL,
    trained_on     date    NOT NULL,
    retired_on     date,
    PRIMARY KEY (hospital, supporter_id)
);
CREATE INDEX supporters_by_department ON supporters (hospital, department);

-- What matching keeps of each ReferralCreated, to match it again (overdue, retirement, waiting).
CREATE TABLE referrals (
    hospital       text        NOT NULL,
    referral_id    text        NOT NULL,
    physician_id   text        NOT NULL,
    referrer_id    text,
    department     text        NOT NULL,
    rank           text        NOT NULL,
    event_nature   text        NOT NULL,
    requested_at   timestamptz NOT NULL,
    assign_to      text,
    received_at    timestamptz NOT NULL,       -- processing time, for the latency metric
    status         text        NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'assigned', 'waiting', 'closed')),
    waiting_reason text,
    PRIMARY KEY (hospital, referral_id)
);
CREATE INDEX referrals_waiting ON referrals (hospital, department, requested_at)
    WHERE status = 'waiting';

-- One row per SupporterAssigned; a supporter never gets the same referral twice.
CREATE TABLE assignments (
    hospital     text        NOT NULL,
    referral_id  text        NOT NULL,
    supporter_id text        NOT NULL,
    department   text        NOT NULL,
    requested_at timestamptz NOT NULL,     -- the referral's, for "assignments in 365 days"
    assigned_at  timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    reason       text        NOT NULL,
    status       text        NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'closed', 'overdue', 'reassigned')),
    ended_at     timestamptz,
    PRIMARY KEY (hospital, referral_id, supporter_id)
);
CREATE INDEX assignments_due ON assignments (due_at) WHERE status = 'open';
CREATE INDEX assignments_by_supporter ON assignments (hospital, supporter_id);
