-- Notifications: a run that fails, or succeeds right after a failure, is announced to webhooks.
--
-- The outbox lives here so that no announcement is lost: a trigger on crm_sync.runs writes the event and
-- one delivery per matching webhook in the same transaction that finished the run, and NOTIFYs the
-- notifiers. A notifier claims due deliveries (FOR UPDATE SKIP LOCKED, then a lease), POSTs them and
-- records the outcome fenced by the attempt number, so two notifiers never send one delivery at once.
-- Webhook URLs are secrets and are never stored: the config names them, the notifier resolves them.

-- Webhooks are registered from the config file by every crm-sync process at start, like pipelines.
CREATE TABLE crm_sync.webhooks (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    format         text NOT NULL CHECK (format IN ('slack', 'json')),
    events         text[] NOT NULL CHECK (events <@ ARRAY['run_failed', 'run_recovered']),
    -- NULL: every pipeline.
    pipelines      text[],
    max_attempts   integer NOT NULL CHECK (max_attempts >= 1),
    -- Bound on one POST; a claim's lease is this plus a margin.
    timeout_ms     bigint NOT NULL CHECK (timeout_ms > 0),
    enabled        boolean NOT NULL DEFAULT true,
    -- Deliveries are made by the trigger for events after this (while enabled): adding a webhook does not
    -- replay the history.
    registered_at  timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE crm_sync.notification_events (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('run_failed', 'run_recovered')),
    run_id      uuid NOT NULL REFERENCES crm_sync.runs (id) ON DELETE CASCADE,
    pipeline    text NOT NULL,
    batch_id    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_events_run ON crm_sync.notification_events (run_id);

CREATE TABLE crm_sync.notification_deliveries (
    id               bigserial PRIMARY KEY,
    event_id         bigint NOT NULL REFERENCES crm_sync.notification_events (id) ON DELETE CASCADE,
    webhook          text NOT NULL REFERENCES crm_sync.webhooks (name) ON DELETE CASCADE,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    -- Attempts started; the one in flight is counted (it is also the fencing token of its outcome).
    attempts         integer NOT NULL DEFAULT 0,
    -- When the next attempt may start; while an attempt is in flight, when its lease runs out.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- HTTP status of the last attempt (NULL: no answer) and the error of the last failed one. Never the
    -- URL: errors are scrubbed before they are stored.
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (event_id, webhook)
);
CREATE INDEX notification_deliveries_due ON crm_sync.notification_deliveries (next_attempt_at, id)
    WHERE state = 'pending';

-- The recovery check reads the pipeline's previous finished run.
CREATE INDEX runs_pipeline_finished ON crm_sync.runs (pipeline, finished_at DESC, id DESC)
    WHERE status IN ('failed', 'succeeded') AND finished_at IS NOT NULL;

-- Writes the event of a run that just failed or recovered (succeeded while the pipeline's previous
-- finished run had failed; cancelled runs do not count), and its deliveries, in the run's transaction.
CREATE FUNCTION crm_sync.record_run_event() RETURNS trigger
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
         ORDER BY r.finished_at DESC, r.id DESC
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

CREATE TRIGGER runs_record_event
    AFTER UPDATE OF status ON crm_sync.runs
    FOR EACH ROW
    WHEN (NEW.status IN ('failed', 'succeeded') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION crm_sync.record_run_event();

-- Claims up to p_limit due deliveries of the given webhooks (the ones this notifier has URLs for): each
-- attempt is counted and leased (the webhook's timeout plus p_margin_ms) before it is sent, so a notifier
-- that dies mid-send leaves it to another after the lease. Deliveries whose attempts ran out while their
-- notifier was gone are failed here. Returns what a payload needs.
CREATE FUNCTION crm_sync.claim_deliveries(p_webhooks text[], p_limit integer, p_margin_ms bigint)
RETURNS TABLE (
    delivery_id bigint, webhook text, attempt integer, max_attempts integer, event_id bigint, kind text,
    run_id uuid, pipeline text, batch_id text, run_status text, run_error text, failed_step text,
    run_attempts integer, finished_at timestamptz
)
LANGUAGE sql AS $$
    WITH exhausted AS (
        UPDATE crm_sync.notification_deliveries d
           SET state = 'failed',
               last_error = coalesce(d.last_error || '; ', '') || 'the notifier stopped during the last attempt'
          FROM crm_sync.webhooks w
         WHERE w.name = d.webhook AND d.webhook = ANY (p_webhooks)
           AND d.state = 'pending' AND d.next_attempt_at <= now() AND d.attempts >= w.max_attempts
    ), picked AS (
        SELECT d.id FROM crm_sync.notification_deliveries d
          JOIN crm_sync.webhooks w ON w.name = d.webhook
         WHERE d.state = 'pending' AND d.next_attempt_at <= now() AND d.webhook = ANY (p_webhooks)
           AND d.attempts < w.max_attempts
         ORDER BY d.next_attempt_at, d.id
         LIMIT p_limit
         FOR UPDATE OF d SKIP LOCKED
    ), claimed AS (
        UPDATE crm_sync.notification_deliveries d
           SET attempts = d.attempts + 1,
               next_attempt_at = now() + (w.timeout_ms + p_margin_ms) * interval '1 millisecond'
          FROM picked, crm_sync.webhooks w
         WHERE d.id = picked.id AND w.name = d.webhook
        RETURNING d.id, d.webhook, d.attempts, w.max_attempts, d.event_id
    )
    SELECT c.id, c.webhook, c.attempts, c.max_attempts, e.id, e.kind, e.run_id, e.pipeline, e.batch_id,
           r.status, r.error,
           (SELECT s.name FROM crm_sync.steps s WHERE s.run_id = r.id AND s.status = 'failed'
             ORDER BY s.position LIMIT 1),
           (SELECT coalesce(sum(s.attempts), 0)::integer FROM crm_sync.steps s WHERE s.run_id = r.id),
           r.finished_at
      FROM claimed c
      JOIN crm_sync.notification_events e ON e.id = c.event_id
      JOIN crm_sync.runs r ON r.id = e.run_id
     ORDER BY c.id
$$;

-- Records how a claimed attempt ended, fenced by its attempt number (a notifier whose lease ran out and
-- whose delivery was claimed again gets 'discarded'). A failure with attempts left is retried at
-- now() + p_retry_delay_ms (the database clock, as for claims); the last one fails the delivery.
-- Returns 'delivered', 'retry', 'failed' or 'discarded'.
CREATE FUNCTION crm_sync.record_delivery(
    p_id bigint, p_attempt integer, p_delivered boolean, p_status integer, p_error text, p_retry_delay_ms bigint
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_max  integer;
BEGIN
    SELECT w.max_attempts INTO v_max
      FROM crm_sync.notification_deliveries d JOIN crm_sync.webhooks w ON w.name = d.webhook
     WHERE d.id = p_id AND d.attempts = p_attempt AND d.state = 'pending'
       FOR UPDATE OF d;
    IF NOT FOUND THEN
        RETURN 'discarded';
    END IF;
    IF p_delivered THEN
        UPDATE crm_sync.notification_deliveries
           SET state = 'delivered', delivered_at = now(), last_status = p_status
         WHERE id = p_id;
        RETURN 'delivered';
    END IF;
    IF p_attempt >= v_max THEN
        UPDATE crm_sync.notification_deliveries
           SET state = 'failed', last_status = p_status, last_error = p_error
         WHERE id = p_id;
        RETURN 'failed';
    END IF;
    UPDATE crm_sync.notification_deliveries
       SET next_attempt_at = now() + greatest(p_retry_delay_ms, 0) * interval '1 millisecond',
           last_status = p_status, last_error = p_error
     WHERE id = p_id;
    RETURN 'retry';
END;
$$;
