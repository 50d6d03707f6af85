-- Issue 15: the region's figures are computed in PostgreSQL (region.py), never from every fact
-- loaded into Python. What that needs:
--
-- 1. Each referral keeps its first outcome on its own row, maintained by the outreach and
--    interaction upserts (projection.py) as a minimum, so the order of arrival never matters:
--    the first record by (at, kind, stream_seq, event_id), kind 0 an outreach, 1 an interaction
--    (accepted at the start of its day); and its first decline (at, stream_seq, event_id,
--    reason). A region's referral figures are then one scan of the referrals of the period.
--    Nothing here depends on physician_id: forgetting a physician (UPDATE referrals SET
--    physician_id = alias ...) touches no column of this migration.
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS first_at timestamptz;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS first_kind smallint;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS first_seq bigint;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS first_id text;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS first_outcome text;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS decline_at timestamptz;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS decline_seq bigint;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS decline_id text;
ALTER TABLE referrals ADD COLUMN IF NOT EXISTS decline_reason text;

-- Read models projected before this migration: their first outcomes from the rows they hold
-- (recomputing gives the same values, so running this twice changes nothing).
UPDATE referrals r SET first_at = f.at, first_kind = f.kind, first_seq = f.seq,
    first_id = f.event_id, first_outcome = f.outcome
FROM (
    SELECT DISTINCT ON (hospital, referral_id) hospital, referral_id, at, kind, seq, event_id,
        outcome
    FROM (
        SELECT hospital, referral_id, at, 0 AS kind, coalesce(stream_seq, 0) AS seq, event_id,
            outcome
        FROM outreach
        UNION ALL
        SELECT hospital, referral_id, occurred_on::timestamp AT TIME ZONE 'UTC', 1,
            coalesce(stream_seq, 0), event_id, 'accepted'
        FROM interactions
    ) AS records
    ORDER BY hospital, referral_id, at, kind, seq, event_id
) AS f
WHERE r.hospital = f.hospital AND r.referral_id = f.referral_id AND r.first_at IS NULL;

UPDATE referrals r SET decline_at = f.at, decline_seq = f.seq, decline_id = f.event_id,
    decline_reason = f.decline_reason
FROM (
    SELECT DISTINCT ON (hospital, referral_id) hospital, referral_id, at,
        coalesce(stream_seq, 0) AS seq, event_id, decline_reason
    FROM outreach WHERE outcome = 'declined'
    ORDER BY hospital, referral_id, at, coalesce(stream_seq, 0), event_id
) AS f
WHERE r.hospital = f.hospital AND r.referral_id = f.referral_id AND r.decline_at IS NULL;

-- 2. Periods are ranges of business dates: each dated table is read by its date, and the
--    region's span (its first and last fact) is a few index lookups.
CREATE INDEX IF NOT EXISTS referrals_requested_at ON referrals (requested_at);
CREATE INDEX IF NOT EXISTS outreach_at ON outreach (at);
CREATE INDEX IF NOT EXISTS interactions_occurred_on ON interactions (occurred_on);
CREATE INDEX IF NOT EXISTS surveys_submitted_on ON surveys (submitted_on);
CREATE INDEX IF NOT EXISTS availability_changes_changed_on ON availability_changes (changed_on);
CREATE INDEX IF NOT EXISTS departments_launched_on ON departments (launched_on);
CREATE INDEX IF NOT EXISTS departments_closed_on ON departments (closed_on);
CREATE INDEX IF NOT EXISTS supporters_trained_on ON supporters (trained_on);
CREATE INDEX IF NOT EXISTS supporters_retired_on ON supporters (retired_on);
