-- What records learns from other services' events. Ids are pseudonymous, unique per hospital.

CREATE TABLE hospitals (
    hospital text PRIMARY KEY
);

CREATE TABLE departments (
    hospital    text NOT NULL,
    department  text NOT NULL,
    launched_on date NOT NULL,
    closed_on   date,
    PRIMARY KEY (hospital, department)
);

-- A row appears with ReferralCreated or with the first SupporterAssigned, whichever comes first.
CREATE TABLE referrals (
    hospital     text NOT NULL,
    referral_id  text NOT NULL,
    department   text NOT NULL,
    requested_at timestamptz,
    supporter_id text,
    assigned_at  timestamptz,
    PRIMARY KEY (hospital, referral_id)
);
