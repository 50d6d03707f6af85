-- The event store, the outbox and the processed-message record of one service (its schema).
CREATE TABLE IF NOT EXISTS events (
    position       bigserial   PRIMARY KEY,          -- global position: drawn in order, commits may land out of it (read_all)
    stream_id      text        NOT NULL,
    stream_version integer     NOT NULL,
    event_id       uuid        NOT NULL UNIQUE,
    event_type     text        NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, stream_version)                -- optimistic concurrency
);

-- Events committed but not yet acknowledged by JetStream; the relay deletes a row once it is.
CREATE TABLE IF NOT EXISTS outbox (
    position bigint PRIMARY KEY REFERENCES events (position)
);

-- Every message handled, written in the same transaction as its effects: redelivery is harmless.
CREATE TABLE IF NOT EXISTS processed (
    message_id   text        PRIMARY KEY,             -- "{hospital}:{CloudEvents id}"
    stream_seq   bigint,                              -- JetStream sequence (the tracking position)
    processed_at timestamptz NOT NULL DEFAULT now()
);
