-- Webhooks (CONTRACT.md 1.2; docs/decisions.md, "Webhooks"): one row a hospital. `position` is
-- the POST sequence of the last event the endpoint acknowledged (at registration: the stream's
-- last sequence then), moved only on the connection that holds the partition's webhook lease.
-- The signing secret is sealed (AES-GCM) under a key kept outside the database.
CREATE TABLE IF NOT EXISTS webhooks (
    hospital text PRIMARY KEY,
    partition int NOT NULL,
    url text NOT NULL,
    secret_sealed bytea NOT NULL,
    position bigint NOT NULL,
    failures int NOT NULL DEFAULT 0,
    last_error text,
    last_error_at timestamptz,
    delivered_at timestamptz,
    registered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhooks_by_partition ON webhooks (partition);
