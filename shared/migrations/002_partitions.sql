-- Scale-out: hospitals in partitions (shared/partitions.py), one instance at a time on each.

-- partition(n, hospital) of NATS's subject mapping: FNV-1a, 32 bits, modulo n.
CREATE OR REPLACE FUNCTION post_partition(hospital text, n integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    h bigint := 2166136261;
    b bytea := convert_to(hospital, 'UTF8');
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        h := ((h # get_byte(b, i)) * 16777619) % 4294967296;
    END LOOP;
    RETURN (h % n)::integer;
END $$;

-- The owner of a partition publishes its events: each queued event says which partition.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS partition smallint;
UPDATE outbox o SET partition = post_partition(e.metadata->>'hospital', 8)
FROM events e WHERE e.position = o.position AND o.partition IS NULL;
ALTER TABLE outbox ALTER COLUMN partition SET NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_by_partition ON outbox (partition, position);

-- Commands (and events) that wait for a fact another service has not published yet: taken
-- off the stream, kept here with their place in it, retried when a fact of their hospital
-- comes, refused once nothing before them is pending anywhere (CONTRACT.md 1.1, "Order").
CREATE TABLE IF NOT EXISTS waiting (
    message_id text        PRIMARY KEY,             -- "{hospital}:{CloudEvents id}"
    partition  smallint    NOT NULL,
    hospital   text        NOT NULL,
    stream_seq bigint,                              -- its sequence in POST
    subject    text        NOT NULL,
    body       bytea       NOT NULL,
    stored_at  timestamptz NOT NULL,                -- when POST stored it (the 10 minutes)
    attempts   integer     NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS waiting_by_partition ON waiting (partition, stream_seq);

-- The instances of the service that are alive: the fair share of partitions is
-- ceil(partitions / live instances).
CREATE TABLE IF NOT EXISTS instances (
    instance_id  text        PRIMARY KEY,
    http_port    integer,
    heartbeat_at timestamptz NOT NULL
);
