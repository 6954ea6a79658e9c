-- The change feed of the API's event streams: what changed since a moment, read from indexes.
--
-- Before this, every open `/api/events` stream re-read every queued or running run every 250 ms and
-- every `/api/runs/{id}/events` stream re-read its whole run: with 20,000 queued runs, 30 open console
-- tabs starved the connection pool the workers need. Now one poller per process asks "which runs and
-- steps changed since my last look" (src/history.rs `CHANGED_SINCE_SQL`; these indexes answer it from
-- the few changed rows), and broadcasts the answer to every stream of the process.

ALTER TABLE crm_sync.runs ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE crm_sync.steps ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Every update a follower can see stamps the row with the time of the change (clock_timestamp: a long
-- transaction's changes are not dated back to its start). Heartbeats, which only move a lease, do not:
-- they stay HOT updates and wake no stream.
CREATE FUNCTION crm_sync.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END;
$$;
CREATE TRIGGER runs_touch BEFORE UPDATE ON crm_sync.runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.error IS DISTINCT FROM NEW.error
          OR OLD.started_at IS DISTINCT FROM NEW.started_at
          OR OLD.finished_at IS DISTINCT FROM NEW.finished_at)
    EXECUTE FUNCTION crm_sync.touch_updated_at();
CREATE TRIGGER steps_touch BEFORE UPDATE ON crm_sync.steps
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempts IS DISTINCT FROM NEW.attempts
          OR OLD.error IS DISTINCT FROM NEW.error
          OR OLD.finished_at IS DISTINCT FROM NEW.finished_at)
    EXECUTE FUNCTION crm_sync.touch_updated_at();

-- Index-only scans: the feed needs the run id and the time, nothing else.
CREATE INDEX runs_updated ON crm_sync.runs (updated_at) INCLUDE (id);
CREATE INDEX steps_updated ON crm_sync.steps (updated_at) INCLUDE (run_id);
