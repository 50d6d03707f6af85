-- Issue 26: the region's department and supporter figures as range sums over days, not a
-- scan of every department and supporter of the region (docs/decisions.md, "Region dashboards
-- at national scale", "As-of counts"). A hospital or a department still reads its own rows
-- (tens): only the region's grew with hospitals (about 0.3 s each at 6,000 hospitals).
--
-- What the region counts "as of" a period's end T (a row dated before T) is a step function
-- of T for each department and supporter: launched, open and its physicians, a hospital's
-- first launch, trained, active (trained, neither retired nor its department closed) and
-- available (active, and its latest availability change before T says so). Each is kept as
-- +1/-1 (or +n/-n) on the days it changes: the value at T is the sum of the days before T.
-- `region_parts` holds every department's, hospital's and supporter's own steps, so a change
-- takes the old ones back and gives the new ones, whatever the order the events came in;
-- `region_asof` sums them per day for the whole region.

CREATE TABLE IF NOT EXISTS region_parts (
    hospital  text   NOT NULL,
    entity    text   NOT NULL,  -- 'd:' || department, 'h' (the first launch), 's:' || supporter
    day       date   NOT NULL,
    launched  bigint NOT NULL,
    open      bigint NOT NULL,
    eligible  bigint NOT NULL,
    adopted   bigint NOT NULL,
    trained   bigint NOT NULL,
    active    bigint NOT NULL,
    available bigint NOT NULL,
    PRIMARY KEY (hospital, entity, day)
);
CREATE TABLE IF NOT EXISTS region_asof (
    day       date   PRIMARY KEY,
    launched  bigint NOT NULL,
    open      bigint NOT NULL,
    eligible  bigint NOT NULL,
    adopted   bigint NOT NULL,
    trained   bigint NOT NULL,
    active    bigint NOT NULL,
    available bigint NOT NULL
);

-- The region's department slugs and the first launch of each (the by-department list and the
-- first launch, without reading every department).
CREATE TABLE IF NOT EXISTS region_slugs (
    department   text PRIMARY KEY,
    first_launch date
);
CREATE INDEX IF NOT EXISTS departments_slug ON departments (department, launched_on);

-- departments_without_referrals = launched - the launched departments referred in [F, T).
-- The same first-and-next count as supported_days: each referral day of a department keeps
-- the one before (`prev`), and `eff`, the day from which it can count: the day itself, or the
-- department's launch if that came later ('infinity' while it has none). A department is
-- referred in [F, T) and launched before T exactly when its first referral day on or after F
-- (prev < F) has eff < T. Rows with eff = day ("regular": nearly all) are summed per month of
-- their day and prev in `referred_grid` for whole months; the others are counted one by one.
ALTER TABLE referral_days ADD COLUMN IF NOT EXISTS prev date NOT NULL DEFAULT '-infinity';
ALTER TABLE referral_days ADD COLUMN IF NOT EXISTS eff date NOT NULL DEFAULT 'infinity';
CREATE INDEX IF NOT EXISTS referral_days_regular ON referral_days (day, prev) WHERE eff = day;
CREATE INDEX IF NOT EXISTS referral_days_irregular ON referral_days (day, prev, eff)
    WHERE eff <> day;
CREATE TABLE IF NOT EXISTS referred_grid (
    month date   NOT NULL,
    prev  date   NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (month, prev)
);

-- --- the functions ---------------------------------------------------------------------------

-- One entity's steps, from the facts as they stand.
CREATE OR REPLACE FUNCTION region_part_rows(h text, ent text) RETURNS TABLE (
    day date, launched bigint, open bigint, eligible bigint, adopted bigint, trained bigint,
    active bigint, available bigint
) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF ent = 'h' THEN
        RETURN QUERY SELECT min(d.launched_on), 0::bigint, 0::bigint, 0::bigint, 1::bigint,
            0::bigint, 0::bigint, 0::bigint
        FROM departments d WHERE d.hospital = h HAVING min(d.launched_on) IS NOT NULL;
    ELSIF left(ent, 2) = 'd:' THEN
        RETURN QUERY WITH d AS (
            SELECT x.launched_on AS l, x.closed_on AS c, x.physician_count::bigint AS pc
            FROM departments x
            WHERE x.hospital = h AND x.department = substr(ent, 3) AND x.launched_on IS NOT NULL
        ), steps (day, launched, open, eligible) AS (
            SELECT l, 1::bigint, 1::bigint, pc FROM d
            UNION ALL
            -- Closed before its launch: both on the launch day, so it never counts as open.
            SELECT greatest(l, c), 0::bigint, -1::bigint, -pc FROM d WHERE c IS NOT NULL
        )
        SELECT s.day, sum(s.launched)::bigint, sum(s.open)::bigint, sum(s.eligible)::bigint,
            0::bigint, 0::bigint, 0::bigint, 0::bigint
        FROM steps s GROUP BY s.day;
    ELSE
        RETURN QUERY WITH s AS (
            -- Active until its retirement or its department's closing, whichever is first.
            SELECT x.trained_on AS tr, least(x.retired_on, d.closed_on) AS e
            FROM supporters x
            LEFT JOIN departments d ON d.hospital = x.hospital AND d.department = x.department
            WHERE x.hospital = h AND x.supporter_id = substr(ent, 3) AND x.trained_on IS NOT NULL
        ), ch AS (
            -- The change that wins each day (reaim.py: by stream sequence, then available).
            SELECT DISTINCT ON (c.changed_on) c.changed_on AS day, c.available
            FROM availability_changes c
            WHERE c.hospital = h AND c.supporter_id = substr(ent, 3)
            ORDER BY c.changed_on, coalesce(c.stream_seq, 0) DESC, c.available DESC
        ), points AS (
            SELECT tr AS b FROM s UNION SELECT e FROM s WHERE e IS NOT NULL
            UNION SELECT ch.day FROM ch
        ), vals AS (
            -- The values for a period ending just after day b.
            SELECT p.b, (p.b = s.tr)::integer AS trn,
                (s.tr <= p.b AND (s.e IS NULL OR s.e > p.b))::integer AS act,
                (s.tr <= p.b AND (s.e IS NULL OR s.e > p.b) AND coalesce(
                    (SELECT ch.available FROM ch WHERE ch.day <= p.b ORDER BY ch.day DESC LIMIT 1),
                    true))::integer AS avl
            FROM points p, s
        ), steps AS (
            SELECT v.b, v.trn, v.act - coalesce(lag(v.act) OVER w, 0) AS dact,
                v.avl - coalesce(lag(v.avl) OVER w, 0) AS davl
            FROM vals v WINDOW w AS (ORDER BY v.b)
        )
        SELECT t.b, 0::bigint, 0::bigint, 0::bigint, 0::bigint, t.trn::bigint, t.dact::bigint,
            t.davl::bigint
        FROM steps t WHERE t.trn <> 0 OR t.dact <> 0 OR t.davl <> 0;
    END IF;
END $$;

-- Take an entity's old steps back from the region's days and give its new ones.
CREATE OR REPLACE FUNCTION region_recompute(h text, ent text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN DELETE FROM region_parts p WHERE p.hospital = h AND p.entity = ent RETURNING * LOOP
        UPDATE region_asof a SET launched = a.launched - r.launched, open = a.open - r.open,
            eligible = a.eligible - r.eligible, adopted = a.adopted - r.adopted,
            trained = a.trained - r.trained, active = a.active - r.active,
            available = a.available - r.available
        WHERE a.day = r.day;
    END LOOP;
    FOR r IN INSERT INTO region_parts SELECT h, ent, x.* FROM region_part_rows(h, ent) x
            RETURNING * LOOP
        INSERT INTO region_asof AS a VALUES (r.day, r.launched, r.open, r.eligible, r.adopted,
            r.trained, r.active, r.available)
        ON CONFLICT (day) DO UPDATE SET launched = a.launched + EXCLUDED.launched,
            open = a.open + EXCLUDED.open, eligible = a.eligible + EXCLUDED.eligible,
            adopted = a.adopted + EXCLUDED.adopted, trained = a.trained + EXCLUDED.trained,
            active = a.active + EXCLUDED.active, available = a.available + EXCLUDED.available;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION referred_grid_add(d date, p date, sign integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO referred_grid AS g (month, prev, n)
    VALUES (date_trunc('month', d)::date, p, sign)
    ON CONFLICT (month, prev) DO UPDATE SET n = g.n + EXCLUDED.n;
$$;

-- A department's launch day moved (or came): each referral day's eff again, and the grid.
CREATE OR REPLACE FUNCTION referral_days_relaunch(h text, dep text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    l date := (SELECT launched_on FROM departments WHERE hospital = h AND department = dep);
    e date;
BEGIN
    FOR r IN SELECT x.day, x.prev, x.eff FROM referral_days x
            WHERE x.hospital = h AND x.department = dep LOOP
        e := CASE WHEN l IS NULL THEN 'infinity'::date ELSE greatest(r.day, l) END;
        IF e <> r.eff THEN
            IF r.eff = r.day THEN
                PERFORM referred_grid_add(r.day, r.prev, -1);
            END IF;
            IF e = r.day THEN
                PERFORM referred_grid_add(r.day, r.prev, 1);
            END IF;
            UPDATE referral_days SET eff = e
            WHERE hospital = h AND department = dep AND day = r.day;
        END IF;
    END LOOP;
END $$;

-- A new referral day: its prev and eff, and the next day's prev is now this day.
CREATE OR REPLACE FUNCTION agg_referral_day() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p date;
    l date;
    e date;
    nxt record;
BEGIN
    SELECT coalesce(max(x.day), '-infinity'::date) INTO p FROM referral_days x
    WHERE x.hospital = NEW.hospital AND x.department = NEW.department AND x.day < NEW.day;
    l := (SELECT launched_on FROM departments
          WHERE hospital = NEW.hospital AND department = NEW.department);
    e := CASE WHEN l IS NULL THEN 'infinity'::date ELSE greatest(NEW.day, l) END;
    UPDATE referral_days SET prev = p, eff = e
    WHERE hospital = NEW.hospital AND department = NEW.department AND day = NEW.day;
    IF e = NEW.day THEN
        PERFORM referred_grid_add(NEW.day, p, 1);
    END IF;
    SELECT x.day, x.prev, x.eff INTO nxt FROM referral_days x
    WHERE x.hospital = NEW.hospital AND x.department = NEW.department AND x.day > NEW.day
    ORDER BY x.day LIMIT 1;
    IF FOUND THEN
        IF nxt.eff = nxt.day THEN
            PERFORM referred_grid_add(nxt.day, nxt.prev, -1);
            PERFORM referred_grid_add(nxt.day, NEW.day, 1);
        END IF;
        UPDATE referral_days SET prev = NEW.day
        WHERE hospital = NEW.hospital AND department = NEW.department AND day = nxt.day;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION agg_department() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    PERFORM region_recompute(NEW.hospital, 'd:' || NEW.department);
    IF TG_OP = 'INSERT' OR OLD.launched_on IS DISTINCT FROM NEW.launched_on THEN
        PERFORM region_recompute(NEW.hospital, 'h');
        PERFORM referral_days_relaunch(NEW.hospital, NEW.department);
        INSERT INTO region_slugs AS g (department, first_launch)
        VALUES (NEW.department, (SELECT min(launched_on) FROM departments
                                 WHERE department = NEW.department))
        ON CONFLICT (department) DO UPDATE SET first_launch = EXCLUDED.first_launch;
    END IF;
    IF TG_OP = 'INSERT' OR OLD.closed_on IS DISTINCT FROM NEW.closed_on THEN
        FOR s IN SELECT supporter_id FROM supporters
                WHERE hospital = NEW.hospital AND department = NEW.department LOOP
            PERFORM region_recompute(NEW.hospital, 's:' || s.supporter_id);
        END LOOP;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION agg_supporter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM region_recompute(NEW.hospital, 's:' || NEW.supporter_id);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS agg_referral_day ON referral_days;
CREATE TRIGGER agg_referral_day AFTER INSERT ON referral_days
    FOR EACH ROW EXECUTE FUNCTION agg_referral_day();
DROP TRIGGER IF EXISTS agg_department ON departments;
CREATE TRIGGER agg_department AFTER INSERT OR UPDATE ON departments
    FOR EACH ROW EXECUTE FUNCTION agg_department();
DROP TRIGGER IF EXISTS agg_supporter ON supporters;
CREATE TRIGGER agg_supporter AFTER INSERT OR UPDATE ON supporters
    FOR EACH ROW EXECUTE FUNCTION agg_supporter();
DROP TRIGGER IF EXISTS agg_availability ON availability_changes;
CREATE TRIGGER agg_availability AFTER INSERT ON availability_changes
    FOR EACH ROW EXECUTE FUNCTION agg_supporter();

-- Every table above from the facts at once (the rebuild's bulk, rebuild.bulk; and the read
-- models projected before this migration): each department's, hospital's and supporter's
-- steps by region_part_rows, as the triggers write them, summed per day; each referral day's
-- prev and eff by a window.
CREATE OR REPLACE FUNCTION agg_build_region() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE region_parts, region_asof, region_slugs, referred_grid;
    INSERT INTO region_parts
    SELECT d.hospital, 'd:' || d.department, x.* FROM departments d,
        LATERAL region_part_rows(d.hospital, 'd:' || d.department) x;
    INSERT INTO region_parts
    SELECT h.hospital, 'h', x.* FROM (SELECT DISTINCT hospital FROM departments) h,
        LATERAL region_part_rows(h.hospital, 'h') x;
    INSERT INTO region_parts
    SELECT s.hospital, 's:' || s.supporter_id, x.* FROM supporters s,
        LATERAL region_part_rows(s.hospital, 's:' || s.supporter_id) x;
    INSERT INTO region_asof
    SELECT day, sum(launched), sum(open), sum(eligible), sum(adopted), sum(trained),
        sum(active), sum(available)
    FROM region_parts GROUP BY day;
    INSERT INTO region_slugs (department, first_launch)
    SELECT department, min(launched_on) FROM departments GROUP BY department;
    UPDATE referral_days x SET prev = y.prev, eff = y.eff FROM (
        SELECT r.hospital, r.department, r.day,
            coalesce(lag(r.day) OVER (PARTITION BY r.hospital, r.department ORDER BY r.day),
                '-infinity'::date) AS prev,
            CASE WHEN d.launched_on IS NULL THEN 'infinity'::date
                ELSE greatest(r.day, d.launched_on) END AS eff
        FROM referral_days r
        LEFT JOIN departments d ON d.hospital = r.hospital AND d.department = r.department
    ) AS y
    WHERE x.hospital = y.hospital AND x.department = y.department AND x.day = y.day
        AND (x.prev, x.eff) IS DISTINCT FROM (y.prev, y.eff);
    INSERT INTO referred_grid (month, prev, n)
    SELECT date_trunc('month', day)::date, prev, count(*) FROM referral_days WHERE eff = day
    GROUP BY 1, 2;
END $$;

CREATE OR REPLACE FUNCTION agg_build() RETURNS void LANGUAGE sql AS $$
    SELECT agg_build_facts();
    SELECT agg_build_region();
$$;

-- Read models projected before this migration: their steps from the rows they hold.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM region_parts) AND NOT EXISTS (SELECT 1 FROM referred_grid) THEN
        PERFORM agg_build_region();
    END IF;
END $$;
