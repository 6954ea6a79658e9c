//! Key values stay out of what a run leaves behind. The EZ Focus pipeline, merging by `store_id`,
//! runs under `crm-sync serve` against the fixture (3 repeated and 3 empty `store_id`s) with two
//! webhooks: the run error, the step outputs, `crm-sync show`, the process's log and both webhook
//! bodies name the dirty keys by count, row numbers and `key#<hash>`, never by value; with
//! `show_key_values = true` the values are shown. The Qashier pipeline merged by store and customer
//! name fails without quoting a name. A PostgreSQL data error leaves out the value it quotes.

use super::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use common::{TestDb, run_binary, spawn_binary, terminate, wait_until};
use crm_sync::fixtures::ezfocus::{self, AccountsQuery, EzFocusConfig, EzFocusFixture};
use crm_sync::keys::KeyDisplay;
use serde_json::{Value, json};

const PIPELINE: &str = "ezfocus_accounts";

/// A webhook receiver that keeps every body.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .fallback(
            |State(b): State<Arc<Mutex<Vec<Value>>>>, body: Bytes| async move {
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                b.lock().unwrap().push(body);
            },
        )
        .with_state(bodies.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, bodies)
}

/// The fixture's dirty keys: each repeated `accnt_no` with its rows (from 1), and the rows of the
/// empty ones.
struct Dirt {
    repeated: Vec<(String, Vec<u64>)>,
    empty: Vec<u64>,
}

fn dirt(fixture: &EzFocusFixture) -> Dirt {
    let body = ezfocus::render_accounts_body(fixture.config(), &AccountsQuery::standard());
    let records: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut empty = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let row = i as u64 + 1;
        match &r["accnt_no"] {
            Value::String(s) if s.is_empty() => empty.push(row),
            Value::String(s) => by_key.entry(s.clone()).or_default().push(row),
            v => by_key.entry(v.to_string()).or_default().push(row),
        }
    }
    let repeated: Vec<_> = by_key.into_iter().filter(|(_, r)| r.len() > 1).collect();
    assert_eq!((repeated.len(), empty.len()), (3, 3), "the fixture's dirt");
    Dirt { repeated, empty }
}

/// What one failed run left: its error, step outputs, `crm-sync show`, the log, webhook bodies.
struct Evidence {
    error: String,
    outputs: String,
    show: String,
    log: String,
    hooks: Vec<String>,
    dirt: Dirt,
}

impl Evidence {
    fn everything(&self) -> Vec<(&str, &str)> {
        let mut all = vec![
            ("run error", self.error.as_str()),
            ("step outputs", self.outputs.as_str()),
            ("crm-sync show", self.show.as_str()),
            ("log", self.log.as_str()),
        ];
        all.extend(self.hooks.iter().map(|h| ("webhook body", h.as_str())));
        all
    }

    /// No repeated key's value anywhere.
    fn assert_no_values(&self) {
        for (what, text) in self.everything() {
            for (value, _) in &self.dirt.repeated {
                assert!(
                    !text.contains(value.as_str()),
                    "{what} quotes {value}:\n{text}"
                );
            }
        }
    }
}

/// The EZ Focus example in merge mode, edited by `edit`, run once under `serve` with two webhooks;
/// the run must fail.
async fn failed_run(edit: impl Fn(&str) -> String) -> Evidence {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (hook, bodies) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (secrets, backups) = (dir.path().join("secrets"), dir.path().join("backups"));
    std::fs::create_dir_all(&secrets).unwrap();
    let example = common::ezfocus::example_config(&fixture, &secrets, &backups);
    let mut text = edit(&common::merge_mode(&example));
    for format in ["json", "slack"] {
        text.push_str(&format!(
            "\n[[notifications.webhooks]]\nname = \"{format}\"\nurl = {}\nformat = \"{format}\"\n",
            url_file(dir.path(), format, &format!("{hook}/{format}"))
        ));
    }
    let config = common::write_config(dir.path(), &db, &text);
    let log = dir.path().join("serve.log");
    let mut serve = spawn_binary(&config, &["serve", "--no-api", "--no-scheduler"], &log);
    let (code, _, stderr) = run_binary(&config, &["run", PIPELINE, "--wait"]);
    assert_eq!(code, 1, "the run must fail: {stderr}");
    wait_until(
        &db.pool,
        "SELECT count(*) = 2 FROM crm_sync.notification_deliveries WHERE state = 'delivered'",
        Duration::from_secs(30),
    )
    .await;
    terminate(&mut serve, Duration::from_secs(30));
    let run: uuid::Uuid = sqlx::query_scalar("SELECT id FROM crm_sync.runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let outputs: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(output::text, E'\\n'), '') FROM crm_sync.steps WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (code, show, stderr) = run_binary(&config, &["show", &run.to_string()]);
    assert_eq!(code, 0, "{stderr}");
    let hooks = bodies
        .lock()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect();
    Evidence {
        error: common::run_error(&db.pool, run).await,
        outputs,
        show,
        log: std::fs::read_to_string(&log).unwrap(),
        hooks,
        dirt: dirt(&fixture),
    }
}

/// A webhook URL in a secret file; returns the TOML reference.
fn url_file(dir: &Path, name: &str, url: &str) -> String {
    let path = dir.join(name);
    // Others may not read a secret file (crm-sync refuses it otherwise).
    crm_sync::private_fs::write_new(&path, url.as_bytes()).unwrap();
    format!("{{ file = \"{}\" }}", path.display())
}

fn without_skip(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("skip_dirty_keys = "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key#<hash>` of a `store_id` in this pipeline.
fn hash(value: &str) -> String {
    KeyDisplay::new(PIPELINE, false).parts(&[&json!(value)])
}

fn rows(rows: &[u64]) -> String {
    rows.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_merge_names_keys_by_hash_and_rows_never_by_value() {
    let e = failed_run(without_skip).await;
    let d = &e.dirt;
    let empty = format!(
        "empty merge key store_id (rows {}): 3 rows (at most 0 allowed)",
        rows(&d.empty)
    );
    assert!(e.error.contains(&empty), "{empty}\n{}", e.error);
    assert!(
        e.error.contains("duplicate merge key store_id (e.g. key#"),
        "{}",
        e.error
    );
    for (value, at) in &d.repeated {
        let named = format!("{} at rows {}", hash(value), rows(at));
        for (what, text) in [("run error", &e.error), ("crm-sync show", &e.show)] {
            assert!(text.contains(&named), "{what} lacks {named}:\n{text}");
        }
        for body in &e.hooks {
            assert!(body.contains(&hash(value)), "{body}");
        }
    }
    assert!(e.log.contains("key#"), "the failure is logged:\n{}", e.log);
    e.assert_no_values();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_left_out_by_skip_dirty_keys_are_named_by_hash_and_row() {
    let e = failed_run(|t| t.replace("skip_dirty_keys = 10", "skip_dirty_keys = 5")).await;
    let d = &e.dirt;
    assert!(
        e.error
            .contains("6 rows have an empty or repeated merge key (duplicate store_id: 3, empty store_id: 3) (e.g. "),
        "{}",
        e.error
    );
    for (value, at) in &d.repeated {
        // The first row of a key wins; the second is left out.
        let named = format!("{} at row {}", hash(value), at[1]);
        for (what, text) in [
            ("run error", &e.error),
            ("step outputs", &e.outputs),
            ("crm-sync show", &e.show),
        ] {
            assert!(text.contains(&named), "{what} lacks {named}:\n{text}");
        }
    }
    for row in &d.empty {
        let named = format!("empty key at row {row}");
        assert!(e.outputs.contains(&named), "{named}\n{}", e.outputs);
    }
    e.assert_no_values();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_key_values_opts_in_to_the_values() {
    let e = failed_run(|t| {
        without_skip(t).replace(
            &format!("name = \"{PIPELINE}\"\n"),
            &format!("name = \"{PIPELINE}\"\nshow_key_values = true\n"),
        )
    })
    .await;
    for (value, at) in &e.dirt.repeated {
        let named = format!("{value} at rows {}", rows(at));
        assert!(e.error.contains(&named), "{named}\n{}", e.error);
        for body in &e.hooks {
            assert!(body.contains(value.as_str()), "{body}");
        }
    }
    assert!(!e.error.contains("key#"), "{}", e.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_data_error_leaves_out_the_value() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let text = common::ezfocus::example_config(&fixture, secrets.path(), backups.path());
    let config = db.config(&text).await;
    // The table exists with store_name as a number: the first account's name cannot go in.
    let transform = config
        .pipeline(PIPELINE)
        .unwrap()
        .transform
        .clone()
        .unwrap();
    let mut columns: Vec<String> = transform
        .columns
        .iter()
        .map(|c| match c.name.as_str() {
            "store_name" => "store_name integer".to_string(),
            n => format!("{n} text"),
        })
        .collect();
    columns.extend(["batch_id text".into(), "load_timestamp timestamptz".into()]);
    for sql in [
        "CREATE SCHEMA ezfocus".to_string(),
        format!(
            "CREATE TABLE ezfocus.accounts_list ({})",
            columns.join(", ")
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let (run, status) =
        common::run_pipeline(&db, &config, PIPELINE, Duration::from_secs(120)).await;
    assert_eq!(status, "failed");
    let error = common::run_error(&db.pool, run).await;
    let body = ezfocus::render_accounts_body(fixture.config(), &AccountsQuery::standard());
    let first: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let name = first[0]["accnt_name"].as_str().unwrap();
    assert!(
        error.contains("invalid input syntax for type integer: \"…\" (SQLSTATE 22P02")
            && error.contains("line 1, column store_name")
            && error.contains("the value is not shown"),
        "{error}"
    );
    assert!(!error.contains(name), "{name} quoted: {error}");
}

/// The Qashier export merged by store and customer name (names repeat within a store): the failure
/// names the repeated keys, a customer's name, by hash, never by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qashier_customer_key_is_never_quoted() {
    let db = TestDb::new().await;
    let fixture = common::qashier::quick_fixture().await;
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let example = common::qashier::example_config(
        &fixture,
        crm_sync::fixtures::qashier::DEFAULT_PASSWORD,
        secrets.path(),
        backups.path(),
    );
    let text = common::merge_mode(&example).replace(
        r#"key = ["store", "customer_name", "contact_number", "date_joined"]"#,
        r#"key = ["store", "customer_name"]"#,
    );
    let config = db.config(&text).await;
    let (run, status) =
        common::run_pipeline(&db, &config, "qashier_customers", Duration::from_secs(120)).await;
    let error = common::run_error(&db.pool, run).await;
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("duplicate merge key store+customer_name (e.g. key#"),
        "{error}"
    );
    // The names that repeat within a store, from the export as backed up.
    let extract = common::step_output(&db.pool, run, "extract").await;
    let path = extract["object"]
        .as_str()
        .unwrap()
        .trim_start_matches("file://");
    let mut csv = ::csv::Reader::from_path(path).unwrap();
    let headers: Vec<String> = csv
        .headers()
        .unwrap()
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (store, customer) = (at("Store"), at("Customer"));
    let mut seen: BTreeMap<(String, String), u32> = BTreeMap::new();
    for record in csv.records() {
        let r = record.unwrap();
        *seen
            .entry((r[store].to_string(), r[customer].to_string()))
            .or_default() += 1;
    }
    let repeated: Vec<&String> = seen
        .iter()
        .filter(|((_, name), n)| **n > 1 && !name.is_empty())
        .map(|((_, name), _)| name)
        .collect();
    assert!(!repeated.is_empty(), "the export repeats no name");
    for name in repeated {
        assert!(!error.contains(name.as_str()), "{name} quoted: {error}");
    }
}
