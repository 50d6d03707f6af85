-- Forgetting a physician (CONTRACT.md 1.1; docs/decisions.md, "Forgetting").

-- Who each referral names, so a forget finds the physician's referrals (as physician and as
-- referrer) by index, and when it closed (its last outreach or interaction, business date) for
-- the retention sweep. A forget rewrites both ids to the forget's opaque `forget_id`.
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS physician_id text;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS referrer_id text;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS last_contact_on date;
UPDATE referrals r
SET physician_id = e.data->>'physician_id', referrer_id = e.data->>'referrer_id'
FROM events e
WHERE r.physician_id IS NULL
  AND e.event_type = 'ReferralCreated'
  AND e.stream_id = 'referral:' || r.hospital || ':' || r.referral_id;
CREATE INDEX IF NOT EXISTS referrals_by_physician ON referrals (hospital, physician_id);
CREATE INDEX IF NOT EXISTS referrals_by_referrer ON referrals (hospital, referrer_id)
    WHERE referrer_id IS NOT NULL;

-- Every ReferralCreated of a referral (its own stream's and the copies that answered identical
-- repeats), found by hospital and referral to be rewritten.
CREATE INDEX IF NOT EXISTS events_referral_created
    ON events ((metadata->>'hospital'), (data->>'referral_id'))
    WHERE event_type = 'ReferralCreated';

-- What is left to erase from the POST stream once a forget has committed: the one place the
-- id is kept, and only until the job is done (seconds). Resumed after a crash by any instance.
CREATE TABLE IF NOT EXISTS forget_jobs (
    forget_id     text        PRIMARY KEY,
    hospital      text        NOT NULL,
    physician_id  text        NOT NULL,
    command_seq   bigint,                               -- the ForgetPhysician's place in POST
    referral_ids  text[]      NOT NULL,
    referred_ids  text[]      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Retention set by the platform team (`postctl hospital retention`): forget physicians whose
-- referrals all closed more than `days` days ago.
CREATE TABLE IF NOT EXISTS retention (
    hospital text        PRIMARY KEY,
    days     integer     NOT NULL CHECK (days >= 1),
    set_at   timestamptz NOT NULL DEFAULT now()
);
