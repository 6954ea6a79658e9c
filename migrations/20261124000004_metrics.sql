-- Metrics support.
-- 1. claim_steps also returns the run's trigger, so that the worker that finishes a run can count it
--    in crm_sync_runs_total{pipeline, trigger, status} without another round trip.
-- 2. workers remember their lease, so "alive" means "heartbeat within its own lease" whatever the
--    lease of each replica (crm_sync_workers_alive, the CrmSyncNoWorkerAlive alert).
-- 3. crm_sync.queue_metrics(): the queue gauges in one statement for /metrics.

DROP FUNCTION crm_sync.claim_steps(text, integer, bigint);
CREATE FUNCTION crm_sync.claim_steps(p_worker text, p_limit integer, p_lease_ms bigint)
RETURNS TABLE (
    step_id bigint, run_id uuid, pipeline text, step_name text, step_position integer, attempt integer,
    fence bigint, max_attempts integer, timeout_ms bigint, batch_id text, params jsonb, inputs jsonb,
    trigger text
)
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT s.id FROM crm_sync.steps s
         WHERE s.status = 'queued' AND s.run_at <= now()
         ORDER BY s.run_at, s.id
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE crm_sync.steps s
           SET status = 'running', attempts = s.attempts + 1, fence = s.fence + 1,
               lease_owner = p_worker, lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
               attempt_started_at = now(), started_at = coalesce(s.started_at, now()), error = NULL
          FROM picked WHERE s.id = picked.id
        RETURNING s.*
    ), started AS (
        UPDATE crm_sync.runs r SET status = 'running', started_at = coalesce(r.started_at, now())
         WHERE r.id IN (SELECT c.run_id FROM claimed c) AND r.status = 'queued'
    )
    SELECT c.id, c.run_id, c.pipeline, c.name, c.position, c.attempts, c.fence, c.max_attempts, c.timeout_ms,
           r.batch_id, r.params,
           CASE WHEN c.position = 1 THEN '{}'::jsonb ELSE
               (SELECT coalesce(jsonb_object_agg(e.name, e.output), '{}'::jsonb) FROM crm_sync.steps e
                 WHERE e.run_id = c.run_id AND e.position < c.position AND e.status = 'succeeded')
           END,
           r.trigger
      FROM claimed c JOIN crm_sync.runs r ON r.id = c.run_id
     ORDER BY c.id
$$;

ALTER TABLE crm_sync.workers ADD COLUMN lease_ms bigint NOT NULL DEFAULT 30000 CHECK (lease_ms > 0);

-- The queue as gauges: runs waiting for a concurrency slot, steps due now, steps queued for later
-- (retry backoff), steps running; the age of the oldest due step; the workers alive.
CREATE FUNCTION crm_sync.queue_metrics(
    OUT waiting bigint, OUT queued bigint, OUT delayed bigint, OUT running bigint,
    OUT oldest_queued_age_s double precision, OUT workers_alive bigint)
LANGUAGE sql STABLE AS $$
    SELECT
        (SELECT count(*) FROM crm_sync.runs WHERE status = 'queued' AND admitted_at IS NULL),
        (SELECT count(*) FROM crm_sync.steps WHERE status = 'queued' AND run_at <= now()),
        (SELECT count(*) FROM crm_sync.steps WHERE status = 'queued' AND run_at > now()),
        (SELECT count(*) FROM crm_sync.steps WHERE status = 'running'),
        (SELECT coalesce(extract(epoch FROM now() - min(run_at)), 0)::double precision
           FROM crm_sync.steps WHERE status = 'queued' AND run_at <= now()),
        (SELECT count(*) FROM crm_sync.workers
          WHERE stopped_at IS NULL AND heartbeat_at > now() - lease_ms * interval '1 millisecond');
$$;
