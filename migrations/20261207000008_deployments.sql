-- Several processes, several configs, one database.
--
-- Real deployments run `serve` on one host, extra workers elsewhere, an operator's CLI on a laptop, and
-- old and new versions side by side during a rolling upgrade, each with its own config file. This
-- migration makes that safe:
--
-- 1. Registration never disables by omission. Each process registers the pipelines of its own config
--    (crm_sync.register_pipeline) with a fingerprint of their definition, and touches nothing else.
--    Which live process registered which definition is kept in crm_sync.pipeline_registrations, so two
--    live processes with different definitions of one pipeline are reported (pipeline_health's
--    `definitions`), not silently flipped: the registered definition stays the one a live process
--    holds, and passes to another live process's only when no live process holds it any more
--    (crm_sync.reconcile_registrations). `enabled` is derived: the registered config's `enabled` and no
--    operator's `crm-sync pipelines disable` (crm_sync.set_pipeline_enabled).
-- 2. A worker claims only what it can run: claim_steps takes the worker's pipelines (and their
--    fingerprints, recorded on every attempt: the lineage of the config). crm_sync.workers records the
--    pipelines and roles of every live process; a pipeline no live worker serves is `served = false`.
-- 3. Fencing tokens come from one sequence, so they only grow: a destination can compare the tokens of
--    different steps that write one table (the warehouse ledger, src/destinations/ledger.rs).
-- 4. A worker that dies is noticed at once: each process holds a session advisory lock on its own
--    direct connection (crm_sync.liveness_lock_class(), its lock_key); crm_sync.reap_dead_workers()
--    re-queues the steps of processes whose lock is gone without waiting for their lease.
--
-- The queue functions that write attempts are redefined here in full (with the fingerprint), so their
-- current bodies are in this file: claim_steps_unchecked, complete_steps_unchecked,
-- fail_step_unchecked, release_steps_unchecked, reap_expired_leases, cancel_run.

-- ---------------------------------------------------------------------------------------------------
-- Fencing tokens: every claim takes the next value, above every token handed out before.
CREATE SEQUENCE crm_sync.fence_tokens;
SELECT setval('crm_sync.fence_tokens', greatest(coalesce((SELECT max(fence) FROM crm_sync.steps), 0), 1));

-- ---------------------------------------------------------------------------------------------------
-- Processes. crm_sync.workers holds every long-running process (serve, worker, scheduler), whatever it
-- runs: `roles` says which parts, `pipelines` which pipelines its workers claim (NULL: a process of an
-- older release, which claims every pipeline).
ALTER TABLE crm_sync.workers
    ADD COLUMN roles       text[] NOT NULL DEFAULT '{worker}',
    ADD COLUMN pipelines   text[],
    ADD COLUMN version     text,
    ADD COLUMN config_path text,
    -- The key of the session advisory lock the process holds while it lives (NULL: none, e.g. when it
    -- reaches the database only through a transaction-mode pooler).
    ADD COLUMN lock_key    integer,
    ADD COLUMN stop_reason text;

CREATE SEQUENCE crm_sync.process_lock_keys AS integer;

-- The first key of every liveness lock: pg_advisory_lock(crm_sync.liveness_lock_class(), lock_key).
CREATE FUNCTION crm_sync.liveness_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1668445049 $$;

-- Processes alive now: not stopped, heartbeat within their own lease, and, when they hold a liveness
-- lock, still holding it (a killed process's session ends, and its lock with it, at once).
CREATE VIEW crm_sync.live_processes AS
WITH held AS MATERIALIZED (
    SELECT l.objid FROM pg_catalog.pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.classid = crm_sync.liveness_lock_class()::oid
       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
)
SELECT w.*
  FROM crm_sync.workers w
 WHERE w.stopped_at IS NULL
   AND w.heartbeat_at > now() - w.lease_ms * interval '1 millisecond'
   AND (w.lock_key IS NULL OR w.lock_key::oid IN (SELECT objid FROM held));

-- ---------------------------------------------------------------------------------------------------
-- Pipelines: the registered definition (its fingerprint, who wrote it) and why it is disabled.
ALTER TABLE crm_sync.pipelines
    ADD COLUMN schedule             text,
    ADD COLUMN timezone             text,
    ADD COLUMN fingerprint          text,
    ADD COLUMN registered_by        text,
    ADD COLUMN config_enabled       boolean,
    ADD COLUMN operator_disabled_at timestamptz,
    ADD COLUMN operator_disabled_by text;
UPDATE crm_sync.pipelines SET config_enabled = enabled;
ALTER TABLE crm_sync.pipelines
    ALTER COLUMN config_enabled SET NOT NULL,
    ALTER COLUMN config_enabled SET DEFAULT true;

-- `enabled` follows the registered config and the operator, whoever writes the row: processes of
-- releases before this one disabled every pipeline missing from their own config, and still try to.
CREATE FUNCTION crm_sync.derive_pipeline_enabled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.enabled := NEW.config_enabled AND NEW.operator_disabled_at IS NULL;
    RETURN NEW;
END;
$$;
CREATE TRIGGER pipelines_derive_enabled BEFORE INSERT OR UPDATE ON crm_sync.pipelines
    FOR EACH ROW EXECUTE FUNCTION crm_sync.derive_pipeline_enabled();

-- Webhooks likewise: enabled as their config says, never disabled by a config that lacks them.
ALTER TABLE crm_sync.webhooks ADD COLUMN config_enabled boolean;
UPDATE crm_sync.webhooks SET config_enabled = enabled;
ALTER TABLE crm_sync.webhooks
    ALTER COLUMN config_enabled SET NOT NULL,
    ALTER COLUMN config_enabled SET DEFAULT true;
CREATE FUNCTION crm_sync.derive_webhook_enabled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.enabled := NEW.config_enabled;
    RETURN NEW;
END;
$$;
CREATE TRIGGER webhooks_derive_enabled BEFORE INSERT OR UPDATE ON crm_sync.webhooks
    FOR EACH ROW EXECUTE FUNCTION crm_sync.derive_webhook_enabled();

-- Why a pipeline accepts no runs, for error messages.
CREATE FUNCTION crm_sync.disabled_reason(p crm_sync.pipelines) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p.operator_disabled_at IS NOT NULL THEN
            format('disabled by %s at %s (crm-sync pipelines enable %s)', coalesce(p.operator_disabled_by, 'an operator'),
                   to_char(p.operator_disabled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'), p.name)
        ELSE format('disabled by its config (enabled = false, registered by %s)', coalesce(p.registered_by, 'an older release'))
    END
$$;

-- What each live process's config says about each of its pipelines. Rows go with the process.
CREATE TABLE crm_sync.pipeline_registrations (
    pipeline            text NOT NULL REFERENCES crm_sync.pipelines (name) ON DELETE CASCADE,
    process_id          text NOT NULL REFERENCES crm_sync.workers (id) ON DELETE CASCADE,
    fingerprint         text NOT NULL,
    schedule            text,
    timezone            text,
    steps               text[] NOT NULL,
    max_attempts        integer NOT NULL,
    step_timeout_ms     bigint NOT NULL,
    max_concurrent_runs integer,
    freshness_sla_s     bigint,
    enabled             boolean NOT NULL,
    registered_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, process_id)
);
CREATE INDEX pipeline_registrations_process ON crm_sync.pipeline_registrations (process_id);

-- Makes a definition the registered one.
CREATE FUNCTION crm_sync.apply_definition(
    p_name text, p_by text, p_fingerprint text, p_schedule text, p_timezone text, p_steps text[],
    p_max_attempts integer, p_step_timeout_ms bigint, p_max_concurrent_runs integer, p_freshness_sla_s bigint,
    p_enabled boolean
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO crm_sync.pipelines AS p
           (name, schedule, timezone, steps, max_attempts, step_timeout_ms, max_concurrent_runs, freshness_sla_s,
            config_enabled, fingerprint, registered_by)
    VALUES (p_name, p_schedule, p_timezone, p_steps, p_max_attempts, p_step_timeout_ms, p_max_concurrent_runs,
            p_freshness_sla_s, p_enabled, p_fingerprint, p_by)
    ON CONFLICT (name) DO UPDATE
       SET schedule = EXCLUDED.schedule, timezone = EXCLUDED.timezone, steps = EXCLUDED.steps, max_attempts = EXCLUDED.max_attempts, step_timeout_ms = EXCLUDED.step_timeout_ms,
           max_concurrent_runs = EXCLUDED.max_concurrent_runs, freshness_sla_s = EXCLUDED.freshness_sla_s,
           config_enabled = EXCLUDED.config_enabled, fingerprint = EXCLUDED.fingerprint,
           registered_by = EXCLUDED.registered_by, updated_at = now();
$$;

-- Registers one pipeline of a process's config. A live process (p_live) is remembered with its
-- definition. Returns:
--   'registered'  the definition is now the registered one (new pipeline, or it replaced one no live
--                 process holds);
--   'unchanged'   it already was;
--   'kept'        another live process holds a different definition, which stays registered (the
--                 conflict is reported by pipeline_health until one of them stops).
CREATE FUNCTION crm_sync.register_pipeline(
    p_process text, p_live boolean, p_name text, p_fingerprint text, p_schedule text, p_timezone text,
    p_steps text[], p_max_attempts integer, p_step_timeout_ms bigint, p_max_concurrent_runs integer,
    p_freshness_sla_s bigint, p_enabled boolean
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    cur   crm_sync.pipelines%ROWTYPE;
    v_new boolean;
BEGIN
    PERFORM crm_sync.require(p_process IS NOT NULL AND p_name IS NOT NULL AND p_fingerprint IS NOT NULL,
        'register_pipeline', '22004', 'process, name and fingerprint must not be null');
    SELECT * INTO cur FROM crm_sync.pipelines WHERE name = p_name FOR NO KEY UPDATE;
    v_new := NOT FOUND;
    IF v_new THEN
        PERFORM crm_sync.apply_definition(p_name, p_process, p_fingerprint, p_schedule, p_timezone, p_steps,
            p_max_attempts, p_step_timeout_ms, p_max_concurrent_runs, p_freshness_sla_s, p_enabled);
    END IF;
    IF p_live THEN
        INSERT INTO crm_sync.pipeline_registrations AS r
               (pipeline, process_id, fingerprint, schedule, timezone, steps, max_attempts, step_timeout_ms,
                max_concurrent_runs, freshness_sla_s, enabled)
        VALUES (p_name, p_process, p_fingerprint, p_schedule, p_timezone, p_steps, p_max_attempts, p_step_timeout_ms,
                p_max_concurrent_runs, p_freshness_sla_s, p_enabled)
        ON CONFLICT (pipeline, process_id) DO UPDATE
           SET fingerprint = EXCLUDED.fingerprint, schedule = EXCLUDED.schedule, timezone = EXCLUDED.timezone,
               steps = EXCLUDED.steps, max_attempts = EXCLUDED.max_attempts,
               step_timeout_ms = EXCLUDED.step_timeout_ms, max_concurrent_runs = EXCLUDED.max_concurrent_runs,
               freshness_sla_s = EXCLUDED.freshness_sla_s, enabled = EXCLUDED.enabled, registered_at = now();
    END IF;
    IF v_new THEN
        RETURN 'registered';
    END IF;
    IF cur.fingerprint IS NOT DISTINCT FROM p_fingerprint THEN
        RETURN 'unchanged';
    END IF;
    IF EXISTS (SELECT 1 FROM crm_sync.pipeline_registrations r JOIN crm_sync.live_processes w ON w.id = r.process_id
                WHERE r.pipeline = p_name AND r.fingerprint = cur.fingerprint AND r.process_id <> p_process) THEN
        RETURN 'kept';
    END IF;
    PERFORM crm_sync.apply_definition(p_name, p_process, p_fingerprint, p_schedule, p_timezone, p_steps,
        p_max_attempts, p_step_timeout_ms, p_max_concurrent_runs, p_freshness_sla_s, p_enabled);
    RETURN 'registered';
END;
$$;

-- Pipelines whose registered definition no live process holds any more, while a live process holds
-- another: that one (the most recently registered) becomes the registered definition. Live processes
-- call this with their heartbeat, so a rolling upgrade's new definition takes over once the last
-- process of the old one stops. Returns the pipelines changed.
CREATE FUNCTION crm_sync.reconcile_registrations() RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r crm_sync.pipeline_registrations%ROWTYPE;
BEGIN
    FOR r IN
        WITH live AS MATERIALIZED (
            SELECT g.* FROM crm_sync.pipeline_registrations g JOIN crm_sync.live_processes w ON w.id = g.process_id
        )
        SELECT DISTINCT ON (l.pipeline) l.*
          FROM live l JOIN crm_sync.pipelines p ON p.name = l.pipeline
         WHERE l.fingerprint IS DISTINCT FROM p.fingerprint
           AND NOT EXISTS (SELECT 1 FROM live h WHERE h.pipeline = l.pipeline AND h.fingerprint = p.fingerprint)
         ORDER BY l.pipeline, l.registered_at DESC, l.process_id
    LOOP
        PERFORM 1 FROM crm_sync.pipelines WHERE name = r.pipeline FOR NO KEY UPDATE;
        PERFORM crm_sync.apply_definition(r.pipeline, r.process_id, r.fingerprint, r.schedule, r.timezone, r.steps,
            r.max_attempts, r.step_timeout_ms, r.max_concurrent_runs, r.freshness_sla_s, r.enabled);
        RETURN NEXT r.pipeline;
    END LOOP;
END;
$$;

-- An operator's `crm-sync pipelines disable|enable NAME` (CLI, API, console). Returns the row.
CREATE FUNCTION crm_sync.set_pipeline_enabled(p_name text, p_enabled boolean, p_by text)
RETURNS crm_sync.pipelines
LANGUAGE plpgsql AS $$
DECLARE
    p crm_sync.pipelines%ROWTYPE;
BEGIN
    PERFORM crm_sync.require(p_enabled IS NOT NULL, 'set_pipeline_enabled', '22004', 'enabled must not be null');
    UPDATE crm_sync.pipelines
       SET operator_disabled_at = CASE WHEN p_enabled THEN NULL ELSE coalesce(operator_disabled_at, now()) END,
           operator_disabled_by = CASE WHEN p_enabled THEN NULL ELSE coalesce(operator_disabled_by, p_by) END,
           updated_at = now()
     WHERE name = p_name
    RETURNING * INTO p;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown pipeline "%"', left(coalesce(p_name, ''), 64) USING ERRCODE = 'P0002',
            HINT = 'known pipelines: ' || coalesce(
                (SELECT string_agg(name, ', ' ORDER BY name) FROM crm_sync.pipelines WHERE left(name, 2) <> '__'), 'none');
    END IF;
    IF p_enabled AND NOT p.enabled THEN
        RAISE EXCEPTION 'pipeline "%" stays %', p_name, crm_sync.disabled_reason(p) USING ERRCODE = '55000';
    END IF;
    RETURN p;
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Lineage of the config: the fingerprint of the definition each attempt ran under.
ALTER TABLE crm_sync.steps ADD COLUMN fingerprint text;
ALTER TABLE crm_sync.attempts ADD COLUMN fingerprint text;

-- The output a step worked out before it started an external job whose effect it cannot read back
-- (a BigQuery MERGE: the counts are computed before it runs): a later attempt that finds the job
-- done completes with this output instead of running the job again.
CREATE TABLE crm_sync.job_outputs (
    job_id      text PRIMARY KEY,
    step_id     bigint NOT NULL REFERENCES crm_sync.steps (id) ON DELETE CASCADE,
    output      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_outputs_step ON crm_sync.job_outputs (step_id);

-- ---------------------------------------------------------------------------------------------------
-- Claims: only the worker's pipelines (NULL: any, as workers of older releases claim).
DROP FUNCTION crm_sync.claim_steps(text, integer, bigint);
DROP FUNCTION crm_sync.claim_steps_unchecked(text, integer, bigint);

CREATE FUNCTION crm_sync.claim_steps_unchecked(
    p_worker text, p_limit integer, p_lease_ms bigint, p_pipelines text[], p_fingerprints text[]
)
RETURNS TABLE (
    step_id bigint, run_id uuid, pipeline text, step_name text, step_position integer, attempt integer,
    fence bigint, max_attempts integer, timeout_ms bigint, batch_id text, params jsonb, inputs jsonb,
    trigger text
)
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT s.id FROM crm_sync.steps s
         WHERE s.status = 'queued' AND s.run_at <= now()
           AND (p_pipelines IS NULL OR s.pipeline = ANY (p_pipelines))
         ORDER BY s.run_at, s.id
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE crm_sync.steps s
           SET status = 'running', attempts = s.attempts + 1, fence = nextval('crm_sync.fence_tokens'),
               lease_owner = p_worker, lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
               attempt_started_at = now(), started_at = coalesce(s.started_at, now()), error = NULL,
               fingerprint = p_fingerprints[array_position(p_pipelines, s.pipeline)]
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

CREATE FUNCTION crm_sync.claim_steps(
    p_worker text, p_limit integer, p_lease_ms bigint, p_pipelines text[], p_fingerprints text[] DEFAULT NULL
)
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
    PERFORM crm_sync.require(p_pipelines IS NULL OR array_position(p_pipelines, NULL) IS NULL, 'claim_steps',
        '22004', 'pipelines must not contain nulls');
    PERFORM crm_sync.require(p_fingerprints IS NULL OR cardinality(p_fingerprints) = cardinality(p_pipelines),
        'claim_steps', '22023', format('fingerprints must have one element per pipeline, got %s pipelines and %s fingerprints',
            cardinality(p_pipelines), cardinality(p_fingerprints)));
    RETURN QUERY SELECT * FROM crm_sync.claim_steps_unchecked(p_worker, p_limit, p_lease_ms, p_pipelines, p_fingerprints);
END;
$$;

-- The three-argument form workers of older releases call: every pipeline.
CREATE FUNCTION crm_sync.claim_steps(p_worker text, p_limit integer, p_lease_ms bigint)
RETURNS TABLE (
    step_id bigint, run_id uuid, pipeline text, step_name text, step_position integer, attempt integer,
    fence bigint, max_attempts integer, timeout_ms bigint, batch_id text, params jsonb, inputs jsonb,
    trigger text
)
LANGUAGE sql AS $$
    SELECT * FROM crm_sync.claim_steps(p_worker, p_limit, p_lease_ms, NULL::text[], NULL::text[])
$$;

-- ---------------------------------------------------------------------------------------------------
-- Completion (fenced), with each run's next step queued or the run finished in the same transaction.
CREATE OR REPLACE FUNCTION crm_sync.complete_steps_unchecked(
    p_worker text, p_ids bigint[], p_fences bigint[], p_outputs jsonb[]
) RETURNS SETOF bigint
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
        RETURNING s.id, s.run_id, s.position, s.fence, s.pipeline, s.attempts, s.attempt_started_at, s.fingerprint
    ), logged AS (
        INSERT INTO crm_sync.attempts
               (step_id, run_id, attempt, fence, worker_id, started_at, finished_at, outcome, fingerprint)
        SELECT done.id, done.run_id, done.attempts, done.fence, p_worker, done.attempt_started_at, clock_timestamp(),
               'succeeded', done.fingerprint
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

-- A failed attempt (fenced): re-queued at p_retry_at while retryable with attempts left, else the step
-- and its run fail. Returns 'retry', 'failed', or 'discarded' (the lease was lost).
CREATE OR REPLACE FUNCTION crm_sync.fail_step_unchecked(
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

    INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error, fingerprint)
    VALUES (s.id, s.run_id, s.attempts, s.fence, p_worker, s.attempt_started_at, v_outcome, p_error, s.fingerprint);

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

-- Gives steps back to the queue without spending an attempt (graceful shutdown past its grace period).
CREATE OR REPLACE FUNCTION crm_sync.release_steps_unchecked(p_worker text, p_ids bigint[], p_fences bigint[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    WITH released AS (
        UPDATE crm_sync.steps s
           SET status = 'queued', attempts = s.attempts - 1, run_at = now(), lease_owner = NULL, lease_expires_at = NULL
          FROM unnest(p_ids, p_fences) AS x(id, fence)
         WHERE s.id = x.id AND s.fence = x.fence AND s.status = 'running'
        RETURNING s.id, s.run_id, s.attempts, s.fence, s.attempt_started_at, s.fingerprint
    ), logged AS (
        INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error, fingerprint)
        SELECT r.id, r.run_id, r.attempts + 1, r.fence, p_worker, r.attempt_started_at, 'released',
               'released by worker ' || p_worker || ' at shutdown', r.fingerprint
          FROM released r
    )
    SELECT count(*) INTO v_count FROM released;
    IF v_count > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN v_count;
END;
$$;

-- A running step whose worker is gone: logged as a lost attempt, then re-queued, or failed when no
-- attempt is left. The caller holds the step's row lock.
CREATE FUNCTION crm_sync.lose_step(s crm_sync.steps, p_why text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error, fingerprint)
    VALUES (s.id, s.run_id, s.attempts, s.fence, s.lease_owner, s.attempt_started_at, 'lost', p_why, s.fingerprint);
    IF s.attempts < s.max_attempts THEN
        UPDATE crm_sync.steps SET status = 'queued', run_at = now(), lease_owner = NULL, lease_expires_at = NULL,
               error = p_why
         WHERE id = s.id;
    ELSE
        UPDATE crm_sync.steps SET status = 'failed', finished_at = now(), lease_owner = NULL,
               lease_expires_at = NULL, error = p_why
         WHERE id = s.id;
        PERFORM crm_sync.finish_run(s.run_id, 'failed',
            format('step %s failed (attempt %s of %s, no attempts left): %s', s.name, s.attempts,
                   s.max_attempts, p_why));
    END IF;
END;
$$;

-- Re-queues (or fails) steps whose lease expired: their worker died or hung.
CREATE OR REPLACE FUNCTION crm_sync.reap_expired_leases() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s crm_sync.steps%ROWTYPE;
    v_count integer := 0;
BEGIN
    FOR s IN SELECT * FROM crm_sync.steps
              WHERE status = 'running' AND lease_expires_at < now()
              ORDER BY lease_expires_at
              LIMIT 1000
              FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM crm_sync.lose_step(s, format('lease expired: worker %s stopped renewing it', s.lease_owner));
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN v_count;
END;
$$;

-- Processes whose liveness lock is gone (killed, crashed, cut off) are marked stopped, and their running
-- steps re-queued at once instead of after their lease. Returns how many steps were re-queued.
CREATE FUNCTION crm_sync.reap_dead_workers() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s crm_sync.steps%ROWTYPE;
    v_dead text[];
    v_count integer := 0;
BEGIN
    WITH held AS MATERIALIZED (
        SELECT l.objid FROM pg_catalog.pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.classid = crm_sync.liveness_lock_class()::oid
           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
    ), dead AS (
        UPDATE crm_sync.workers w
           SET stopped_at = now(), stop_reason = 'its database session ended (the process died or lost its connection)'
         WHERE w.stopped_at IS NULL AND w.lock_key IS NOT NULL AND w.lock_key::oid NOT IN (SELECT objid FROM held)
        RETURNING w.id
    )
    SELECT array_agg(id) INTO v_dead FROM dead;
    IF v_dead IS NULL THEN
        RETURN 0;
    END IF;
    FOR s IN SELECT * FROM crm_sync.steps
              WHERE status = 'running' AND lease_owner = ANY (v_dead)
              FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM crm_sync.lose_step(s, format('worker %s died (its database session ended); re-queued without waiting for its lease',
                                             s.lease_owner));
        v_count := v_count + 1;
    END LOOP;
    DELETE FROM crm_sync.pipeline_registrations WHERE process_id = ANY (v_dead);
    IF v_count > 0 THEN
        PERFORM pg_notify('crm_sync_steps', '');
    END IF;
    RETURN v_count;
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Operator actions and enqueueing, with the reason a pipeline is disabled.
CREATE OR REPLACE FUNCTION crm_sync.cancel_run(p_run uuid) RETURNS text
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
    INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, outcome, error, fingerprint)
    SELECT s.id, s.run_id, s.attempts, s.fence, s.lease_owner, s.attempt_started_at, 'cancelled', 'run cancelled',
           s.fingerprint
      FROM crm_sync.steps s
     WHERE s.run_id = p_run AND s.status = 'running';
    UPDATE crm_sync.steps SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
     WHERE run_id = p_run AND status IN ('pending', 'queued', 'running');
    PERFORM crm_sync.finish_run(p_run, 'cancelled', 'cancelled by an operator');
    PERFORM pg_notify('crm_sync_cancel', p_run::text);
    RETURN 'cancelled';
END;
$$;

CREATE OR REPLACE FUNCTION crm_sync.enqueue_run_as_unchecked(
    p_pipeline text, p_params jsonb, p_idempotency_key text, p_trigger text, p_scheduled_for timestamptz
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    p        crm_sync.pipelines%ROWTYPE;
    v_run    uuid;
    v_prev   crm_sync.runs%ROWTYPE;
BEGIN
    p_params := coalesce(p_params, '{}'::jsonb);
    SELECT * INTO p FROM crm_sync.pipelines WHERE name = p_pipeline FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown pipeline "%"', p_pipeline
            USING ERRCODE = 'P0002',
                  HINT = 'known pipelines: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM crm_sync.pipelines
                        WHERE enabled AND left(name, 2) <> '__'), 'none');
    END IF;
    IF NOT p.enabled THEN
        RAISE EXCEPTION 'pipeline "%" is %', p_pipeline, crm_sync.disabled_reason(p) USING ERRCODE = '55000';
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

CREATE OR REPLACE FUNCTION crm_sync.retry_run(run_id uuid) RETURNS uuid
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
        RAISE EXCEPTION 'pipeline "%" is %', r.pipeline, crm_sync.disabled_reason(p) USING ERRCODE = '55000';
    END IF;

    INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, params, retry_of)
    VALUES (r.pipeline, r.batch_id, 'retry', r.params, r.id)
    RETURNING id INTO v_new;

    INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, max_attempts, timeout_ms,
                                output, started_at, finished_at, reused_from_run, fingerprint)
    SELECT v_new, s.pipeline, s.name, s.position,
           CASE WHEN s.status = 'succeeded' THEN 'succeeded' ELSE 'pending' END,
           p.max_attempts, p.step_timeout_ms,
           CASE WHEN s.status = 'succeeded' THEN s.output END,
           CASE WHEN s.status = 'succeeded' THEN s.started_at END,
           CASE WHEN s.status = 'succeeded' THEN s.finished_at END,
           CASE WHEN s.status = 'succeeded' THEN coalesce(s.reused_from_run, r.id) END,
           CASE WHEN s.status = 'succeeded' THEN s.fingerprint END
      FROM crm_sync.steps s WHERE s.run_id = r.id;

    PERFORM crm_sync.admit_runs(r.pipeline);
    RETURN v_new;
END;
$$;

-- A scheduled tick of a disabled pipeline is not run (and not caught up later): NULL, as for a tick
-- another replica enqueued.
CREATE OR REPLACE FUNCTION crm_sync.enqueue_scheduled(p_pipeline text, p_scheduled_for timestamptz) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise replicas on the pipeline row, then look: the loser sees the winner's run.
    PERFORM 1 FROM crm_sync.pipelines WHERE name = p_pipeline AND enabled FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM crm_sync.runs
                WHERE pipeline = p_pipeline AND scheduled_for = p_scheduled_for AND trigger = 'schedule') THEN
        RETURN NULL;
    END IF;
    RETURN crm_sync.enqueue_run_as(p_pipeline, '{}'::jsonb, NULL, 'schedule', p_scheduled_for);
EXCEPTION WHEN unique_violation THEN
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------------
-- Health and metrics.
CREATE OR REPLACE FUNCTION crm_sync.queue_metrics(
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
        (SELECT count(*) FROM crm_sync.live_processes WHERE 'worker' = ANY (roles));
$$;

-- pipeline_health as before, and (new columns at the end):
--   fingerprint, registered_by   the registered definition and the process that wrote it;
--   definitions                  distinct definitions live processes registered (> 1: a conflict);
--   served                       some live worker claims this pipeline's steps;
--   unserved_steps               queued steps waiting while no live worker serves the pipeline;
--   disabled_by                  'config', 'operator' or NULL.
CREATE OR REPLACE VIEW crm_sync.pipeline_health AS
WITH live AS MATERIALIZED (SELECT id, roles, pipelines FROM crm_sync.live_processes)
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
       (SELECT count(*) FROM crm_sync.runs q WHERE q.pipeline = p.name AND q.status = 'running') AS running_runs,
       p.fingerprint,
       p.registered_by,
       (SELECT count(DISTINCT g.fingerprint) FROM crm_sync.pipeline_registrations g
          JOIN live ON live.id = g.process_id WHERE g.pipeline = p.name) AS definitions,
       sv.served,
       CASE WHEN sv.served THEN 0 ELSE
           (SELECT count(*) FROM crm_sync.steps u WHERE u.pipeline = p.name AND u.status = 'queued') END AS unserved_steps,
       CASE WHEN p.operator_disabled_at IS NOT NULL THEN 'operator' WHEN NOT p.config_enabled THEN 'config' END AS disabled_by
  FROM crm_sync.pipelines p
  CROSS JOIN LATERAL (SELECT EXISTS (SELECT 1 FROM live
                                      WHERE 'worker' = ANY (live.roles)
                                        AND (live.pipelines IS NULL OR p.name = ANY (live.pipelines))) AS served) sv
  LEFT JOIN LATERAL (SELECT batch_id, finished_at FROM crm_sync.runs s
                      WHERE s.pipeline = p.name AND s.status = 'succeeded'
                      ORDER BY finished_at DESC LIMIT 1) ls ON true
  LEFT JOIN LATERAL (SELECT id, status, finished_at, error FROM crm_sync.runs s
                      WHERE s.pipeline = p.name
                      ORDER BY created_at DESC NULLS LAST LIMIT 1) lr ON true;
