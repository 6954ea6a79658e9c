-- Retention: old run history is deleted in small batches so that the history tables stay small over
-- years of scheduled runs, and the indexes that keep pruning and the hot read queries fast.
--
-- crm_sync.prune_history() deletes at most one batch of finished runs and returns what it deleted, per
-- pipeline and status. `crm-sync serve` calls it every [retention] interval until a call deletes
-- nothing; `crm-sync prune` calls it once by hand; pg_cron or psql can call it too. A run's steps, its
-- attempts and its notification outbox rows go with it (ON DELETE CASCADE); runs that pointed at it as
-- retry_of/rerun_of keep existing with NULL there (ON DELETE SET NULL).

-- Deleting a run sets rerun_of to NULL in the runs that re-ran it: without this index every deleted
-- run costs a scan of crm_sync.runs. (retry_of has its unique index already.)
CREATE INDEX runs_rerun_of ON crm_sync.runs (rerun_of) WHERE rerun_of IS NOT NULL;

-- One pipeline's newest run, newest finished run, runs of one status: these lookups order by
-- `... DESC NULLS LAST` and their indexes are built the same way, so that no index on all
-- pipelines' runs (runs_created, runs_finished) can serve the order. With one, a generic plan or a
-- parameter from a join (pipeline_health's laterals) assumes every pipeline runs as often as the
-- others and walks the newest runs of all pipelines to find a rarely run one's: at a million runs,
-- 0.2-0.4 s per /health/pipelines or /metrics and 0.4-0.5 s added to each run that finishes (the
-- recovery trigger), measured by tests/indexes.rs. The columns are NOT NULL (or filtered on IS NOT
-- NULL), so NULLS LAST changes no result.
DROP INDEX crm_sync.runs_pipeline_created;
CREATE INDEX runs_pipeline_created ON crm_sync.runs (pipeline, created_at DESC NULLS LAST);
DROP INDEX crm_sync.runs_pipeline_finished;
CREATE INDEX runs_pipeline_finished ON crm_sync.runs (pipeline, finished_at DESC NULLS LAST, id DESC NULLS LAST)
    WHERE status IN ('failed', 'succeeded') AND finished_at IS NOT NULL;
-- Pruning walks one pipeline's finished runs of one status oldest first (read backwards) and finds its
-- keep_last boundary newest first.
CREATE INDEX runs_pipeline_status_created ON crm_sync.runs (pipeline, status, created_at DESC NULLS LAST, id DESC NULLS LAST)
    WHERE status IN ('succeeded', 'failed', 'cancelled');

-- Open runs: pipeline_health's queued and running counts, the all-runs event stream
-- (GET /api/events).
CREATE INDEX runs_open ON crm_sync.runs (pipeline, status) WHERE status IN ('queued', 'running');

-- pipeline_health as before; the last run is found through runs_pipeline_created (see above).
CREATE OR REPLACE VIEW crm_sync.pipeline_health AS
SELECT p.name AS pipeline,
       p.enabled,
       ls.finished_at AS last_success_at,
       ls.batch_id AS last_success_batch_id,
       extract(epoch FROM now() - ls.finished_at)::bigint AS seconds_since_success,
       lr.id AS last_run_id,
       lr.status AS last_status,
       lr.finished_at AS last_finished_at,
       lr.error AS last_error,
       p.freshness_sla_s,
       (p.enabled AND p.freshness_sla_s IS NOT NULL
            AND (ls.finished_at IS NULL OR now() - ls.finished_at > p.freshness_sla_s * interval '1 second')) AS stale,
       (SELECT count(*) FROM crm_sync.runs q WHERE q.pipeline = p.name AND q.status = 'queued') AS queued_runs,
       (SELECT count(*) FROM crm_sync.runs q WHERE q.pipeline = p.name AND q.status = 'running') AS running_runs
  FROM crm_sync.pipelines p
  LEFT JOIN LATERAL (SELECT batch_id, finished_at FROM crm_sync.runs s
                      WHERE s.pipeline = p.name AND s.status = 'succeeded'
                      ORDER BY finished_at DESC LIMIT 1) ls ON true
  LEFT JOIN LATERAL (SELECT id, status, finished_at, error FROM crm_sync.runs s
                      WHERE s.pipeline = p.name
                      ORDER BY created_at DESC NULLS LAST LIMIT 1) lr ON true;

-- record_run_event as before; the previous finished run is found through runs_pipeline_finished.
CREATE OR REPLACE FUNCTION crm_sync.record_run_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_kind      text;
    v_previous  text;
    v_event     bigint;
    v_finished  timestamptz := coalesce(NEW.finished_at, clock_timestamp());
BEGIN
    IF NEW.status = 'failed' THEN
        v_kind := 'run_failed';
    ELSE
        -- Strictly before this run: when one statement finishes several runs of a pipeline, each
        -- looks at the one before it, not at its siblings finished after it.
        SELECT r.status INTO v_previous FROM crm_sync.runs r
         WHERE r.pipeline = NEW.pipeline AND r.status IN ('failed', 'succeeded')
           AND r.finished_at IS NOT NULL
           AND (r.finished_at, r.id) < (v_finished, NEW.id)
         ORDER BY r.finished_at DESC NULLS LAST, r.id DESC NULLS LAST
         LIMIT 1;
        IF v_previous IS DISTINCT FROM 'failed' THEN
            RETURN NULL;
        END IF;
        v_kind := 'run_recovered';
    END IF;

    INSERT INTO crm_sync.notification_events (kind, run_id, pipeline, batch_id)
    VALUES (v_kind, NEW.id, NEW.pipeline, NEW.batch_id)
    RETURNING id INTO v_event;

    INSERT INTO crm_sync.notification_deliveries (event_id, webhook)
    SELECT v_event, w.name FROM crm_sync.webhooks w
     WHERE w.enabled AND v_kind = ANY (w.events)
       AND (w.pipelines IS NULL OR NEW.pipeline = ANY (w.pipelines));
    IF FOUND THEN
        PERFORM pg_notify('crm_sync_notifications', '');
    END IF;
    RETURN NULL;
END;
$$;

-- Deletes one batch (at most batch_size runs) of finished history and returns, per pipeline and
-- status, how many runs, steps, attempts, notification events and deliveries went, and the range of
-- the deleted runs' finish times. No row back means nothing (more) is due.
--
-- A run is due when it is failed, succeeded or cancelled, finished longer ago than the age given for its
-- status (as_of minus the age; NULL = keep that status forever), and is not among the keep_last newest
-- runs of its pipeline and status. Never deleted, whatever its age:
--   - queued and running runs;
--   - the pipeline's last success (pipeline_health's last_success_at and freshness), its newest run
--     (health's last status) and its last failed or succeeded run (the recovery notification compares
--     with it);
--   - a run whose retry is queued or running;
--   - a retry while the run it retried is kept (it goes after it, so a kept failed run never looks
--     un-retried and cannot be retried a second time);
--   - a run with a notification still pending delivery (the notifier reads the run).
-- Runs are locked FOR UPDATE SKIP LOCKED: two pruners share the work, and a run being retried or read
-- for update elsewhere waits for a later batch.
CREATE FUNCTION crm_sync.prune_history(
    succeeded   interval DEFAULT interval '30 days',
    failed      interval DEFAULT interval '180 days',
    cancelled   interval DEFAULT interval '30 days',
    keep_last   integer DEFAULT 100,
    batch_size  integer DEFAULT 1000,
    as_of       timestamptz DEFAULT now()
) RETURNS TABLE (
    pipeline text, status text, runs bigint, steps bigint, attempts bigint,
    notification_events bigint, notification_deliveries bigint,
    oldest_finished_at timestamptz, newest_finished_at timestamptz
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids            uuid[] := '{}';
    v_found          uuid[];
    v_left           integer;
    v_target         record;
    v_cutoff         timestamptz;
    v_keep_created   timestamptz;
    v_keep_id        uuid;
    v_newest_created timestamptz;
    v_last_success   timestamptz;
    v_last_finished  uuid;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'crm_sync.prune_history: batch_size must be at least 1, got %', batch_size
            USING ERRCODE = '22023';
    END IF;
    IF keep_last IS NULL OR keep_last < 0 THEN
        RAISE EXCEPTION 'crm_sync.prune_history: keep_last must be 0 or more, got %', keep_last
            USING ERRCODE = '22023';
    END IF;
    IF succeeded < interval '0' OR failed < interval '0' OR cancelled < interval '0' THEN
        RAISE EXCEPTION 'crm_sync.prune_history: ages must not be negative' USING ERRCODE = '22023';
    END IF;
    as_of := coalesce(as_of, now());

    FOR v_target IN
        SELECT p.name, t.status, t.age
          FROM crm_sync.pipelines p
         CROSS JOIN (VALUES ('cancelled', prune_history.cancelled), ('failed', prune_history.failed),
                            ('succeeded', prune_history.succeeded)) AS t (status, age)
         WHERE t.age IS NOT NULL
         ORDER BY p.name, t.status
    LOOP
        v_left := batch_size - cardinality(v_ids);
        EXIT WHEN v_left <= 0;
        v_cutoff := as_of - v_target.age;

        -- The oldest run keep_last keeps; fewer runs than that: nothing of this status goes.
        IF keep_last > 0 THEN
            SELECT r.created_at, r.id INTO v_keep_created, v_keep_id
              FROM crm_sync.runs r
             WHERE r.pipeline = v_target.name AND r.status = v_target.status
             ORDER BY r.created_at DESC NULLS LAST, r.id DESC NULLS LAST
            OFFSET keep_last - 1 LIMIT 1;
            CONTINUE WHEN NOT FOUND;
        ELSE
            v_keep_created := 'infinity';
            v_keep_id := 'ffffffff-ffff-ffff-ffff-ffffffffffff';
        END IF;

        -- What pipeline_health and the recovery trigger read, as they read it.
        SELECT r.created_at INTO v_newest_created
          FROM crm_sync.runs r WHERE r.pipeline = v_target.name
         ORDER BY r.created_at DESC NULLS LAST LIMIT 1;
        SELECT r.finished_at INTO v_last_success
          FROM crm_sync.runs r
         WHERE r.pipeline = v_target.name AND r.status = 'succeeded'
         ORDER BY r.finished_at DESC LIMIT 1;
        SELECT r.id INTO v_last_finished
          FROM crm_sync.runs r
         WHERE r.pipeline = v_target.name AND r.status IN ('failed', 'succeeded') AND r.finished_at IS NOT NULL
         ORDER BY r.finished_at DESC NULLS LAST, r.id DESC NULLS LAST LIMIT 1;

        SELECT array_agg(c.id) INTO v_found FROM (
            SELECT r.id FROM crm_sync.runs r
             WHERE r.pipeline = v_target.name AND r.status = v_target.status
               AND r.created_at < v_cutoff
               AND coalesce(r.finished_at, r.created_at) < v_cutoff
               AND (r.created_at, r.id) < (v_keep_created, v_keep_id)
               AND r.created_at < v_newest_created
               AND r.id IS DISTINCT FROM v_last_finished
               AND (r.status <> 'succeeded' OR r.finished_at IS DISTINCT FROM v_last_success)
               AND r.retry_of IS NULL
               AND NOT EXISTS (SELECT 1 FROM crm_sync.runs x
                                WHERE x.retry_of = r.id AND x.status IN ('queued', 'running'))
               AND NOT EXISTS (SELECT 1 FROM crm_sync.notification_events e
                                 JOIN crm_sync.notification_deliveries d ON d.event_id = e.id
                                WHERE e.run_id = r.id AND d.state = 'pending')
             ORDER BY r.created_at NULLS FIRST, r.id NULLS FIRST
             LIMIT v_left
             FOR UPDATE OF r SKIP LOCKED) c;
        v_ids := v_ids || coalesce(v_found, '{}');
    END LOOP;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    SELECT r.pipeline, r.status, count(*),
           coalesce(sum(st.n), 0)::bigint, coalesce(sum(att.n), 0)::bigint,
           coalesce(sum(ev.events), 0)::bigint, coalesce(sum(ev.deliveries), 0)::bigint,
           min(r.finished_at), max(r.finished_at)
      FROM crm_sync.runs r
      CROSS JOIN LATERAL (SELECT count(*) AS n FROM crm_sync.steps s WHERE s.run_id = r.id) st
      CROSS JOIN LATERAL (SELECT count(*) AS n FROM crm_sync.attempts a WHERE a.run_id = r.id) att
      CROSS JOIN LATERAL (SELECT count(DISTINCT e.id) AS events, count(d.id) AS deliveries
                            FROM crm_sync.notification_events e
                            LEFT JOIN crm_sync.notification_deliveries d ON d.event_id = e.id
                           WHERE e.run_id = r.id) ev
     WHERE r.id = ANY (v_ids)
     GROUP BY r.pipeline, r.status
     ORDER BY r.pipeline, r.status;

    DELETE FROM crm_sync.runs r WHERE r.id = ANY (v_ids);
END;
$$;
