-- crm-sync: the durable step queue and the run history are the same tables.
--
-- A run is one batch of one pipeline. Its steps are created with the run (status `pending`); the first
-- non-succeeded step becomes `queued` when the run is admitted (per-pipeline concurrency), a worker claims
-- it (`running`, with a lease and a fencing token), and completing it queues the next step in the same
-- transaction. Every attempt that ends (succeeded, failed, lost, released, cancelled) is a row in
-- `attempts`: the run log. The attempt in progress lives on the step row (lease_owner, attempt_started_at).

CREATE SCHEMA IF NOT EXISTS crm_sync;

-- Pipelines are registered from the config file by every crm-sync process at start, so that SQL callers
-- (pg_cron, psql) can enqueue by name and the database knows each pipeline's limits.
CREATE TABLE crm_sync.pipelines (
    name                 text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    steps                text[] NOT NULL CHECK (cardinality(steps) > 0),
    max_attempts         integer NOT NULL CHECK (max_attempts >= 1),
    step_timeout_ms      bigint NOT NULL CHECK (step_timeout_ms > 0),
    -- NULL: no limit on concurrently active runs.
    max_concurrent_runs  integer CHECK (max_concurrent_runs >= 1),
    freshness_sla_s      bigint CHECK (freshness_sla_s > 0),
    enabled              boolean NOT NULL DEFAULT true,
    registered_at        timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE crm_sync.runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    pipeline         text NOT NULL REFERENCES crm_sync.pipelines (name),
    -- Carried by every loaded row. A retry keeps the batch_id of the run it retries.
    batch_id         text NOT NULL,
    trigger          text NOT NULL CHECK (trigger IN ('schedule', 'api', 'cli', 'sql', 'console', 'retry')),
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params           jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    idempotency_key  text,
    retry_of         uuid REFERENCES crm_sync.runs (id) ON DELETE SET NULL,
    rerun_of         uuid REFERENCES crm_sync.runs (id) ON DELETE SET NULL,
    -- The scheduled occurrence this run was enqueued for (trigger = schedule).
    scheduled_for    timestamptz,
    -- Set when the run got one of its pipeline's concurrency slots.
    admitted_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    error            text
);
CREATE UNIQUE INDEX runs_idempotency_key ON crm_sync.runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- A failed run is retried at most once; retry the retry to go again.
CREATE UNIQUE INDEX runs_retry_of ON crm_sync.runs (retry_of) WHERE retry_of IS NOT NULL;
CREATE INDEX runs_pipeline_created ON crm_sync.runs (pipeline, created_at DESC);
CREATE INDEX runs_created ON crm_sync.runs (created_at DESC);
CREATE INDEX runs_failed_created ON crm_sync.runs (created_at DESC) WHERE status = 'failed';
CREATE INDEX runs_waiting ON crm_sync.runs (pipeline, created_at)
    WHERE status = 'queued' AND admitted_at IS NULL;
CREATE INDEX runs_active ON crm_sync.runs (pipeline)
    WHERE status IN ('queued', 'running') AND admitted_at IS NOT NULL;
CREATE INDEX runs_last_success ON crm_sync.runs (pipeline, finished_at DESC) WHERE status = 'succeeded';

CREATE TABLE crm_sync.steps (
    id                bigserial PRIMARY KEY,
    run_id            uuid NOT NULL REFERENCES crm_sync.runs (id) ON DELETE CASCADE,
    pipeline          text NOT NULL,
    name              text NOT NULL,
    position          integer NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Attempts used in this run (the retry budget); every attempt is also a row in crm_sync.attempts.
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    timeout_ms        bigint NOT NULL,
    run_at            timestamptz NOT NULL DEFAULT now(),
    -- Fencing token: bumped by every claim; completing requires the token of the current claim.
    fence             bigint NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_expires_at  timestamptz,
    attempt_started_at timestamptz,
    started_at        timestamptz,
    finished_at       timestamptz,
    -- The checkpoint the next step reads (object URI, rows, bytes, checksum...).
    output            jsonb,
    error             text,
    -- Set when a retry reused this succeeded step's checkpoint from an earlier run.
    reused_from_run   uuid,
    UNIQUE (run_id, position)
);
CREATE INDEX steps_claim ON crm_sync.steps (run_at, id) WHERE status = 'queued';
CREATE INDEX steps_leases ON crm_sync.steps (lease_expires_at) WHERE status = 'running';

CREATE TABLE crm_sync.attempts (
    id           bigserial PRIMARY KEY,
    step_id      bigint NOT NULL REFERENCES crm_sync.steps (id) ON DELETE CASCADE,
    run_id       uuid NOT NULL,
    attempt      integer NOT NULL,
    fence        bigint NOT NULL,
    worker_id    text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL
                 CHECK (outcome IN ('succeeded', 'retry', 'failed', 'lost', 'released', 'cancelled')),
    error        text,
    UNIQUE (step_id, fence)
);
CREATE INDEX attempts_run ON crm_sync.attempts (run_id);

-- Live workers: for health ("no worker alive") and to read the run log by worker.
CREATE TABLE crm_sync.workers (
    id            text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);

-- ---------------------------------------------------------------------------------------------------
-- Admission: give queued runs of one pipeline their concurrency slots, oldest first, and queue their
-- first unfinished step. Callers hold (or this takes) the pipeline row lock, which serialises admission.
CREATE FUNCTION crm_sync.admit_runs(p_pipeline text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_limit   integer;
    v_active  integer;
    v_admitted integer := 0;
BEGIN
    SELECT max_concurrent_runs INTO v_limit
      FROM crm_sync.pipelines WHERE name = p_pipeline FOR NO KEY UPDATE;

    IF v_limit IS NOT NULL THEN
        SELECT count(*) INTO v_active FROM crm_sync.runs
         WHERE pipeline = p_pipeline AND status IN ('queued', 'running') AND admitted_at IS NOT NULL;
        IF v_active >= v_limit THEN
            RETURN 0;
        END IF;
    END IF;

    WITH admitted AS (
        UPDATE crm_sync.runs r SET admitted_at = now()
         WHERE r.id IN (SELECT id FROM crm_sync.runs
                         WHERE pipeline = p_pipeline AND status = 'queued' AND admitted_at IS NULL
                         ORDER BY created_at, id
                         LIMIT CASE WHEN v_limit IS NULL THEN NULL ELSE v_limit - v_active END)
        RETURNING r.id
    ), first_steps AS (
        UPDATE crm_sync.steps s SET status = 'queued', run_at = now()
          FROM (SELECT DISTINCT ON (st.run_id) st.id
                  FROM crm_sync.steps st JOIN admitted a ON a.id = st.run_id
                 WHERE st.status = 'pending'
                 ORDER BY st.run_id, st.position) f
         WHERE s.id = f.id
        RETURNING s.id
    )
    SELECT count(*) INTO v_admitted FROM first_steps;

    IF v_admitted > 0 THEN
        PERFORM pg_notify('crm_sync_steps', p_pipeline);
    END IF;
    RETURN v_admitted;
END;
$$;

-- A readable batch id: pipeline, UTC time, short random suffix (at most 50 characters).
CREATE FUNCTION crm_sync.new_batch_id(p_pipeline text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT left(p_pipeline, 26) || '_' || to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS"Z"')
           || '_' || substr(md5(gen_random_uuid()::text), 1, 6)
$$;

-- Creates one run of a pipeline with its steps, then admits what fits. The trigger says who asked.
CREATE FUNCTION crm_sync.enqueue_run_as(
    p_pipeline text, p_params jsonb, p_idempotency_key text, p_trigger text, p_scheduled_for timestamptz
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    p        crm_sync.pipelines%ROWTYPE;
    v_run    uuid;
    v_prev   crm_sync.runs%ROWTYPE;
BEGIN
    IF p_pipeline IS NULL OR p_pipeline = '' THEN
        RAISE EXCEPTION 'crm_sync.enqueue_run: pipeline name must not be null or empty'
            USING ERRCODE = '22004';
    END IF;
    p_params := coalesce(p_params, '{}'::jsonb);
    IF jsonb_typeof(p_params) <> 'object' THEN
        RAISE EXCEPTION 'crm_sync.enqueue_run: params must be a JSON object, got %', jsonb_typeof(p_params)
            USING ERRCODE = '22023';
    END IF;

    SELECT * INTO p FROM crm_sync.pipelines WHERE name = p_pipeline FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown pipeline "%"', p_pipeline
            USING ERRCODE = 'P0002',
                  HINT = 'known pipelines: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM crm_sync.pipelines WHERE enabled), 'none');
    END IF;
    IF NOT p.enabled THEN
        RAISE EXCEPTION 'pipeline "%" is disabled (not in the current config)', p_pipeline USING ERRCODE = '55000';
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_prev FROM crm_sync.runs WHERE idempotency_key = p_idempotency_key;
        IF FOUND THEN
            IF v_prev.pipeline = p_pipeline AND v_prev.params = p_params THEN
                RETURN v_prev.id;
            END IF;
            RAISE EXCEPTION 'idempotency key "%" was already used for run % of pipeline "%" with other parameters',
                p_idempotency_key, v_prev.id, v_prev.pipeline USING ERRCODE = '23505';
        END IF;
    END IF;

    INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, params, idempotency_key, scheduled_for)
    VALUES (p_pipeline, crm_sync.new_batch_id(p_pipeline), p_trigger, p_params, p_idempotency_key, p_scheduled_for)
    RETURNING id INTO v_run;

    INSERT INTO crm_sync.steps (run_id, pipeline, name, position, max_attempts, timeout_ms)
    SELECT v_run, p_pipeline, s.name, s.ord::integer, p.max_attempts, p.step_timeout_ms
      FROM unnest(p.steps) WITH ORDINALITY AS s(name, ord);

    PERFORM crm_sync.admit_runs(p_pipeline);
    RETURN v_run;
END;
$$;

-- The SQL entry point of the contract: `SELECT crm_sync.enqueue_run('NAME')` from psql or pg_cron.
CREATE FUNCTION crm_sync.enqueue_run(pipeline text, params jsonb DEFAULT '{}', idempotency_key text DEFAULT NULL)
RETURNS uuid
LANGUAGE sql AS $$
    SELECT crm_sync.enqueue_run_as(pipeline, params, idempotency_key, 'sql', NULL)
$$;

-- Bulk enqueue for benchmarks and back-fills: n runs in one statement.
CREATE FUNCTION crm_sync.enqueue_runs(p_pipeline text, p_count integer, p_trigger text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    p crm_sync.pipelines%ROWTYPE;
BEGIN
    SELECT * INTO p FROM crm_sync.pipelines WHERE name = p_pipeline AND enabled FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown pipeline "%"', p_pipeline USING ERRCODE = 'P0002';
    END IF;
    RETURN QUERY
    WITH new_runs AS (
        INSERT INTO crm_sync.runs (pipeline, batch_id, trigger)
        SELECT p_pipeline, crm_sync.new_batch_id(p_pipeline), p_trigger FROM generate_series(1, p_count)
        RETURNING id
    ), new_steps AS (
        INSERT INTO crm_sync.steps (run_id, pipeline, name, position, max_attempts, timeout_ms)
        SELECT r.id, p_pipeline, s.name, s.ord::integer, p.max_attempts, p.step_timeout_ms
          FROM new_runs r, unnest(p.steps) WITH ORDINALITY AS s(name, ord)
    )
    SELECT id FROM new_runs;
    PERFORM crm_sync.admit_runs(p_pipeline);
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Claim up to p_limit due steps for one worker in one round trip: lease, fencing token, attempt number,
-- and the run marked running. Also returns the checkpoints of the run's earlier steps.
CREATE FUNCTION crm_sync.claim_steps(p_worker text, p_limit integer, p_lease_ms bigint)
RETURNS TABLE (
    step_id bigint, run_id uuid, pipeline text, step_name text, step_position integer, attempt integer,
    fence bigint, max_attempts integer, timeout_ms bigint, batch_id text, params jsonb, inputs jsonb
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
           END
      FROM claimed c JOIN crm_sync.runs r ON r.id = c.run_id
     ORDER BY c.id
$$;

-- Finishes a run (status failed or cancelled) and frees its concurrency slot.
CREATE FUNCTION crm_sync.finish_run(p_run uuid, p_status text, p_error text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_pipeline text;
BEGIN
    UPDATE crm_sync.runs SET status = p_status, finished_at = now(), error = p_error
     WHERE id = p_run AND status IN ('queued', 'running')
    RETURNING pipeline INTO v_pipeline;
    IF FOUND THEN
        PERFORM crm_sync.admit_runs(v_pipeline);
    END IF;
END;
$$;

-- Marks a batch of claimed steps succeeded, fenced by (step, token), storing each output and queueing
-- each run's next step in the same transaction, or finishing the run after its last step.
-- Returns the ids accepted; a step whose lease was lost is not among them and its output is discarded.
CREATE FUNCTION crm_sync.complete_steps(p_worker text, p_ids bigint[], p_fences bigint[], p_outputs jsonb[])
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
           SET status = 'succeeded', output = x.output, finished_at = now(),
               lease_owner = NULL, lease_expires_at = NULL, error = NULL
          FROM unnest(p_ids, p_fences, p_outputs) AS x(id, fence, output)
         WHERE s.id = x.id AND s.fence = x.fence AND s.status = 'running'
        RETURNING s.id, s.run_id, s.position, s.fence, s.pipeline, s.attempts, s.attempt_started_at
    ), logged AS (
        INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome)
        SELECT done.id, done.run_id, done.attempts, done.fence, p_worker, done.attempt_started_at, 'succeeded'
          FROM done
    ), next_steps AS (
        UPDATE crm_sync.steps n SET status = 'queued', run_at = now()
          FROM done WHERE n.run_id = done.run_id AND n.position = done.position + 1 AND n.status = 'pending'
        RETURNING n.id
    ), finished AS (
        UPDATE crm_sync.runs r SET status = 'succeeded', finished_at = now(), error = NULL
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

-- Records a failed attempt (fenced). Retryable failures with attempts left are re-queued at p_retry_at;
-- anything else fails the step and its run at once. Returns 'retry', 'failed', or 'discarded' (lease lost).
CREATE FUNCTION crm_sync.fail_step(
    p_worker text, p_id bigint, p_fence bigint, p_error text, p_retryable boolean, p_retry_at timestamptz
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    s crm_sync.steps%ROWTYPE;
    v_outcome text;
BEGIN
    SELECT * INTO s FROM crm_sync.steps WHERE id = p_id AND fence = p_fence AND status = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'discarded';
    END IF;
    v_outcome := CASE WHEN p_retryable AND s.attempts < s.max_attempts THEN 'retry' ELSE 'failed' END;

    INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error)
    VALUES (s.id, s.run_id, s.attempts, s.fence, p_worker, s.attempt_started_at, v_outcome, p_error);

    IF v_outcome = 'retry' THEN
        UPDATE crm_sync.steps
           SET status = 'queued', run_at = greatest(coalesce(p_retry_at, now()), now()), error = p_error,
               lease_owner = NULL, lease_expires_at = NULL
         WHERE id = p_id;
    ELSE
        UPDATE crm_sync.steps
           SET status = 'failed', finished_at = now(), error = p_error, lease_owner = NULL, lease_expires_at = NULL
         WHERE id = p_id;
        PERFORM crm_sync.finish_run(s.run_id, 'failed',
            format('step %s failed (attempt %s of %s, %s): %s', s.name, s.attempts, s.max_attempts,
                   CASE WHEN p_retryable THEN 'no attempts left' ELSE 'not retryable' END, p_error));
    END IF;
    RETURN v_outcome;
END;
$$;

-- Renews the leases of a worker's in-flight steps. Returns the ids still held: any other id was taken over,
-- cancelled or reaped, and the worker must abandon it.
CREATE FUNCTION crm_sync.heartbeat(p_worker text, p_ids bigint[], p_fences bigint[], p_lease_ms bigint)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE crm_sync.workers SET heartbeat_at = now() WHERE id = p_worker;
    UPDATE crm_sync.steps s SET lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
      FROM unnest(p_ids, p_fences) AS x(id, fence)
     WHERE s.id = x.id AND s.fence = x.fence AND s.status = 'running'
    RETURNING s.id;
$$;

-- Gives steps back to the queue without spending an attempt (graceful shutdown past its grace period).
CREATE FUNCTION crm_sync.release_steps(p_worker text, p_ids bigint[], p_fences bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    WITH released AS (
        UPDATE crm_sync.steps s
           SET status = 'queued', attempts = s.attempts - 1, run_at = now(), lease_owner = NULL, lease_expires_at = NULL
          FROM unnest(p_ids, p_fences) AS x(id, fence)
         WHERE s.id = x.id AND s.fence = x.fence AND s.status = 'running'
        RETURNING s.id, s.run_id, s.attempts, s.fence, s.attempt_started_at
    ), logged AS (
        INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error)
        SELECT r.id, r.run_id, r.attempts + 1, r.fence, p_worker, r.attempt_started_at, 'released',
               'released by worker ' || p_worker || ' at shutdown'
          FROM released r
    )
    SELECT count(*) INTO v_count FROM released;
    IF v_count > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN v_count;
END;
$$;

-- Re-queues steps whose lease expired (their worker died or hung), or fails them when no attempt is left.
CREATE FUNCTION crm_sync.reap_expired_leases() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s crm_sync.steps%ROWTYPE;
    v_count integer := 0;
    v_error text;
BEGIN
    FOR s IN SELECT * FROM crm_sync.steps
              WHERE status = 'running' AND lease_expires_at < now()
              ORDER BY lease_expires_at
              LIMIT 1000
              FOR UPDATE SKIP LOCKED
    LOOP
        v_error := format('lease expired: worker %s stopped renewing it', s.lease_owner);
        INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error)
        VALUES (s.id, s.run_id, s.attempts, s.fence, s.lease_owner, s.attempt_started_at, 'lost', v_error);
        IF s.attempts < s.max_attempts THEN
            UPDATE crm_sync.steps SET status = 'queued', run_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                   error = v_error
             WHERE id = s.id;
        ELSE
            UPDATE crm_sync.steps SET status = 'failed', finished_at = now(), lease_owner = NULL,
                   lease_expires_at = NULL, error = v_error
             WHERE id = s.id;
            PERFORM crm_sync.finish_run(s.run_id, 'failed',
                format('step %s failed (attempt %s of %s, no attempts left): %s', s.name, s.attempts,
                       s.max_attempts, v_error));
        END IF;
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN v_count;
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Operator actions.

CREATE FUNCTION crm_sync.cancel_run(p_run uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    r crm_sync.runs%ROWTYPE;
BEGIN
    IF p_run IS NULL THEN
        RAISE EXCEPTION 'crm_sync.cancel_run: run id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO r FROM crm_sync.runs WHERE id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'P0002';
    END IF;
    IF r.status NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION 'run % is already % and cannot be cancelled', p_run, r.status USING ERRCODE = '55000';
    END IF;
    INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error)
    SELECT s.id, s.run_id, s.attempts, s.fence, s.lease_owner, s.attempt_started_at, 'cancelled', 'run cancelled'
      FROM crm_sync.steps s
     WHERE s.run_id = p_run AND s.status = 'running';
    UPDATE crm_sync.steps SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
     WHERE run_id = p_run AND status IN ('pending', 'queued', 'running');
    PERFORM crm_sync.finish_run(p_run, 'cancelled', 'cancelled by an operator');
    PERFORM pg_notify('crm_sync_cancel', p_run::text);
    RETURN 'cancelled';
END;
$$;

-- Resumes a failed or cancelled run as a new run of the same batch: succeeded steps keep their checkpoints
-- (they are not run again), the failed step and the ones after it run with a fresh attempt budget.
CREATE FUNCTION crm_sync.retry_run(run_id uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    r        crm_sync.runs%ROWTYPE;
    p        crm_sync.pipelines%ROWTYPE;
    v_prev   uuid;
    v_new    uuid;
BEGIN
    IF retry_run.run_id IS NULL THEN
        RAISE EXCEPTION 'crm_sync.retry_run: run id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO r FROM crm_sync.runs WHERE id = retry_run.run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', retry_run.run_id USING ERRCODE = 'P0002';
    END IF;
    IF r.status NOT IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: only failed or cancelled runs can be retried', r.id, r.status
            USING ERRCODE = '55000';
    END IF;
    SELECT id INTO v_prev FROM crm_sync.runs WHERE retry_of = r.id;
    IF FOUND THEN
        RAISE EXCEPTION 'run % was already retried as run %; retry that one instead', r.id, v_prev
            USING ERRCODE = '55000';
    END IF;
    SELECT * INTO p FROM crm_sync.pipelines WHERE name = r.pipeline FOR NO KEY UPDATE;
    IF NOT p.enabled THEN
        RAISE EXCEPTION 'pipeline "%" is disabled (not in the current config)', r.pipeline USING ERRCODE = '55000';
    END IF;

    INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, params, retry_of)
    VALUES (r.pipeline, r.batch_id, 'retry', r.params, r.id)
    RETURNING id INTO v_new;

    INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, max_attempts, timeout_ms,
                                output, started_at, finished_at, reused_from_run)
    SELECT v_new, s.pipeline, s.name, s.position,
           CASE WHEN s.status = 'succeeded' THEN 'succeeded' ELSE 'pending' END,
           p.max_attempts, p.step_timeout_ms,
           CASE WHEN s.status = 'succeeded' THEN s.output END,
           CASE WHEN s.status = 'succeeded' THEN s.started_at END,
           CASE WHEN s.status = 'succeeded' THEN s.finished_at END,
           CASE WHEN s.status = 'succeeded' THEN coalesce(s.reused_from_run, r.id) END
      FROM crm_sync.steps s WHERE s.run_id = r.id;

    PERFORM crm_sync.admit_runs(r.pipeline);
    RETURN v_new;
END;
$$;

-- Runs a pipeline again from scratch as a fresh batch with the same parameters.
CREATE FUNCTION crm_sync.rerun_run(p_run uuid, p_trigger text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    r     crm_sync.runs%ROWTYPE;
    v_new uuid;
BEGIN
    SELECT * INTO r FROM crm_sync.runs WHERE id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'P0002';
    END IF;
    v_new := crm_sync.enqueue_run_as(r.pipeline, r.params, NULL, p_trigger, NULL);
    UPDATE crm_sync.runs SET rerun_of = r.id WHERE id = v_new;
    RETURN v_new;
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Health per pipeline, computed from the history (served at /health/pipelines, alerted on).
CREATE VIEW crm_sync.pipeline_health AS
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
                      ORDER BY created_at DESC LIMIT 1) lr ON true;
