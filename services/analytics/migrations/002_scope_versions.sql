-- A version per hospital, bumped in the transaction of every fact row the hospital gets (and
-- for every hospital when the read models are rebuilt): a rendered RE-AIM answer is served
-- from memory only while its hospital's version is the one it was computed at. Never emptied,
-- so a version is never reused.
CREATE TABLE IF NOT EXISTS scope_versions (
    hospital text   PRIMARY KEY,
    version  bigint NOT NULL
);

-- Read models projected before this migration: every hospital they hold starts at version 1.
INSERT INTO scope_versions (hospital, version)
SELECT hospital, 1 FROM (
    SELECT hospital FROM hospitals UNION SELECT hospital FROM departments
    UNION SELECT hospital FROM supporters UNION SELECT hospital FROM referrals
    UNION SELECT hospital FROM outreach UNION SELECT hospital FROM interactions
    UNION SELECT hospital FROM surveys
) AS seen
ON CONFLICT (hospital) DO NOTHING;
