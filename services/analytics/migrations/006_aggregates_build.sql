-- Issue 26: every table the aggregate triggers keep (migration 005), recomputed from the fact
-- rows in one set-based pass per table: `SELECT agg_build()`.
--
-- The triggers cost a few statements per fact row. The rebuild (rebuild.py) writes millions of
-- fact rows into a schema nobody reads yet, so it writes them with the triggers disabled, calls
-- this once, and enables the triggers again before it catches up with the live tail and swaps:
-- the same tables, built by grouping instead of by millions of upserts. They hold the same
-- figures as the triggers' (the triggers' tables are a function of the fact rows as they stand;
-- tests/integration/test_analytics_aggregates.py compares the two row for row). The one
-- difference is by construction: an upsert that took a contribution back can leave a row of
-- zeros, which no query tells from a missing row; grouping writes none.
--
-- A migration that adds aggregate tables with their triggers adds a function that fills them
-- and replaces agg_build() to call it after agg_build_facts(): "build everything the triggers
-- keep" stays one call.

-- The tables of migration 005.
CREATE OR REPLACE FUNCTION agg_build_facts() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Hash aggregates of a few million rows: enough memory to keep them off disk.
    PERFORM set_config('work_mem', '256MB', true);
    TRUNCATE agg_interactions, agg_minutes, agg_delays, agg_referrals, agg_surveys,
        referral_days, supported_days, supported_grid;

    -- Interactions at the four scopes (hospital and department never empty: '' is "all").
    INSERT INTO agg_interactions
        (hospital, department, day, n, escalated, minutes_sum, minutes_min, minutes_max)
    SELECT coalesce(hospital, ''), coalesce(department, ''), occurred_on, count(*),
        count(*) FILTER (WHERE escalated), sum(minutes), min(minutes), max(minutes)
    FROM interactions
    GROUP BY GROUPING SETS ((occurred_on), (department, occurred_on),
        (hospital, occurred_on), (hospital, department, occurred_on));

    -- Minutes' histograms: the region, each hospital and department (not ('', d)); by day,
    -- then the months from the days.
    INSERT INTO agg_minutes (hospital, department, grain, day, value, n)
    SELECT coalesce(hospital, ''), coalesce(department, ''), 'd', occurred_on, minutes, count(*)
    FROM interactions
    GROUP BY GROUPING SETS ((occurred_on, minutes), (hospital, occurred_on, minutes),
        (hospital, department, occurred_on, minutes));
    INSERT INTO agg_minutes (hospital, department, grain, day, value, n)
    SELECT hospital, department, 'm', date_trunc('month', day)::date, value, sum(n)
    FROM agg_minutes WHERE grain = 'd'
    GROUP BY hospital, department, date_trunc('month', day)::date, value;

    -- Referrals by the UTC day of their request, at the region, hospital and (when it is known)
    -- department, as agg_referral_apply gives them one by one.
    CREATE TEMPORARY TABLE agg_build_referrals ON COMMIT DROP AS
    SELECT hospital, department, (requested_at AT TIME ZONE 'UTC')::date AS day, source,
        first_at IS NOT NULL AS with_record,
        first_at IS NOT NULL
            AND greatest(first_at - requested_at, interval '0') <= interval '48 hours'
            AS within_48h,
        CASE WHEN first_at IS NOT NULL THEN floor(extract(epoch FROM
            greatest(first_at - requested_at, interval '0')) / 3600)::integer END AS delay_hour,
        first_outcome, matching_outcome,
        CASE WHEN decline_at IS NOT NULL THEN coalesce(decline_reason, 'unspecified') END
            AS reason
    FROM referrals WHERE requested_at IS NOT NULL;

    INSERT INTO agg_referrals
    SELECT coalesce(hospital, ''), coalesce(department, ''), day, count(*),
        count(*) FILTER (WHERE source = 'self'),
        count(*) FILTER (WHERE source = 'third_party'),
        count(*) FILTER (WHERE source = 'safety_event'),
        count(*) FILTER (WHERE with_record), count(*) FILTER (WHERE within_48h),
        count(*) FILTER (WHERE first_outcome = 'accepted'),
        count(*) FILTER (WHERE first_outcome = 'declined'),
        count(*) FILTER (WHERE matching_outcome = 'no_supporter'),
        count(*) FILTER (WHERE reason = 'no_time'), count(*) FILTER (WHERE reason = 'no_need'),
        count(*) FILTER (WHERE reason = 'privacy'),
        count(*) FILTER (WHERE reason = 'discomfort'),
        count(*) FILTER (WHERE reason = 'medicolegal'),
        count(*) FILTER (WHERE reason = 'other'),
        count(*) FILTER (WHERE reason = 'unspecified')
    FROM agg_build_referrals
    GROUP BY GROUPING SETS ((day), (hospital, day), (hospital, department, day))
    HAVING GROUPING(department) = 1 OR department IS NOT NULL;

    INSERT INTO agg_delays (hospital, department, grain, day, value, n)
    SELECT coalesce(hospital, ''), coalesce(department, ''), 'd', day, delay_hour, count(*)
    FROM agg_build_referrals WHERE delay_hour IS NOT NULL
    GROUP BY GROUPING SETS ((day, delay_hour), (hospital, day, delay_hour),
        (hospital, department, day, delay_hour))
    HAVING GROUPING(department) = 1 OR department IS NOT NULL;
    INSERT INTO agg_delays (hospital, department, grain, day, value, n)
    SELECT hospital, department, 'm', date_trunc('month', day)::date, value, sum(n)
    FROM agg_delays WHERE grain = 'd'
    GROUP BY hospital, department, date_trunc('month', day)::date, value;

    INSERT INTO referral_days (hospital, department, day)
    SELECT DISTINCT hospital, department, day FROM agg_build_referrals
    WHERE department IS NOT NULL;

    INSERT INTO agg_surveys
    SELECT coalesce(hospital, ''), coalesce(department, ''), submitted_on,
        count(*) FILTER (WHERE had_interaction),
        count(*) FILTER (WHERE had_interaction AND helpful >= 4),
        count(*) FILTER (WHERE had_interaction AND wellbeing_improved),
        count(*) FILTER (WHERE had_interaction AND comfort_improved),
        count(*) FILTER (WHERE aware),
        count(*) FILTER (WHERE aware AND would_recommend)
    FROM surveys
    GROUP BY GROUPING SETS ((submitted_on), (hospital, submitted_on),
        (hospital, department, submitted_on));

    -- Each physician's days at the hospital and at each department, with the one before (as
    -- supported_recompute keys them: the referral's physician, or '#' and the referral id).
    INSERT INTO supported_days (hospital, department, physician, day, prev)
    SELECT hospital, dep, physician, day,
        coalesce(lag(day) OVER (PARTITION BY hospital, physician, dep ORDER BY day),
            '-infinity'::date)
    FROM (
        SELECT DISTINCT i.hospital, coalesce(f.physician_id, '#' || i.referral_id) AS physician,
            v.dep, i.occurred_on AS day
        FROM interactions i
        LEFT JOIN referrals f ON f.hospital = i.hospital AND f.referral_id = i.referral_id,
        LATERAL (VALUES (''), (i.department)) AS v(dep)
    ) AS scoped;

    INSERT INTO supported_grid (month, prev, n)
    SELECT date_trunc('month', day)::date, prev, count(*)
    FROM supported_days WHERE department = ''
    GROUP BY 1, 2;

    DROP TABLE agg_build_referrals;
END $$;

CREATE OR REPLACE FUNCTION agg_build() RETURNS void LANGUAGE sql AS $$
    SELECT agg_build_facts();
$$;
