-- The scheduler: each scheduled occurrence of a pipeline becomes exactly one run, however many
-- scheduler replicas are up. The unique index is the guarantee; schedule_state remembers how far each
-- pipeline's schedule has been looked at, so ticks missed while no scheduler ran can be caught up.

CREATE UNIQUE INDEX runs_scheduled_once ON crm_sync.runs (pipeline, scheduled_for) WHERE trigger = 'schedule';

CREATE TABLE crm_sync.schedule_state (
    pipeline    text PRIMARY KEY REFERENCES crm_sync.pipelines (name) ON DELETE CASCADE,
    -- The schedule (expression and zone) last_tick refers to; a changed schedule starts afresh.
    schedule    text NOT NULL,
    -- Every occurrence up to here has been handled (enqueued, or skipped by the catch-up policy).
    last_tick   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Enqueues the run of one scheduled occurrence, once: returns the new run's id, or NULL when another
-- scheduler replica already enqueued that occurrence.
CREATE FUNCTION crm_sync.enqueue_scheduled(p_pipeline text, p_scheduled_for timestamptz) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise replicas on the pipeline row, then look: the loser sees the winner's run.
    PERFORM 1 FROM crm_sync.pipelines WHERE name = p_pipeline FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM crm_sync.runs
                WHERE pipeline = p_pipeline AND scheduled_for = p_scheduled_for AND trigger = 'schedule') THEN
        RETURN NULL;
    END IF;
    RETURN crm_sync.enqueue_run_as(p_pipeline, '{}'::jsonb, NULL, 'schedule', p_scheduled_for);
EXCEPTION WHEN unique_violation THEN
    RETURN NULL;
END;
$$;
