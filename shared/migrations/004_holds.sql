-- Issue 21: a message that fails for a passing reason (the database, NATS) holds back its own
-- hospital, never its partition. It stays in `waiting` as the hospital's head, tried again at
-- `retry_at`; every later message of that hospital waits behind it (`held`), in stream order,
-- until the head is done (handled, answered, or dead-lettered after POST_MAX_DELIVER tries).
ALTER TABLE waiting ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;
ALTER TABLE waiting ADD COLUMN IF NOT EXISTS retry_at timestamptz;
ALTER TABLE waiting ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;

-- Which hospitals some service holds back, for every service to read: a command waiting for
-- another service's fact is not refused while the hospital's message that may bring the fact
-- is being retried there (CONTRACT.md 1.1, "Order"). Written on the partition's lease
-- connection, in the transaction that parks or releases the head: fenced like the rest.
-- Every service runs this file: one at a time (the lock), the first one creates.
SELECT pg_advisory_xact_lock(hashtext('migrate:post_platform'));
-- Created once, by whichever service comes first (its role owns it); every service's role may
-- read and write it.
DO $$
BEGIN
    IF to_regclass('post_platform.holds') IS NULL THEN
        CREATE TABLE post_platform.holds (
            service   text        NOT NULL,
            hospital  text        NOT NULL,
            partition smallint    NOT NULL,
            since     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (service, hospital)
        );
        CREATE INDEX holds_by_partition ON post_platform.holds (partition);
        GRANT SELECT, INSERT, UPDATE, DELETE ON post_platform.holds TO PUBLIC;
    END IF;
END $$;
