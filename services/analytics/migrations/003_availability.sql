-- CONTRACT 1.1: one row per SupporterAvailabilityChanged (event_id: its CloudEvents id). A
-- supporter's availability at a period's end is their latest change dated before it.
CREATE TABLE IF NOT EXISTS availability_changes (
    hospital     text    NOT NULL,
    event_id     text    NOT NULL,
    supporter_id text    NOT NULL,
    department   text    NOT NULL,
    changed_on   date    NOT NULL,
    available    boolean NOT NULL,
    stream_seq   bigint,
    PRIMARY KEY (hospital, event_id)
);
CREATE INDEX IF NOT EXISTS availability_changes_department
    ON availability_changes (hospital, department);
