//! The run history's invariants as one SQL query. Fault and load tests run it at the end: whatever
//! was killed or restarted on the way, the history in `crm_sync` must still tell one consistent story.
//! Each row of [`VIOLATIONS`] is a broken invariant; an empty answer means the history holds.

use crm_sync::db::Db;

/// (invariant, offending row) for every violation.
pub const VIOLATIONS: &str = r#"
WITH step_log AS (
    SELECT s.id, s.run_id, s.status, s.attempts, s.max_attempts, s.fence, s.reused_from_run,
           count(a.id) FILTER (WHERE a.outcome <> 'released') AS spent,
           count(a.id) FILTER (WHERE a.outcome = 'succeeded') AS successes,
           coalesce(max(a.fence), 0) AS max_logged_fence
      FROM crm_sync.steps s LEFT JOIN crm_sync.attempts a ON a.step_id = s.id
     GROUP BY s.id
)
SELECT 'a succeeded run has a step that did not succeed', r.id || ' ' || s.name || '=' || s.status
  FROM crm_sync.runs r JOIN crm_sync.steps s ON s.run_id = r.id
 WHERE r.status = 'succeeded' AND s.status <> 'succeeded'
UNION ALL
SELECT 'finished_at is set exactly when the run finished', r.id || ' ' || r.status
  FROM crm_sync.runs r
 WHERE (r.status IN ('succeeded', 'failed', 'cancelled')) <> (r.finished_at IS NOT NULL)
UNION ALL
SELECT 'a run that ran has started_at', r.id || ' ' || r.status
  FROM crm_sync.runs r
 WHERE r.status IN ('running', 'succeeded') AND r.started_at IS NULL
UNION ALL
SELECT 'run times in order (created <= started <= finished)', r.id::text
  FROM crm_sync.runs r
 WHERE r.started_at < r.created_at OR r.finished_at < r.started_at
UNION ALL
SELECT 'step times in order (started <= finished)', s.id::text
  FROM crm_sync.steps s
 WHERE s.finished_at < s.started_at
UNION ALL
SELECT 'attempt times in order (started <= finished)', a.id::text
  FROM crm_sync.attempts a
 WHERE a.finished_at < a.started_at
UNION ALL
SELECT 'a step holds a lease exactly while it is running', s.id || ' ' || s.status
  FROM crm_sync.steps s
 WHERE (s.status = 'running') <> (s.lease_owner IS NOT NULL AND s.lease_expires_at IS NOT NULL)
UNION ALL
SELECT 'steps.attempts counts the attempts logged (plus the one running)',
       l.id || ': ' || l.attempts || ' vs ' || l.spent
  FROM step_log l
 WHERE l.attempts <> l.spent + CASE WHEN l.status = 'running' THEN 1 ELSE 0 END
UNION ALL
SELECT 'a step never spends more than max_attempts', l.id || ': ' || l.spent
  FROM step_log l
 WHERE l.spent > l.max_attempts
UNION ALL
SELECT 'exactly one succeeded attempt per succeeded step, none for others',
       l.id || ' ' || l.status || ': ' || l.successes
  FROM step_log l
 WHERE l.successes <> CASE WHEN l.status = 'succeeded' AND l.reused_from_run IS NULL THEN 1 ELSE 0 END
UNION ALL
SELECT 'attempts are fenced by tokens the step handed out', l.id || ': ' || l.max_logged_fence || ' > ' || l.fence
  FROM step_log l
 WHERE l.max_logged_fence > l.fence
UNION ALL
SELECT 'an attempt belongs to its step''s run', a.id::text
  FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
 WHERE a.run_id <> s.run_id
UNION ALL
SELECT 'a succeeded step has its checkpoint', s.id::text
  FROM crm_sync.steps s
 WHERE s.status = 'succeeded' AND s.output IS NULL
UNION ALL
SELECT 'a step starts only after the step before it succeeded', later.id::text
  FROM crm_sync.steps later JOIN crm_sync.steps earlier
    ON earlier.run_id = later.run_id AND earlier.position = later.position - 1
 WHERE earlier.status <> 'succeeded' AND later.status IN ('queued', 'running', 'succeeded')
UNION ALL
SELECT 'a failed run says why', r.id::text
  FROM crm_sync.runs r
 WHERE r.status = 'failed' AND coalesce(r.error, '') = ''
UNION ALL
SELECT 'one run per scheduled tick', r.pipeline || ' ' || r.scheduled_for
  FROM crm_sync.runs r
 WHERE r.trigger = 'schedule'
 GROUP BY r.pipeline, r.scheduled_for
HAVING count(*) > 1
"#;

/// Panics with every violated invariant.
pub async fn assert_history_consistent(pool: &Db) {
    let violations: Vec<(String, String)> = sqlx::query_as(VIOLATIONS)
        .fetch_all(pool)
        .await
        .expect("the consistency query runs");
    assert!(
        violations.is_empty(),
        "the run history is inconsistent ({} violations, first 20): {:#?}",
        violations.len(),
        &violations[..violations.len().min(20)]
    );
}
