-- Hospitals and departments in the one shape of shared/registry.py, whose rule now writes them.
ALTER TABLE hospitals DROP COLUMN IF EXISTS registered_at;  -- processing time, never read
ALTER TABLE hospitals ADD COLUMN IF NOT EXISTS physician_count integer NOT NULL DEFAULT 0;
ALTER TABLE departments ADD COLUMN IF NOT EXISTS physician_count integer NOT NULL DEFAULT 0;
