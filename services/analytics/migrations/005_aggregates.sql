-- Issue 26: pre-aggregated read models in the shape of the queries (docs/decisions.md, "Region
-- dashboards at national scale"). Every figure of a period is a range sum over rows per scope
-- and day (or month), never a scan of the period's facts. Exact: counts, sums, extremes and
-- histograms, no sampling.
--
-- A scope is (hospital, department): ('', '') the region, (h, '') a hospital, (h, d) one of
-- its departments, and ('', d) every hospital's department d (interactions_by_department at
-- region scope only). No hospital id or department slug is empty (shared/contracts.py).
--
-- The aggregates are written by triggers on the fact tables: each is a function of the fact
-- rows as they stand (a referral's contribution is taken back and given again when its row
-- changes), so the order in which events arrive never matters, a copy delivered twice counts
-- once (the fact's ON CONFLICT DO NOTHING fires no trigger), and the rebuild, which writes the
-- same fact rows, builds the same aggregates.

-- Interactions per scope and day: count, escalated, minutes' sum and extremes.
CREATE TABLE IF NOT EXISTS agg_interactions (
    hospital    text    NOT NULL,
    department  text    NOT NULL,
    day         date    NOT NULL,
    n           bigint  NOT NULL,
    escalated   bigint  NOT NULL,
    minutes_sum bigint  NOT NULL,
    minutes_min integer NOT NULL,
    minutes_max integer NOT NULL,
    PRIMARY KEY (hospital, department, day)
);

-- Histograms for the medians, per scope and day ('d') and per scope and month ('m', `day` the
-- first of the month): a period is its whole months plus at most two partial ones by day.
-- `value`: an interaction's minutes (1..600), or a referral's hours to its first record,
-- rounded down (bounded by the program's length).
CREATE TABLE IF NOT EXISTS agg_minutes (
    hospital   text    NOT NULL,
    department text    NOT NULL,
    grain      "char"  NOT NULL,
    day        date    NOT NULL,
    value      integer NOT NULL,
    n          bigint  NOT NULL,
    PRIMARY KEY (hospital, department, grain, day, value)
);
CREATE TABLE IF NOT EXISTS agg_delays (LIKE agg_minutes INCLUDING ALL);

-- Referrals per scope and the UTC day of their request, by their first outcome (whatever its
-- date) and first decline.
CREATE TABLE IF NOT EXISTS agg_referrals (
    hospital          text   NOT NULL,
    department        text   NOT NULL,
    day               date   NOT NULL,
    referrals         bigint NOT NULL,
    source_self       bigint NOT NULL,
    source_third_party bigint NOT NULL,
    source_safety_event bigint NOT NULL,
    with_record       bigint NOT NULL,
    within_48h        bigint NOT NULL,
    accepted          bigint NOT NULL,
    declined          bigint NOT NULL,
    without_supporter bigint NOT NULL,
    reason_no_time    bigint NOT NULL,
    reason_no_need    bigint NOT NULL,
    reason_privacy    bigint NOT NULL,
    reason_discomfort bigint NOT NULL,
    reason_medicolegal bigint NOT NULL,
    reason_other      bigint NOT NULL,
    reason_unspecified bigint NOT NULL,
    PRIMARY KEY (hospital, department, day)
);

CREATE TABLE IF NOT EXISTS agg_surveys (
    hospital         text   NOT NULL,
    department       text   NOT NULL,
    day              date   NOT NULL,
    with_interaction bigint NOT NULL,
    helpful          bigint NOT NULL,
    wellbeing        bigint NOT NULL,
    comfort          bigint NOT NULL,
    aware            bigint NOT NULL,
    would_recommend  bigint NOT NULL,
    PRIMARY KEY (hospital, department, day)
);

-- The days a department had a referral requested (departments_without_referrals: one index
-- probe per launched department).
CREATE TABLE IF NOT EXISTS referral_days (
    hospital   text NOT NULL,
    department text NOT NULL,
    day        date NOT NULL,
    PRIMARY KEY (hospital, department, day)
);

-- physicians_supported, distinct over any period: per physician (as reaim.py keys them: the
-- referral's physician_id, or '#' and the referral id until its ReferralCreated arrives) and
-- scope ('' department: the hospital), every day they had an interaction with the one before
-- (`prev`, -infinity for the first). A physician is counted in [F, T) by exactly one row: the
-- first day on or after F, so the count is that of rows with F <= day < T and prev < F. For
-- the region, `supported_grid` counts the hospital rows by (month of day, prev): whole months
-- are a sum over it, the partial ones an index range of the rows.
CREATE TABLE IF NOT EXISTS supported_days (
    hospital   text NOT NULL,
    department text NOT NULL,
    physician  text NOT NULL,
    day        date NOT NULL,
    prev       date NOT NULL,
    PRIMARY KEY (hospital, physician, department, day)
);
CREATE INDEX IF NOT EXISTS supported_days_scope ON supported_days (hospital, department, day);
CREATE INDEX IF NOT EXISTS supported_days_region ON supported_days (day, prev)
    WHERE department = '';
CREATE TABLE IF NOT EXISTS supported_grid (
    month date   NOT NULL,
    prev  date   NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (month, prev)
);

-- What the triggers look up: a physician's referrals, a referral's interactions, and the
-- exact delays of one hour (the median's middle values).
CREATE INDEX IF NOT EXISTS referrals_physician ON referrals (hospital, physician_id);
CREATE INDEX IF NOT EXISTS interactions_referral ON interactions (hospital, referral_id);
CREATE INDEX IF NOT EXISTS referrals_delay_hour ON referrals (
    (floor(extract(epoch FROM greatest(first_at - requested_at, interval '0')) / 3600)::integer),
    requested_at
) WHERE first_at IS NOT NULL AND requested_at IS NOT NULL;

-- --- the triggers ------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION agg_histogram(
    tab text, h text, dep text, d date, v integer, sign integer
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO %I AS a (hospital, department, grain, day, value, n)'
        ' VALUES ($1, $2, ''d'', $3, $4, $5), ($1, $2, ''m'', date_trunc(''month'', $3)::date,'
        ' $4, $5) ON CONFLICT (hospital, department, grain, day, value)'
        ' DO UPDATE SET n = a.n + EXCLUDED.n', tab)
    USING h, dep, d, v, sign::bigint;
END $$;

CREATE OR REPLACE FUNCTION agg_interaction() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT * FROM (VALUES ('', ''), ('', NEW.department), (NEW.hospital, ''),
            (NEW.hospital, NEW.department)) AS v(h, dep) LOOP
        INSERT INTO agg_interactions AS a
            (hospital, department, day, n, escalated, minutes_sum, minutes_min, minutes_max)
        VALUES (s.h, s.dep, NEW.occurred_on, 1, NEW.escalated::integer, NEW.minutes,
            NEW.minutes, NEW.minutes)
        ON CONFLICT (hospital, department, day) DO UPDATE SET
            n = a.n + 1, escalated = a.escalated + EXCLUDED.escalated,
            minutes_sum = a.minutes_sum + EXCLUDED.minutes_sum,
            minutes_min = least(a.minutes_min, EXCLUDED.minutes_min),
            minutes_max = greatest(a.minutes_max, EXCLUDED.minutes_max);
        IF s.h <> '' OR s.dep = '' THEN
            PERFORM agg_histogram('agg_minutes', s.h, s.dep, NEW.occurred_on, NEW.minutes, 1);
        END IF;
    END LOOP;
    PERFORM supported_recompute(NEW.hospital, coalesce(
        (SELECT physician_id FROM referrals
         WHERE hospital = NEW.hospital AND referral_id = NEW.referral_id),
        '#' || NEW.referral_id));
    RETURN NULL;
END $$;

-- A physician's rows from the facts as they stand (a physician has a handful of interactions).
CREATE OR REPLACE FUNCTION supported_recompute(h text, key text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN DELETE FROM supported_days WHERE hospital = h AND physician = key
            RETURNING department, day, prev LOOP
        IF r.department = '' THEN
            UPDATE supported_grid SET n = n - 1
            WHERE month = date_trunc('month', r.day)::date AND prev = r.prev;
        END IF;
    END LOOP;
    FOR r IN
        WITH days AS (
            SELECT i.department, i.occurred_on FROM referrals f
            JOIN interactions i ON i.hospital = f.hospital AND i.referral_id = f.referral_id
            WHERE f.hospital = h AND f.physician_id = key
            UNION ALL
            SELECT i.department, i.occurred_on FROM interactions i
            WHERE key LIKE '#%' AND i.hospital = h AND i.referral_id = substr(key, 2)
                AND NOT EXISTS (SELECT 1 FROM referrals f WHERE f.hospital = h
                    AND f.referral_id = i.referral_id AND f.physician_id IS NOT NULL)
        ), scoped AS (
            SELECT DISTINCT v.dep, d.occurred_on AS day
            FROM days d, LATERAL (VALUES (''), (d.department)) AS v(dep)
        )
        INSERT INTO supported_days (hospital, department, physician, day, prev)
        SELECT h, dep, key, day,
            coalesce(lag(day) OVER (PARTITION BY dep ORDER BY day), '-infinity'::date)
        FROM scoped
        RETURNING department, day, prev
    LOOP
        IF r.department = '' THEN
            INSERT INTO supported_grid AS g (month, prev, n)
            VALUES (date_trunc('month', r.day)::date, r.prev, 1)
            ON CONFLICT (month, prev) DO UPDATE SET n = g.n + 1;
        END IF;
    END LOOP;
END $$;

-- One referral row's contribution (sign 1) or its withdrawal (sign -1).
CREATE OR REPLACE FUNCTION agg_referral_apply(r referrals, sign integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    d date;
    delay interval;
    reason text;
BEGIN
    IF r.requested_at IS NULL THEN
        RETURN;
    END IF;
    d := (r.requested_at AT TIME ZONE 'UTC')::date;
    delay := greatest(r.first_at - r.requested_at, interval '0');  -- used only with first_at
    reason := CASE WHEN r.decline_at IS NOT NULL THEN coalesce(r.decline_reason, 'unspecified') END;
    FOR s IN SELECT * FROM (VALUES ('', ''), (r.hospital, ''), (r.hospital, r.department))
            AS v(h, dep) WHERE dep IS NOT NULL LOOP
        INSERT INTO agg_referrals AS a VALUES (s.h, s.dep, d, sign,
            sign * (r.source = 'self')::integer, sign * (r.source = 'third_party')::integer,
            sign * (r.source = 'safety_event')::integer,
            sign * (r.first_at IS NOT NULL)::integer,
            sign * (r.first_at IS NOT NULL AND delay <= interval '48 hours')::integer,
            sign * coalesce(r.first_outcome = 'accepted', false)::integer,
            sign * coalesce(r.first_outcome = 'declined', false)::integer,
            sign * coalesce(r.matching_outcome = 'no_supporter', false)::integer,
            sign * coalesce(reason = 'no_time', false)::integer,
            sign * coalesce(reason = 'no_need', false)::integer,
            sign * coalesce(reason = 'privacy', false)::integer,
            sign * coalesce(reason = 'discomfort', false)::integer,
            sign * coalesce(reason = 'medicolegal', false)::integer,
            sign * coalesce(reason = 'other', false)::integer,
            sign * coalesce(reason = 'unspecified', false)::integer)
        ON CONFLICT (hospital, department, day) DO UPDATE SET
            referrals = a.referrals + EXCLUDED.referrals,
            source_self = a.source_self + EXCLUDED.source_self,
            source_third_party = a.source_third_party + EXCLUDED.source_third_party,
            source_safety_event = a.source_safety_event + EXCLUDED.source_safety_event,
            with_record = a.with_record + EXCLUDED.with_record,
            within_48h = a.within_48h + EXCLUDED.within_48h,
            accepted = a.accepted + EXCLUDED.accepted,
            declined = a.declined + EXCLUDED.declined,
            without_supporter = a.without_supporter + EXCLUDED.without_supporter,
            reason_no_time = a.reason_no_time + EXCLUDED.reason_no_time,
            reason_no_need = a.reason_no_need + EXCLUDED.reason_no_need,
            reason_privacy = a.reason_privacy + EXCLUDED.reason_privacy,
            reason_discomfort = a.reason_discomfort + EXCLUDED.reason_discomfort,
            reason_medicolegal = a.reason_medicolegal + EXCLUDED.reason_medicolegal,
            reason_other = a.reason_other + EXCLUDED.reason_other,
            reason_unspecified = a.reason_unspecified + EXCLUDED.reason_unspecified;
        IF r.first_at IS NOT NULL THEN
            PERFORM agg_histogram('agg_delays', s.h, s.dep, d,
                floor(extract(epoch FROM delay) / 3600)::integer, sign);
        END IF;
    END LOOP;
    IF sign > 0 AND r.department IS NOT NULL THEN
        INSERT INTO referral_days VALUES (r.hospital, r.department, d) ON CONFLICT DO NOTHING;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION agg_referral() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF (OLD.requested_at, OLD.department, OLD.source, OLD.first_at, OLD.first_outcome,
                OLD.decline_at, OLD.decline_reason, OLD.matching_outcome)
            IS DISTINCT FROM (NEW.requested_at, NEW.department, NEW.source, NEW.first_at,
                NEW.first_outcome, NEW.decline_at, NEW.decline_reason, NEW.matching_outcome)
        THEN
            PERFORM agg_referral_apply(OLD, -1);
            PERFORM agg_referral_apply(NEW, 1);
        END IF;
        IF OLD.physician_id IS DISTINCT FROM NEW.physician_id THEN
            PERFORM supported_recompute(OLD.hospital,
                coalesce(OLD.physician_id, '#' || OLD.referral_id));
            PERFORM supported_recompute(NEW.hospital,
                coalesce(NEW.physician_id, '#' || NEW.referral_id));
        END IF;
    ELSE
        PERFORM agg_referral_apply(NEW, 1);
        IF NEW.physician_id IS NOT NULL THEN
            PERFORM supported_recompute(NEW.hospital, '#' || NEW.referral_id);
            PERFORM supported_recompute(NEW.hospital, NEW.physician_id);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION agg_survey() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT * FROM (VALUES ('', ''), (NEW.hospital, ''), (NEW.hospital, NEW.department))
            AS v(h, dep) LOOP
        INSERT INTO agg_surveys AS a VALUES (s.h, s.dep, NEW.submitted_on,
            NEW.had_interaction::integer,
            (NEW.had_interaction AND coalesce(NEW.helpful >= 4, false))::integer,
            (NEW.had_interaction AND coalesce(NEW.wellbeing_improved, false))::integer,
            (NEW.had_interaction AND coalesce(NEW.comfort_improved, false))::integer,
            NEW.aware::integer,
            (NEW.aware AND coalesce(NEW.would_recommend, false))::integer)
        ON CONFLICT (hospital, department, day) DO UPDATE SET
            with_interaction = a.with_interaction + EXCLUDED.with_interaction,
            helpful = a.helpful + EXCLUDED.helpful, wellbeing = a.wellbeing + EXCLUDED.wellbeing,
            comfort = a.comfort + EXCLUDED.comfort, aware = a.aware + EXCLUDED.aware,
            would_recommend = a.would_recommend + EXCLUDED.would_recommend;
    END LOOP;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS agg_interaction ON interactions;
CREATE TRIGGER agg_interaction AFTER INSERT ON interactions
    FOR EACH ROW EXECUTE FUNCTION agg_interaction();
DROP TRIGGER IF EXISTS agg_referral ON referrals;
CREATE TRIGGER agg_referral AFTER INSERT OR UPDATE ON referrals
    FOR EACH ROW EXECUTE FUNCTION agg_referral();
DROP TRIGGER IF EXISTS agg_survey ON surveys;
CREATE TRIGGER agg_survey AFTER INSERT ON surveys
    FOR EACH ROW EXECUTE FUNCTION agg_survey();

-- Read models projected before this migration: their aggregates from the rows they hold.
DO $$
DECLARE
    r referrals;  -- the row type agg_referral_apply takes (a bare record does not cast)
BEGIN
    IF EXISTS (SELECT 1 FROM agg_interactions) OR EXISTS (SELECT 1 FROM agg_referrals) THEN
        RETURN;  -- filled already
    END IF;
    FOR r IN SELECT * FROM referrals LOOP
        PERFORM agg_referral_apply(r, 1);
    END LOOP;
    CREATE TEMPORARY TABLE agg_backfill ON COMMIT DROP AS SELECT * FROM interactions;
    DELETE FROM interactions;
    INSERT INTO interactions SELECT * FROM agg_backfill;
    CREATE TEMPORARY TABLE agg_backfill_surveys ON COMMIT DROP AS SELECT * FROM surveys;
    DELETE FROM surveys;
    INSERT INTO surveys SELECT * FROM agg_backfill_surveys;
END $$;
