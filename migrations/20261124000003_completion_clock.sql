-- A step that completes inside its own long transaction (a PostgreSQL load commits the batch and its
-- completion together) must record when it finished, not when its transaction began: finished_at
-- comes from clock_timestamp() instead of now().

CREATE OR REPLACE FUNCTION crm_sync.complete_steps(p_worker text, p_ids bigint[], p_fences bigint[], p_outputs jsonb[])
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_accepted   bigint[];
    v_finished   text[];
    v_next       integer;
    v_pipeline   text;
BEGIN
    WITH done AS (
        UPDATE crm_sync.steps s
           SET status = 'succeeded', output = x.output, finished_at = clock_timestamp(),
               lease_owner = NULL, lease_expires_at = NULL, error = NULL
          FROM unnest(p_ids, p_fences, p_outputs) AS x(id, fence, output)
         WHERE s.id = x.id AND s.fence = x.fence AND s.status = 'running'
        RETURNING s.id, s.run_id, s.position, s.fence, s.pipeline, s.attempts, s.attempt_started_at
    ), logged AS (
        INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, finished_at, outcome)
        SELECT done.id, done.run_id, done.attempts, done.fence, p_worker, done.attempt_started_at, clock_timestamp(), 'succeeded'
          FROM done
    ), next_steps AS (
        UPDATE crm_sync.steps n SET status = 'queued', run_at = now()
          FROM done WHERE n.run_id = done.run_id AND n.position = done.position + 1 AND n.status = 'pending'
        RETURNING n.id
    ), finished AS (
        UPDATE crm_sync.runs r SET status = 'succeeded', finished_at = clock_timestamp(), error = NULL
          FROM done
         WHERE r.id = done.run_id AND r.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM crm_sync.steps l WHERE l.run_id = done.run_id AND l.position > done.position)
        RETURNING r.pipeline
    )
    SELECT (SELECT array_agg(id) FROM done),
           (SELECT array_agg(DISTINCT f.pipeline) FROM finished f),
           (SELECT count(*) FROM next_steps)
      INTO v_accepted, v_finished, v_next;

    IF v_finished IS NOT NULL THEN
        FOR v_pipeline IN
            SELECT name FROM crm_sync.pipelines WHERE name = ANY (v_finished) AND max_concurrent_runs IS NOT NULL
        LOOP
            PERFORM crm_sync.admit_runs(v_pipeline);
        END LOOP;
    END IF;
    IF v_next > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN QUERY SELECT unnest(coalesce(v_accepted, '{}'));
END;
$$;
