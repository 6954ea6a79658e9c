//! The scheduler against real PostgreSQL: DST days and catch-up with an injected clock, and several
//! real scheduler processes sharing one database.

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use common::{TestDb, spawn_binary, write_config};
use crm_sync::scheduler::Scheduler;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

async fn scheduled_runs(db: &TestDb, pipeline: &str) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT scheduled_for FROM crm_sync.runs WHERE pipeline = $1 AND trigger = 'schedule' ORDER BY scheduled_for",
    )
    .bind(pipeline)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Passes every `step` from `from` to `to`, as a scheduler that never stopped would make.
async fn sweep(
    scheduler: &Scheduler,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: chrono::Duration,
) {
    let mut now = from;
    while now <= to {
        scheduler.tick(now).await.unwrap();
        now += step;
    }
}

#[tokio::test]
async fn dst_gap_and_fold_in_toronto_run_once_each_day() {
    let db = TestDb::new().await;
    let config = db
        .config(
            r#"
[[pipelines]]
name = "gap"
schedule = "30 2 * * *"
timezone = "America/Toronto"
max_concurrent_runs = 0
source = { kind = "noop" }

[[pipelines]]
name = "fold"
schedule = "30 1 * * *"
timezone = "America/Toronto"
max_concurrent_runs = 0
source = { kind = "noop" }
"#,
        )
        .await;
    let scheduler = Scheduler::new(db.pool.clone(), &config).unwrap();
    let step = chrono::Duration::minutes(7);
    // Spring forward: 2026-03-08, 02:00 EST jumps to 03:00 EDT; 02:30 does not exist that day.
    sweep(
        &scheduler,
        utc(2026, 3, 6, 12, 0, 0),
        utc(2026, 3, 10, 12, 0, 0),
        step,
    )
    .await;
    // Fall back: 2026-11-01, 02:00 EDT returns to 01:00 EST; 01:30 happens twice.
    sweep(
        &scheduler,
        utc(2026, 10, 30, 12, 0, 0),
        utc(2026, 11, 3, 12, 0, 0),
        step,
    )
    .await;

    let gap = scheduled_runs(&db, "gap").await;
    let expected_gap = vec![
        utc(2026, 3, 7, 7, 30, 0),   // 02:30 EST
        utc(2026, 3, 8, 7, 0, 0),    // the first instant after the gap: 03:00 EDT
        utc(2026, 3, 9, 6, 30, 0),   // 02:30 EDT
        utc(2026, 3, 10, 6, 30, 0),  // 02:30 EDT
        utc(2026, 10, 30, 6, 30, 0), // caught up (policy "latest") when the second sweep starts
        utc(2026, 10, 31, 6, 30, 0),
        utc(2026, 11, 1, 7, 30, 0), // 02:30 EST, after the fold
        utc(2026, 11, 2, 7, 30, 0),
        utc(2026, 11, 3, 7, 30, 0),
    ];
    assert_eq!(gap, expected_gap);

    let fold = scheduled_runs(&db, "fold").await;
    let expected_fold = vec![
        utc(2026, 3, 7, 6, 30, 0),
        utc(2026, 3, 8, 6, 30, 0), // 01:30 EST, before the gap
        utc(2026, 3, 9, 5, 30, 0),
        utc(2026, 3, 10, 5, 30, 0),
        utc(2026, 10, 30, 5, 30, 0), // caught up (policy "latest") when the second sweep starts
        utc(2026, 10, 31, 5, 30, 0),
        utc(2026, 11, 1, 5, 30, 0), // 01:30 EDT, the first of the two; 01:30 EST does not run
        utc(2026, 11, 2, 6, 30, 0),
        utc(2026, 11, 3, 6, 30, 0),
    ];
    assert_eq!(fold, expected_fold);
}

#[tokio::test]
async fn missed_ticks_follow_the_catch_up_policy() {
    let db = TestDb::new().await;
    let pipelines = ["skip", "latest", "all"]
        .map(|policy| {
            format!(
                "[[pipelines]]\nname = \"hourly_{policy}\"\nschedule = \"0 * * * *\"\ncatch_up = \"{policy}\"\nmax_concurrent_runs = 0\nsource = {{ kind = \"noop\" }}\n"
            )
        })
        .join("\n");
    let config = db
        .config(&format!(
            "{pipelines}\n[[pipelines]]\nname = \"hourly_disabled\"\nschedule = \"0 * * * *\"\nenabled = false\nsource = {{ kind = \"noop\" }}\n\n[[pipelines]]\nname = \"manual\"\nsource = {{ kind = \"noop\" }}\n"
        ))
        .await;
    let scheduler = Scheduler::new(db.pool.clone(), &config).unwrap();

    // Up at 09:59, runs the 10:00 tick on time, then is down for the 11:00, 12:00 and 13:00 ticks.
    scheduler.tick(utc(2026, 11, 24, 9, 59, 0)).await.unwrap();
    let on_time = scheduler.tick(utc(2026, 11, 24, 10, 0, 1)).await.unwrap();
    assert_eq!(on_time.enqueued.len(), 3, "{on_time:?}");
    let back = scheduler.tick(utc(2026, 11, 24, 13, 5, 0)).await.unwrap();
    assert_eq!(
        back.skipped.iter().filter(|s| s.0 == "hourly_skip").count(),
        3
    );

    let ten = utc(2026, 11, 24, 10, 0, 0);
    assert_eq!(scheduled_runs(&db, "hourly_skip").await, vec![ten]);
    assert_eq!(
        scheduled_runs(&db, "hourly_latest").await,
        vec![ten, utc(2026, 11, 24, 13, 0, 0)]
    );
    assert_eq!(
        scheduled_runs(&db, "hourly_all").await,
        vec![
            ten,
            utc(2026, 11, 24, 11, 0, 0),
            utc(2026, 11, 24, 12, 0, 0),
            utc(2026, 11, 24, 13, 0, 0)
        ]
    );
    assert!(
        scheduled_runs(&db, "hourly_disabled").await.is_empty(),
        "a disabled pipeline was scheduled"
    );
    let manual: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs WHERE pipeline = 'manual'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(manual, 0);

    // A second pass over the same instant, as another replica would make, adds nothing.
    let again = scheduler.tick(utc(2026, 11, 24, 13, 5, 0)).await.unwrap();
    assert!(again.enqueued.is_empty(), "{again:?}");
}

#[tokio::test]
async fn three_scheduler_processes_enqueue_each_tick_exactly_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &db,
        r#"
[server]
listen = "127.0.0.1:0"

[worker]
concurrency = 4
poll_interval = "200ms"

[[pipelines]]
name = "every_second"
schedule = "* * * * * *"
max_concurrent_runs = 0
source = { kind = "noop" }
"#,
    );
    // Two lone schedulers and one `serve` (scheduler beside workers), all on one database.
    let mut processes = vec![
        spawn_binary(&config, &["scheduler"], &dir.path().join("s1.log")),
        spawn_binary(&config, &["scheduler"], &dir.path().join("s2.log")),
        spawn_binary(&config, &["serve"], &dir.path().join("serve.log")),
    ];
    common::wait_until(
        &db.pool,
        "SELECT count(DISTINCT scheduled_for) >= 55 FROM crm_sync.runs WHERE trigger = 'schedule'",
        Duration::from_secs(120),
    )
    .await;
    for p in &processes {
        kill(Pid::from_raw(p.id() as i32), Signal::SIGTERM).unwrap();
    }
    for p in &mut processes {
        assert!(p.wait().unwrap().success());
    }

    let ticks: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT scheduled_for, count(*) FROM crm_sync.runs WHERE trigger = 'schedule'
          GROUP BY scheduled_for ORDER BY scheduled_for",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(ticks.len() >= 55);
    assert!(
        ticks.iter().all(|t| t.1 == 1),
        "a tick produced more than one run"
    );
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1].0 - pair[0].0).num_seconds(),
            1,
            "tick missing between {} and {}",
            pair[0].0,
            pair[1].0
        );
    }
    // The workers in `serve` ran what the schedulers enqueued.
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs WHERE status = 'succeeded'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(succeeded > 0);
}
