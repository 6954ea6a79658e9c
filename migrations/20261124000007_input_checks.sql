-- Input checks on the queue's SQL functions: every argument a caller (psql, pg_cron, a worker, a
-- script) can get wrong is refused with its SQLSTATE and a message naming the function, the argument
-- and the rule, before anything is written.
--
--   22004 (null_value_not_allowed)   a required argument is NULL
--   22023 (invalid_parameter_value)  a value is out of its range, of the wrong JSON kind, arrays of
--                                    different lengths, ...
--   P0002 (no_data_found)            an unknown pipeline or run (as before)
--
-- Before this, some of them were accepted and did harm: claim_steps(NULL, ..) claimed steps for no
-- worker (the reaper then failed on the NULL worker_id), a NULL lease left a step running forever, a
-- NULL limit claimed every due step, enqueue_runs(.., 2000000000, ..) filled the disk, params holding
-- a number like 1e400 or nested 200 deep were stored and then broke every worker's claim (serde_json
-- cannot read them back), mismatched arrays were silently ignored. Others failed with a message about
-- a constraint or a LIMIT clause instead of the argument.
--
-- The checks wrap the existing functions, renamed *_unchecked, instead of copying their bodies: the
-- function bodies stay where they were written (and with whatever later migrations changed), and the
-- public names keep their signatures.

-- The limits, in one place (also the config's: worker.concurrency and worker.claim_batch <= 10000).
CREATE OR REPLACE FUNCTION crm_sync.max_batch() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 10000 $$;

-- Raises `message` (prefixed with the function's name) with `sqlstate` unless `ok` is true.
CREATE OR REPLACE FUNCTION crm_sync.require(ok boolean, fn text, sqlstate text, message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'crm_sync.%: %', fn, message USING ERRCODE = sqlstate;
    END IF;
END;
$$;

-- A worker id: not NULL, 1-200 characters.
CREATE OR REPLACE FUNCTION crm_sync.check_worker(fn text, p_worker text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_worker IS NOT NULL, fn, '22004', 'worker id must not be null');
    PERFORM crm_sync.require(length(p_worker) BETWEEN 1 AND 200, fn, '22023',
        format('worker id must be 1-200 characters, got %s', length(p_worker)));
END;
$$;

-- A lease in milliseconds: 1 ms to 24 h (beyond, now() + lease overflows long before it means anything).
CREATE OR REPLACE FUNCTION crm_sync.check_lease(fn text, p_lease_ms bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_lease_ms IS NOT NULL, fn, '22004', 'lease_ms must not be null');
    PERFORM crm_sync.require(p_lease_ms BETWEEN 1 AND 86400000, fn, '22023',
        format('lease_ms must be between 1 and 86400000 (24 h), got %s', p_lease_ms));
END;
$$;

-- Parallel arrays of step ids and fencing tokens (and outputs): not NULL, no NULL element, the same
-- length, at most max_batch() elements.
CREATE OR REPLACE FUNCTION crm_sync.check_leases(fn text, p_ids bigint[], p_fences bigint[], p_outputs jsonb[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_ids IS NOT NULL AND p_fences IS NOT NULL, fn, '22004',
        'step ids and fences must not be null (pass empty arrays for none)');
    PERFORM crm_sync.require(cardinality(p_ids) = cardinality(p_fences), fn, '22023',
        format('step ids and fences must have the same length, got %s ids and %s fences',
               cardinality(p_ids), cardinality(p_fences)));
    PERFORM crm_sync.require(p_outputs IS NULL OR cardinality(p_outputs) IN (0, cardinality(p_ids)), fn, '22023',
        format('outputs must have one element per step id, got %s ids and %s outputs',
               cardinality(p_ids), cardinality(p_outputs)));
    PERFORM crm_sync.require(cardinality(p_ids) <= crm_sync.max_batch(), fn, '22023',
        format('at most %s steps per call, got %s', crm_sync.max_batch(), cardinality(p_ids)));
    PERFORM crm_sync.require(array_position(p_ids, NULL) IS NULL AND array_position(p_fences, NULL) IS NULL,
        fn, '22004', 'step ids and fences must not contain nulls');
END;
$$;

-- A run trigger, as the runs table's CHECK constraint has it.
CREATE OR REPLACE FUNCTION crm_sync.check_trigger(fn text, p_trigger text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_trigger IS NOT NULL, fn, '22004', 'trigger must not be null');
    PERFORM crm_sync.require(p_trigger IN ('schedule', 'api', 'cli', 'sql', 'console', 'retry'), fn, '22023',
        format('trigger %s is not one of schedule, api, cli, sql, console, retry', quote_literal(left(p_trigger, 40))));
END;
$$;

-- A pipeline name: not NULL; one that cannot be a pipeline's name (the pipelines table's CHECK) is
-- unknown, and is not echoed whole (it may be megabytes).
CREATE OR REPLACE FUNCTION crm_sync.check_pipeline_name(fn text, p_pipeline text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_pipeline IS NOT NULL AND p_pipeline <> '', fn, '22004',
        'pipeline name must not be null or empty');
    IF p_pipeline !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'unknown pipeline "%"', left(p_pipeline, 64) || CASE WHEN length(p_pipeline) > 64 THEN '...' ELSE '' END
            USING ERRCODE = 'P0002',
                  DETAIL = 'pipeline names are 1-64 letters, digits, "_", "-" or "."',
                  HINT = 'known pipelines: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM crm_sync.pipelines WHERE enabled), 'none');
    END IF;
END;
$$;

-- Run parameters every reader can read back: at most 64 KiB of JSON text, nested at most 64 deep, and
-- numbers below 1e308 in magnitude (jsonb keeps any numeric, but a double, and so serde_json, cannot
-- hold more; PostgreSQL prints 1e308 as 309 digits). Returns the first problem, or NULL.
CREATE OR REPLACE FUNCTION crm_sync.params_problem(p jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE walk(v, depth, path) AS (
        SELECT p, 1, 'params'
      UNION ALL
        SELECT c.v, w.depth + 1, c.path
          FROM walk w
          CROSS JOIN LATERAL (
              SELECT e.value AS v, w.path || '.' || left(e.key, 40) AS path
                FROM jsonb_each(CASE WHEN jsonb_typeof(w.v) = 'object' THEN w.v END) e
              UNION ALL
              SELECT a.value, w.path || '[' || (a.ord - 1) || ']'
                FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.v) = 'array' THEN w.v END)
                     WITH ORDINALITY a(value, ord)
          ) c
         WHERE w.depth <= 64
    )
    SELECT CASE
        WHEN p IS NULL OR p = '{}'::jsonb THEN NULL
        WHEN octet_length(p::text) > 65536 THEN
            format('params are %s bytes of JSON, more than the 65536 allowed', octet_length(p::text))
        ELSE (SELECT CASE WHEN w.depth > 64
                          THEN format('params nest deeper than 64 levels (at %s)', left(w.path, 200))
                          ELSE format('%s is a number too large to read back (%s...); numbers must be below 1e308',
                                      left(w.path, 200), left(w.v::text, 20)) END
                FROM walk w
               WHERE w.depth > 64 OR (jsonb_typeof(w.v) = 'number' AND abs(w.v::numeric) >= 1e308)
               LIMIT 1)
    END
$$;

-- ---------------------------------------------------------------------------------------------------
-- Enqueueing: enqueue_run (SQL), the API, CLI and scheduler, rerun_run all go through enqueue_run_as.

ALTER FUNCTION crm_sync.enqueue_run_as(text, jsonb, text, text, timestamptz) RENAME TO enqueue_run_as_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.enqueue_run_as(
    p_pipeline text, p_params jsonb, p_idempotency_key text, p_trigger text, p_scheduled_for timestamptz
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_problem text;
BEGIN
    PERFORM crm_sync.check_pipeline_name('enqueue_run', p_pipeline);
    PERFORM crm_sync.check_trigger('enqueue_run', p_trigger);
    PERFORM crm_sync.require(p_idempotency_key IS NULL OR length(p_idempotency_key) BETWEEN 1 AND 200,
        'enqueue_run', '22023',
        format('idempotency key must be 1-200 characters, got %s', length(p_idempotency_key)));
    PERFORM crm_sync.require(p_params IS NULL OR jsonb_typeof(p_params) = 'object', 'enqueue_run', '22023',
        format('params must be a JSON object, got %s', jsonb_typeof(p_params)));
    v_problem := crm_sync.params_problem(p_params);
    PERFORM crm_sync.require(v_problem IS NULL, 'enqueue_run', '22023', v_problem);
    RETURN crm_sync.enqueue_run_as_unchecked(p_pipeline, p_params, p_idempotency_key, p_trigger, p_scheduled_for);
END;
$$;

ALTER FUNCTION crm_sync.enqueue_runs(text, integer, text) RENAME TO enqueue_runs_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.enqueue_runs(p_pipeline text, p_count integer, p_trigger text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_pipeline_name('enqueue_runs', p_pipeline);
    PERFORM crm_sync.require(p_count IS NOT NULL, 'enqueue_runs', '22004', 'count must not be null');
    PERFORM crm_sync.require(p_count BETWEEN 1 AND crm_sync.max_batch(), 'enqueue_runs', '22023',
        format('count must be between 1 and %s, got %s (call it again for more)', crm_sync.max_batch(), p_count));
    PERFORM crm_sync.check_trigger('enqueue_runs', p_trigger);
    RETURN QUERY SELECT * FROM crm_sync.enqueue_runs_unchecked(p_pipeline, p_count, p_trigger);
END;
$$;

ALTER FUNCTION crm_sync.rerun_run(uuid, text) RENAME TO rerun_run_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.rerun_run(p_run uuid, p_trigger text) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.require(p_run IS NOT NULL, 'rerun_run', '22004', 'run id must not be null');
    PERFORM crm_sync.check_trigger('rerun_run', p_trigger);
    RETURN crm_sync.rerun_run_unchecked(p_run, p_trigger);
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- The worker's functions.

ALTER FUNCTION crm_sync.claim_steps(text, integer, bigint) RENAME TO claim_steps_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.claim_steps(p_worker text, p_limit integer, p_lease_ms bigint)
RETURNS TABLE (
    step_id bigint, run_id uuid, pipeline text, step_name text, step_position integer, attempt integer,
    fence bigint, max_attempts integer, timeout_ms bigint, batch_id text, params jsonb, inputs jsonb,
    trigger text
)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_worker('claim_steps', p_worker);
    PERFORM crm_sync.require(p_limit IS NOT NULL, 'claim_steps', '22004', 'limit must not be null');
    PERFORM crm_sync.require(p_limit BETWEEN 1 AND crm_sync.max_batch(), 'claim_steps', '22023',
        format('limit must be between 1 and %s, got %s', crm_sync.max_batch(), p_limit));
    PERFORM crm_sync.check_lease('claim_steps', p_lease_ms);
    RETURN QUERY SELECT * FROM crm_sync.claim_steps_unchecked(p_worker, p_limit, p_lease_ms);
END;
$$;

ALTER FUNCTION crm_sync.complete_steps(text, bigint[], bigint[], jsonb[]) RENAME TO complete_steps_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.complete_steps(p_worker text, p_ids bigint[], p_fences bigint[], p_outputs jsonb[])
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_worker('complete_steps', p_worker);
    PERFORM crm_sync.require(p_outputs IS NOT NULL, 'complete_steps', '22004', 'outputs must not be null');
    PERFORM crm_sync.check_leases('complete_steps', p_ids, p_fences, p_outputs);
    RETURN QUERY SELECT * FROM crm_sync.complete_steps_unchecked(p_worker, p_ids, p_fences, p_outputs);
END;
$$;

ALTER FUNCTION crm_sync.fail_step(text, bigint, bigint, text, boolean, timestamptz) RENAME TO fail_step_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.fail_step(
    p_worker text, p_id bigint, p_fence bigint, p_error text, p_retryable boolean, p_retry_at timestamptz
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_worker('fail_step', p_worker);
    PERFORM crm_sync.require(p_id IS NOT NULL AND p_fence IS NOT NULL, 'fail_step', '22004',
        'step id and fence must not be null');
    PERFORM crm_sync.require(p_retryable IS NOT NULL, 'fail_step', '22004',
        'retryable must be true or false, not null');
    RETURN crm_sync.fail_step_unchecked(p_worker, p_id, p_fence, p_error, p_retryable, p_retry_at);
END;
$$;

ALTER FUNCTION crm_sync.heartbeat(text, bigint[], bigint[], bigint) RENAME TO heartbeat_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.heartbeat(p_worker text, p_ids bigint[], p_fences bigint[], p_lease_ms bigint)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_worker('heartbeat', p_worker);
    PERFORM crm_sync.check_leases('heartbeat', p_ids, p_fences);
    PERFORM crm_sync.check_lease('heartbeat', p_lease_ms);
    RETURN QUERY SELECT * FROM crm_sync.heartbeat_unchecked(p_worker, p_ids, p_fences, p_lease_ms);
END;
$$;

ALTER FUNCTION crm_sync.release_steps(text, bigint[], bigint[]) RENAME TO release_steps_unchecked;
CREATE OR REPLACE FUNCTION crm_sync.release_steps(p_worker text, p_ids bigint[], p_fences bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM crm_sync.check_worker('release_steps', p_worker);
    PERFORM crm_sync.check_leases('release_steps', p_ids, p_fences);
    RETURN crm_sync.release_steps_unchecked(p_worker, p_ids, p_fences);
END;
$$;
