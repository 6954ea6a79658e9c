//! The web console end to end, in headless Chromium against a real `serve` API and workers: sign in,
//! Run now and watch the run go queued -> running -> succeeded without a reload, a failed run's
//! error and Retry turning it green, a read-only token seeing no buttons, a phone-width layout.
//! Screenshots of each page are saved under target/tmp/console-screenshots/.

mod common;

use std::time::Duration;

use chromiumoxide::Page;
use common::browser::{Chromium, click, js, phone_width, screenshot, type_into, wait_for};
use common::{ApiServer, RunningWorker, TestDb};
use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture};

const ADMIN: &str = "Ca4Wq8Nv2Kx7Lr3Tb9Hp5Zm6Jd";
const READER: &str = "Cr7Vx3Nq9Kw2Lt5Pb8Hm4Zj6Yd";

const CONFIG: &str = r#"
[worker]
poll_interval = "100ms"

[[pipelines]]
name = "noop"
schedule = "0 2 * * *"
timezone = "Asia/Singapore"
freshness_sla = "1h"
source = { kind = "noop", sleep_ms = 1500 }

[[pipelines]]
name = "broken"
retry_backoff = "10ms"
source = { kind = "noop", fail_times = 1, fail_kind = "terminal" }
"#;

async fn sign_in(page: &Page, token: &str) {
    wait_for(
        page,
        "document.querySelector('#token')",
        Duration::from_secs(30),
        "the sign-in form",
    )
    .await;
    type_into(page, "#token", token).await;
    click(page, "#signin").await;
    wait_for(
        page,
        "document.querySelector('tr[data-pipeline=\"noop\"]')",
        Duration::from_secs(30),
        "the pipelines page",
    )
    .await;
}

/// Waits for the console's confirmation dialog, checks that it names each of `names`, and answers
/// it: yes, or Back.
async fn answer_confirmation(page: &Page, names: &[&str], yes: bool) {
    wait_for(
        page,
        "document.querySelector('dialog#confirm')?.open",
        Duration::from_secs(10),
        "the confirmation dialog",
    )
    .await;
    let text: String = js(page, "document.querySelector('dialog#confirm').innerText").await;
    for name in names {
        assert!(text.contains(name), "the confirmation names {name}: {text}");
    }
    click(page, if yes { "#confirm-yes" } else { "#confirm-no" }).await;
    wait_for(
        page,
        "!document.querySelector('dialog#confirm')",
        Duration::from_secs(10),
        "the dialog to close",
    )
    .await;
}

/// The run page's status badge.
const RUN_STATUS: &str = "document.querySelector('#run-status .badge')?.dataset.status";

/// Watches the run page's status until it is `last`, recording every distinct status shown.
async fn watch_statuses(page: &Page, last: &str, timeout: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let status: Option<String> = js(page, RUN_STATUS).await;
        if let Some(s) = status
            && seen.last() != Some(&s)
        {
            seen.push(s.clone());
        }
        if seen.last().map(String::as_str) == Some(last) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run page never showed {last}; saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn admin_runs_a_pipeline_and_watches_it_live_then_retries_a_failure() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;

    // Unauthenticated: the sign-in form; a wrong token is refused with a message.
    wait_for(
        &page,
        "document.querySelector('#token')",
        Duration::from_secs(30),
        "sign-in",
    )
    .await;
    screenshot(&page, "01-sign-in").await;
    type_into(&page, "#token", "not-a-valid-token-000000").await;
    click(&page, "#signin").await;
    wait_for(
        &page,
        "document.querySelector('#signin-error').textContent.includes('not accepted')",
        Duration::from_secs(30),
        "the refusal",
    )
    .await;
    page.evaluate("document.querySelector('#token').value = ''")
        .await
        .unwrap();
    sign_in(&page, ADMIN).await;

    // Pipelines page: schedule with local and UTC next fire, freshness, Run now.
    let row: String = js(
        &page,
        "document.querySelector('tr[data-pipeline=\"noop\"]').innerText",
    )
    .await;
    assert!(
        row.contains("0 2 * * *") && row.contains("Asia/Singapore"),
        "{row}"
    );
    assert!(
        row.contains("02:00:00+08:00") && row.contains("18:00:00 UTC"),
        "{row}"
    );
    assert!(row.contains("stale") && row.contains("never"), "{row}");
    screenshot(&page, "02-pipelines").await;

    // A marker that a reload would wipe: everything below happens live.
    page.evaluate("window.__noReload = 'still here'")
        .await
        .unwrap();
    click(&page, "button.run-now[data-pipeline=\"noop\"]").await;
    wait_for(&page, RUN_STATUS, Duration::from_secs(30), "the run page").await;
    let first: String = js(&page, RUN_STATUS).await;
    assert_eq!(first, "queued", "no worker yet: the run waits");
    screenshot(&page, "03-run-queued").await;
    let worker = RunningWorker::start(&db, &config).await;
    let seen = watch_statuses(&page, "succeeded", Duration::from_secs(40)).await;
    assert_eq!(
        seen,
        ["queued", "running", "succeeded"],
        "statuses shown live"
    );
    let marker: String = js(&page, "window.__noReload").await;
    assert_eq!(marker, "still here", "the page was reloaded");
    let trigger: String = sqlx::query_scalar(
        "SELECT trigger FROM crm_sync.runs WHERE pipeline = 'noop' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(trigger, "console");
    wait_for(
        &page,
        "document.querySelector('tr[data-step=\"noop\"] .badge').dataset.status === 'succeeded'",
        Duration::from_secs(15),
        "the step row",
    )
    .await;
    screenshot(&page, "04-run-succeeded").await;

    // A failing run shows its error; Retry turns it green.
    click(&page, "a[data-nav=\"pipelines\"]").await;
    wait_for(
        &page,
        "document.querySelector('button.run-now[data-pipeline=\"broken\"]')",
        Duration::from_secs(30),
        "pipelines",
    )
    .await;
    click(&page, "button.run-now[data-pipeline=\"broken\"]").await;
    watch_statuses(&page, "failed", Duration::from_secs(40)).await;
    wait_for(
        &page,
        "document.querySelector('#run-error')",
        Duration::from_secs(15),
        "the run error",
    )
    .await;
    let error: String = js(&page, "document.querySelector('#run-error').textContent").await;
    assert!(error.contains("fail"), "{error}");
    let step_error: String = js(
        &page,
        "document.querySelector('tr[data-step=\"noop\"]').innerText",
    )
    .await;
    assert!(step_error.contains("failed"), "{step_error}");
    screenshot(&page, "05-run-failed").await;
    click(&page, "#action-retry").await;
    wait_for(
        &page,
        "document.querySelector('#run-header')?.innerText.includes('Retry of')",
        Duration::from_secs(30),
        "the retry run's page",
    )
    .await;
    let seen = watch_statuses(&page, "succeeded", Duration::from_secs(40)).await;
    assert_eq!(seen.last().map(String::as_str), Some("succeeded"));
    screenshot(&page, "06-retry-succeeded").await;

    // Runs page: newest first, with batch, trigger, duration; filter by status.
    click(&page, "a[data-nav=\"runs\"]").await;
    wait_for(
        &page,
        "document.querySelectorAll('#runs tr[data-run]').length === 3",
        Duration::from_secs(30),
        "three runs",
    )
    .await;
    let text: String = js(&page, "document.querySelector('#runs').innerText").await;
    assert!(text.contains("retry") && text.contains("console"), "{text}");
    screenshot(&page, "07-runs").await;
    page.evaluate("(() => { const s = document.querySelector('#filter-status'); s.value = 'failed'; s.dispatchEvent(new Event('change')); })()")
        .await
        .unwrap();
    wait_for(
        &page,
        "document.querySelectorAll('#runs tr[data-run]').length === 1",
        Duration::from_secs(30),
        "the failed filter",
    )
    .await;
    assert!(
        js::<String>(&page, "location.search")
            .await
            .contains("status=failed")
    );

    // Phone width: rows become labelled cards, nothing wider than the screen.
    phone_width(&page, true).await;
    click(&page, "a[data-nav=\"pipelines\"]").await;
    wait_for(
        &page,
        "document.querySelector('tr[data-pipeline=\"noop\"]')",
        Duration::from_secs(30),
        "pipelines",
    )
    .await;
    let overflow: bool = js(
        &page,
        "document.documentElement.scrollWidth > window.innerWidth + 1",
    )
    .await;
    assert!(!overflow, "the pipelines page is wider than a phone");
    screenshot(&page, "08-pipelines-phone").await;
    worker.stop().await;
}

#[tokio::test]
async fn a_read_only_token_sees_everything_but_no_buttons() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let run = crm_sync::queue::enqueue(
        &db.pool,
        "broken",
        &serde_json::json!({}),
        None,
        crm_sync::queue::Trigger::Api,
    )
    .await
    .unwrap();
    let worker = RunningWorker::start(&db, &config).await;
    common::wait_for_run(&db.pool, run, Duration::from_secs(15)).await;
    worker.stop().await;

    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    sign_in(&page, READER).await;
    let scope: String = js(&page, "document.querySelector('#scope').textContent").await;
    assert_eq!(scope, "read only");
    let buttons: i64 = js(&page, "document.querySelectorAll('main button').length").await;
    assert_eq!(buttons, 0, "no Run now for a read-only token");
    screenshot(&page, "09-pipelines-read-only").await;

    page.goto(format!("{}/runs/{run}", console.base))
        .await
        .unwrap();
    wait_for(&page, RUN_STATUS, Duration::from_secs(30), "the run page").await;
    assert_eq!(js::<String>(&page, RUN_STATUS).await, "failed");
    let buttons: i64 = js(&page, "document.querySelectorAll('main button').length").await;
    assert_eq!(
        buttons, 0,
        "no Retry / Rerun / Cancel for a read-only token"
    );
    let error: String = js(&page, "document.querySelector('#run-error').textContent").await;
    assert!(!error.is_empty());
    screenshot(&page, "10-run-read-only").await;

    // Signing out forgets the token.
    click(&page, "#signout").await;
    wait_for(
        &page,
        "document.querySelector('#token')",
        Duration::from_secs(15),
        "sign-in",
    )
    .await;
    let stored: Option<String> = js(&page, "sessionStorage.getItem('crm-sync-token')").await;
    assert_eq!(stored, None);
}

#[tokio::test]
async fn the_console_is_one_self_contained_page() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let client = reqwest::Client::new();
    for path in [
        "/",
        "/runs",
        "/runs/00000000-0000-0000-0000-000000000000",
        "/signin",
    ] {
        let resp = client
            .get(format!("{}{path}", console.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK, "{path}");
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        let html = resp.text().await.unwrap();
        assert!(html.contains("/assets/console.js"));
    }
    // No external fetches: nothing in the page, script or style points off the origin.
    for path in [
        "/",
        "/assets/console.js",
        "/assets/feed.js",
        "/assets/run.js",
        "/assets/console.css",
    ] {
        let body = client
            .get(format!("{}{path}", console.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for needle in ["http://", "https://", "//fonts.", "@import"] {
            let hits: Vec<&str> = body
                .lines()
                .filter(|l| {
                    l.contains(needle)
                        && !l.contains("console.cloud.google.com")
                        && !l.contains("www.w3.org/2000/svg")
                })
                .collect();
            assert!(hits.is_empty(), "{path} references {needle}: {hits:?}");
        }
    }
}

#[tokio::test]
async fn a_pipeline_run_shows_rows_and_backups_the_runs_page_pages_and_cancel_stops_a_run() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // In merge mode, so the run page also shows the merge counts and the rows left out.
    let text = common::merge_mode(&common::ezfocus::example_config(
        &fixture,
        secrets.path(),
        backups.path(),
    ));
    let config = db
        .config(&format!(
            "{text}\n[[pipelines]]\nname = \"noop\"\nsource = {{ kind = \"noop\" }}\n"
        ))
        .await;
    let (run, status) =
        common::run_pipeline(&db, &config, "ezfocus_accounts", Duration::from_secs(120)).await;
    assert_eq!(status, "succeeded");
    let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    wait_for(
        &page,
        "document.querySelector('#token')",
        Duration::from_secs(30),
        "sign-in",
    )
    .await;
    type_into(&page, "#token", ADMIN).await;
    click(&page, "#signin").await;
    wait_for(
        &page,
        "document.querySelector('tr[data-pipeline]')",
        Duration::from_secs(30),
        "pipelines",
    )
    .await;

    // The run page: every step succeeded with its rows and backup objects.
    page.goto(format!("{}/runs/{run}", console.base))
        .await
        .unwrap();
    wait_for(
        &page,
        "document.querySelector('tr[data-step=\"load\"]')",
        Duration::from_secs(30),
        "the steps",
    )
    .await;
    let load: String = js(
        &page,
        "document.querySelector('tr[data-step=\"load\"]').innerText",
    )
    .await;
    assert!(
        load.contains(&loaded.to_string()),
        "rows loaded shown: {load}"
    );
    assert!(load.contains("ezfocus.accounts_list"), "{load}");
    assert!(
        load.contains(&format!(
            "{loaded} inserted, 0 updated, 0 unchanged, 0 deleted"
        )),
        "merge counts shown: {load}"
    );
    let transform: String = js(
        &page,
        "document.querySelector('tr[data-step=\"transform\"]').innerText",
    )
    .await;
    assert!(
        transform.contains("left out: duplicate store_id: 3, empty store_id: 3 (e.g. "),
        "rows left out shown: {transform}"
    );
    let objects: Vec<String> = js(
        &page,
        "[...document.querySelectorAll('#steps .object')].map(e => e.innerText)",
    )
    .await;
    let backup_dir = backups.path().display().to_string();
    assert!(
        objects.len() >= 2,
        "raw and staged objects shown: {objects:?}"
    );
    assert!(
        objects.iter().all(|o| o.contains(&backup_dir)),
        "{objects:?}"
    );
    screenshot(&page, "11-ezfocus-run").await;

    // The runs page shows rows loaded, and pages through older runs.
    for _ in 0..30 {
        crm_sync::queue::enqueue(
            &db.pool,
            "noop",
            &serde_json::json!({}),
            None,
            crm_sync::queue::Trigger::Api,
        )
        .await
        .unwrap();
    }
    click(&page, "a[data-nav=\"runs\"]").await;
    wait_for(
        &page,
        "document.querySelectorAll('#runs tr[data-run]').length === 25",
        Duration::from_secs(30),
        "a full page",
    )
    .await;
    click(&page, "#older").await;
    wait_for(
        &page,
        "document.querySelectorAll('#runs tr[data-run]').length === 6",
        Duration::from_secs(30),
        "the older page",
    )
    .await;
    let row: String = js(
        &page,
        &format!("document.querySelector('tr[data-run=\"{run}\"]').innerText"),
    )
    .await;
    assert!(
        row.contains("ezfocus_accounts") && row.contains(&loaded.to_string()),
        "{row}"
    );
    assert!(
        js::<String>(&page, "location.search")
            .await
            .contains("before=")
    );
    screenshot(&page, "12-runs-older-page").await;

    // Cancel a queued run from its page; it turns cancelled live and offers Retry and Rerun.
    let queued: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM crm_sync.runs WHERE pipeline = 'noop' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    page.goto(format!("{}/runs/{queued}", console.base))
        .await
        .unwrap();
    wait_for(
        &page,
        "document.querySelector('#action-cancel')",
        Duration::from_secs(30),
        "Cancel",
    )
    .await;
    click(&page, "#action-cancel").await;
    answer_confirmation(&page, &["noop"], true).await;
    wait_for(
        &page,
        &format!("{RUN_STATUS} === 'cancelled' && document.querySelector('#action-retry') && document.querySelector('#action-rerun') && !document.querySelector('#action-cancel')"),
        Duration::from_secs(30),
        "the cancelled run with Retry and Rerun",
    )
    .await;
    screenshot(&page, "13-run-cancelled").await;
}

/// The pipelines page says who serves each pipeline and whether live processes agree on it, and an
/// admin disables and enables a pipeline for every process.
#[tokio::test]
async fn pipelines_show_who_serves_them_and_an_admin_disables_one() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    // A second config: another definition of `noop`, and a pipeline only it has.
    let other_text = format!(
        "{}\n[[pipelines]]\nname = \"orphan\"\nsource = {{ kind = \"noop\" }}\n",
        CONFIG.replace("sleep_ms = 1500", "sleep_ms = 1400")
    );
    let other = db.config(&other_text).await;
    let first = RunningWorker::start(&db, &config).await;
    let mut second_config = other.clone();
    second_config.pipelines.retain(|p| p.name != "orphan");
    let second = RunningWorker::start(&db, &second_config).await;
    crm_sync::queue::enqueue(
        &db.pool,
        "orphan",
        &serde_json::json!({}),
        None,
        crm_sync::queue::Trigger::Cli,
    )
    .await
    .unwrap();
    common::wait_until(
        &db.pool,
        "SELECT definitions = 2 FROM crm_sync.pipeline_health WHERE pipeline = 'noop'",
        Duration::from_secs(30),
    )
    .await;

    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    sign_in(&page, ADMIN).await;
    let row = |name: &'static str| {
        let page = &page;
        async move {
            js::<String>(
                page,
                &format!("document.querySelector('tr[data-pipeline=\"{name}\"]').innerText"),
            )
            .await
        }
    };
    wait_for(
        &page,
        "document.querySelector('tr[data-pipeline=\"orphan\"]')",
        Duration::from_secs(30),
        "the orphan pipeline",
    )
    .await;
    let orphan = row("orphan").await;
    assert!(orphan.contains("no worker: 1 step waits"), "{orphan}");
    let noop = row("noop").await;
    assert!(noop.contains("2 definitions"), "{noop}");
    assert!(!noop.contains("no worker"), "{noop}");
    screenshot(&page, "07-pipelines-served-and-conflicts").await;

    click(&page, "button.disable[data-pipeline=\"broken\"]").await;
    wait_for(
        &page,
        "document.querySelector('tr[data-pipeline=\"broken\"]').innerText.includes('disabled by operator')",
        Duration::from_secs(30),
        "the disabled badge",
    )
    .await;
    let enabled: bool =
        sqlx::query_scalar("SELECT enabled FROM crm_sync.pipelines WHERE name = 'broken'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!enabled);
    click(&page, "button.enable[data-pipeline=\"broken\"]").await;
    wait_for(
        &page,
        "document.querySelector('button.run-now[data-pipeline=\"broken\"]')",
        Duration::from_secs(30),
        "Run now again",
    )
    .await;
    first.stop().await;
    second.stop().await;
}

/// Opens `url` and waits (30 s at most) until `condition` holds.
async fn open(page: &Page, url: String, condition: &str, what: &str) {
    page.goto(url).await.unwrap();
    wait_for(page, condition, Duration::from_secs(30), what).await;
}

/// Queues a run of `pipeline` as the API would.
async fn enqueue(db: &TestDb, pipeline: &str) -> uuid::Uuid {
    crm_sync::queue::enqueue(
        &db.pool,
        pipeline,
        &serde_json::json!({}),
        None,
        crm_sync::queue::Trigger::Api,
    )
    .await
    .unwrap()
}

/// A phone's width in CSS pixels (an iPhone's 375).
const PHONE: i64 = 375;

async fn phone_375(page: &Page) {
    use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
    page.execute(SetDeviceMetricsOverrideParams::new(PHONE, 812, 2.0, true))
        .await
        .unwrap();
}

/// The page's width: at most the phone's, or it scrolls sideways. Fails naming the elements that
/// reach past the phone's edge.
async fn assert_fits_a_phone(page: &Page, what: &str) {
    let width: i64 = js(page, "document.documentElement.scrollWidth").await;
    if width <= PHONE {
        return;
    }
    let wide: Vec<String> = js(
        page,
        &format!(
            "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > {PHONE} + 0.5)\
             .map(e => `${{e.tagName}}.${{e.className}}#${{e.id}} ${{Math.round(e.getBoundingClientRect().right)}} ${{e.textContent.slice(0, 40)}}`)"
        ),
    )
    .await;
    panic!("the {what} is {width} px wide on a {PHONE} px phone: {wide:#?}");
}

/// On a phone (emulated again: a navigation or a screenshot resets it), the page is no wider than
/// the screen and no word or figure in `text` (a selector) is broken inside itself.
async fn assert_phone_layout(page: &Page, what: &str, text: &str) {
    phone_375(page).await;
    assert_fits_a_phone(page, what).await;
    let broken = broken_words(page, text).await;
    assert!(
        broken.is_empty(),
        "{what}: words broken mid-way: {broken:?}"
    );
}

/// Words (split at spaces and at the separators ids and URIs may break after: / _ . -) inside the
/// elements matching `selector`, broken across lines although they would fit on one: "26" / "00".
async fn broken_words(page: &Page, selector: &str) -> Vec<String> {
    js(
        page,
        &format!(
            r#"(() => {{
  const broken = [];
  for (const el of document.querySelectorAll({selector:?})) {{
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode()); ) {{
      for (const m of node.data.matchAll(/[^\s\-\/_.]+/g)) {{
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.bottom)));
        if (lines.size < 2) continue;
        const probe = document.createElement("span");
        probe.style.whiteSpace = "nowrap";
        probe.textContent = m[0];
        node.parentElement.append(probe);
        const fits = probe.getBoundingClientRect().width <= el.clientWidth;
        probe.remove();
        if (fits) broken.push(m[0]);
      }}
    }}
  }}
  return broken;
}})()"#
        ),
    )
    .await
}

/// Defects 1, 3 and 4: the sign-in page shows no nav; an unknown run id says "run not found" and
/// stops asking; Cancel and Rerun ask first, naming the pipeline and the batch, and Back does nothing.
#[tokio::test]
async fn the_nav_hides_unknown_runs_say_so_and_cancel_and_rerun_ask_first() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    let nav_shown = "getComputedStyle(document.getElementById('nav')).display !== 'none'";
    wait_for(
        &page,
        "document.querySelector('#token')",
        Duration::from_secs(30),
        "sign-in",
    )
    .await;
    assert!(
        !js::<bool>(&page, nav_shown).await,
        "Pipelines, Runs and Sign out show on the sign-in page"
    );
    sign_in(&page, ADMIN).await;
    assert!(js::<bool>(&page, nav_shown).await, "the nav after sign-in");

    // An unknown run: said once, the 404 not asked again.
    let unknown = uuid::Uuid::new_v4();
    open(
        &page,
        format!("{}/runs/{unknown}", console.base),
        "document.querySelector('main').innerText.toLowerCase().includes('run not found')",
        "run not found",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let asked: i64 = js(
        &page,
        &format!(
            "performance.getEntriesByType('resource').filter(e => e.name.includes('/api/runs/{unknown}')).length"
        ),
    )
    .await;
    assert_eq!(
        asked, 1,
        "the unknown run was asked for {asked} times in 5 s"
    );
    screenshot(&page, "14-run-not-found").await;

    // Cancel asks first; Back leaves the run alone.
    let run = enqueue(&db, "noop").await;
    let batch = common::batch_of(&db.pool, run).await;
    open(
        &page,
        format!("{}/runs/{run}", console.base),
        "document.querySelector('#action-cancel')",
        "Cancel",
    )
    .await;
    click(&page, "#action-cancel").await;
    screenshot(&page, "15-confirm-cancel").await;
    answer_confirmation(&page, &["noop", &batch], false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = || async {
        crm_sync::history::run_status(&db.pool, run)
            .await
            .unwrap()
            .unwrap()
            .0
    };
    assert_eq!(status().await, "queued", "Back cancelled");
    click(&page, "#action-cancel").await;
    answer_confirmation(&page, &["noop", &batch], true).await;
    wait_for(
        &page,
        &format!("{RUN_STATUS} === 'cancelled' && document.querySelector('#action-rerun')"),
        Duration::from_secs(30),
        "the cancelled run",
    )
    .await;
    assert_eq!(status().await, "cancelled");

    // Rerun asks first too.
    click(&page, "#action-rerun").await;
    answer_confirmation(&page, &["noop", &batch], false).await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "Back started a rerun");
    click(&page, "#action-rerun").await;
    answer_confirmation(&page, &["noop", &batch], true).await;
    wait_for(
        &page,
        "document.querySelector('#run-header')?.innerText.includes('Rerun of')",
        Duration::from_secs(30),
        "the rerun's page",
    )
    .await;
}

/// A 64-character pipeline name (the longest valid one).
const LONG_NAME: &str = "ezfocus_accounts_of_the_greater_toronto_area_and_south_ontario_1";

/// Defects 2 and 6: a validation failure offers Rerun and says why, not Retry; a run retried
/// elsewhere hides Retry and links the retry (also after a 409); on a phone, a 64-character
/// pipeline name and long ids stay within the screen and numbers are not broken.
#[tokio::test]
async fn retry_only_where_it_helps_and_a_phone_page_never_widens() {
    assert_eq!(LONG_NAME.len(), 64);
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let text = common::ezfocus::example_config(&fixture, secrets.path(), backups.path())
        .replace(
            "name = \"ezfocus_accounts\"",
            &format!("name = \"{LONG_NAME}\""),
        )
        .replace("min_rows = 2600", "min_rows = 999999")
        .replace("max_rows = 2700", "max_rows = 1000000");
    let pipelines = CONFIG.replace("[worker]\npoll_interval = \"100ms\"\n", "");
    let config = db.config(&format!("{text}\n{pipelines}")).await;
    let (invalid, status) =
        common::run_pipeline(&db, &config, LONG_NAME, Duration::from_secs(120)).await;
    assert_eq!(status, "failed");
    let (broken, status) =
        common::run_pipeline(&db, &config, "broken", Duration::from_secs(60)).await;
    assert_eq!(status, "failed");

    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    phone_375(&page).await;
    sign_in(&page, ADMIN).await;
    assert_fits_a_phone(&page, "pipelines page").await;

    // The validation failure: Rerun, and why not Retry.
    open(
        &page,
        format!("{}/runs/{invalid}", console.base),
        "document.querySelector('#action-rerun') && document.querySelector('#run-error')",
        "the failed run's actions",
    )
    .await;
    let error: String = js(&page, "document.querySelector('#run-error').textContent").await;
    assert!(error.contains("min_rows = 999999"), "{error}");
    assert!(
        !js::<bool>(&page, "Boolean(document.querySelector('#action-retry'))").await,
        "Retry offered for a validation failure"
    );
    let advice: String = js(&page, "document.querySelector('#retry-advice').textContent").await;
    assert!(advice.contains("same staged batch"), "{advice}");
    assert_phone_layout(&page, "run page", "#run-header dd, #steps td > div").await;
    // A full-page screenshot resets the emulated screen: after the checks.
    screenshot(&page, "16-validation-failure-phone").await;

    open(
        &page,
        format!("{}/runs", console.base),
        "document.querySelectorAll('#runs tr[data-run]').length === 2",
        "the runs",
    )
    .await;
    assert_phone_layout(&page, "runs page", "#runs td > div").await;
    screenshot(&page, "17-runs-phone").await;

    // Retried elsewhere while the page shows Retry: the 409 turns into a link to the retry.
    open(
        &page,
        format!("{}/runs/{broken}", console.base),
        "document.querySelector('#action-retry')",
        "Retry",
    )
    .await;
    let retry = crm_sync::queue::retry(&db.pool, broken).await.unwrap();
    click(&page, "#action-retry").await;
    let linked = format!(
        "document.querySelector('#retried-by a')?.getAttribute('href') === '/runs/{retry}' && !document.querySelector('#action-retry')"
    );
    wait_for(&page, &linked, Duration::from_secs(15), "the retry's link").await;
    let shown: String = js(&page, "document.querySelector('main').innerText").await;
    assert!(
        !shown.contains("already retried"),
        "the raw 409 is still shown: {shown}"
    );
    // And on a fresh load.
    page.reload().await.unwrap();
    wait_for(&page, &linked, Duration::from_secs(30), "the retry's link").await;
}

/// Defect 5: with its server gone, the page says "disconnected, retrying", and "live" again once
/// the server is back.
#[tokio::test]
async fn the_live_state_follows_the_server() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let mut relay = common::relay::Relay::start(&console.base).await;
    let chromium = Chromium::launch().await;
    let page = chromium.open(&relay.base).await;
    sign_in(&page, ADMIN).await;
    wait_for_live_badge(&page, "live", None, Duration::from_secs(15), "live").await;

    relay.cut().await;
    wait_for_live_badge(
        &page,
        "retrying",
        Some("disconnected, retrying"),
        Duration::from_secs(15),
        "disconnected, retrying",
    )
    .await;
    screenshot(&page, "18-disconnected").await;
    relay.resume().await;
    wait_for_live_badge(
        &page,
        "live",
        Some("live"),
        Duration::from_secs(45),
        "live again",
    )
    .await;
}

/// Waits until the console's live badge is in `state` (and reads `text`, if given).
async fn wait_for_live_badge(
    page: &Page,
    state: &str,
    text: Option<&str>,
    timeout: Duration,
    what: &str,
) {
    let live = "document.querySelector('h1 .live')";
    let mut condition = format!("{live}?.dataset.state === '{state}'");
    if let Some(text) = text {
        condition.push_str(&format!(" && {live}.textContent === '{text}'"));
    }
    wait_for(page, &condition, timeout, what).await;
}

/// A server at its cap on event streams answers the console's stream with 429: the console says it is
/// disconnected and retrying (no blank page, no error loop), and goes live once a slot is free.
#[tokio::test]
async fn a_stream_refused_with_429_is_retried_until_a_slot_frees() {
    let db = TestDb::new().await;
    let mut config = db.config(CONFIG).await;
    config.server.max_event_streams = 1;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    // Another client holds the only slot.
    let holder = reqwest::Client::new()
        .get(format!("{}/api/events", console.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), reqwest::StatusCode::OK);
    let chromium = Chromium::launch().await;
    let page = chromium.open(&console.base).await;
    sign_in(&page, ADMIN).await;
    wait_for_live_badge(
        &page,
        "retrying",
        Some("disconnected, retrying"),
        Duration::from_secs(15),
        "disconnected, retrying while the server is at its cap",
    )
    .await;
    drop(holder);
    wait_for_live_badge(
        &page,
        "live",
        None,
        Duration::from_secs(60),
        "live once the slot is free",
    )
    .await;
}

/// Defect 7: ten console tabs in one browser all load and stay live on one event stream (six
/// HTTP/1.1 connections per host: with a stream per tab, the seventh never loads); when the tab
/// holding it closes, another takes over.
#[tokio::test]
async fn ten_tabs_share_one_event_stream() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let console = ApiServer::start(&db, &config, ADMIN, READER).await;
    let relay = common::relay::Relay::start(&console.base).await;
    let chromium = Chromium::launch().await;
    let live_runs = "document.querySelector('#runs') && document.querySelector('h1 .live')?.dataset.state === 'live'";
    let mut tabs = Vec::new();
    for n in 0..10 {
        let page = chromium.open(&relay.base).await;
        sign_in(&page, ADMIN).await;
        click(&page, "a[data-nav=\"runs\"]").await;
        wait_for(
            &page,
            live_runs,
            Duration::from_secs(30),
            &format!("tab {n}'s live runs list"),
        )
        .await;
        tabs.push(page);
    }
    let most = relay.streams.max();
    eprintln!("ten tabs: at most {most} event stream(s) open at once");
    assert!(most <= 2, "{most} event streams open at once for ten tabs");

    // Every tab hears of a new run.
    let shows = |run: uuid::Uuid| format!("document.querySelector('tr[data-run=\"{run}\"]')");
    let run = enqueue(&db, "noop").await;
    for (n, page) in tabs.iter().enumerate() {
        wait_for(
            page,
            &shows(run),
            Duration::from_secs(15),
            &format!("the run in tab {n}"),
        )
        .await;
    }
    screenshot(&tabs[9], "19-tenth-tab").await;

    // The tab holding the stream (the first) closes: another takes over.
    relay.streams.reset_max();
    tabs.remove(0).close().await.unwrap();
    let run = enqueue(&db, "noop").await;
    for (n, page) in tabs.iter().enumerate() {
        wait_for(
            page,
            &format!("{} && {live_runs}", shows(run)),
            Duration::from_secs(20),
            &format!("the run in tab {} after the hand-over", n + 1),
        )
        .await;
    }
    let most = relay.streams.max();
    eprintln!("after the hand-over: at most {most} event stream(s) open at once");
    assert!(
        most <= 2,
        "{most} event streams open at once after the hand-over"
    );
}
