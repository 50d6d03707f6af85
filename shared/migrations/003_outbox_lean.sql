-- Issue 15: an append writes its outbox rows in the statement that inserts their events
-- (shared/eventstore.py APPEND_SQL), so each row names a new event, once. Two checks of that
-- cost an append more than they guarded (bench `store`, 5 events per append, 4 writers):
--   * the foreign key to events: a trigger query per queued row (0.04 ms of an append's 0.19 ms
--     in the database), for events that are never deleted;
--   * the primary key on position: a second index per row; the relay reads and deletes by
--     (partition, position), which outbox_by_partition (002) serves.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_position_fkey;
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_pkey;
