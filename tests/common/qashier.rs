//! The Qashier reference pipeline as tests run it: `examples/qashier.toml` pointed at a fixture.

use std::path::Path;

use crm_sync::fixtures::qashier::{self, QashierFixture};

/// `examples/qashier.toml` with its login URL on `fixture`, its secrets (the given password) in files
/// under `secrets`, its backups under `backups`, short timeouts, 2 attempts and fast retries.
pub fn example_config(
    fixture: &QashierFixture,
    password: &str,
    secrets: &Path,
    backups: &Path,
) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/qashier.toml"
    ))
    .unwrap();
    crm_sync::fixtures::with_secret_files(
        &text,
        secrets,
        &[
            ("QASHIER_USERNAME", qashier::DEFAULT_USERNAME),
            ("QASHIER_PASSWORD", password),
        ],
    )
    .unwrap()
    .replace(
        "http://127.0.0.1:8082/#/login?redirect=/customer-management",
        &fixture.login_url(),
    )
    .replace("./crm-sync-backups", &backups.display().to_string())
    .replace("export_timeout = \"120s\"", "export_timeout = \"4s\"")
    .replace("max_attempts = 4", "max_attempts = 2")
    .replace("retry_backoff = \"30s\"", "retry_backoff = \"100ms\"")
    .replace("[worker]", "[worker]\npoll_interval = \"100ms\"")
}

/// The Qashier fixture with a short list delay (300 ms), as pipeline tests start it.
pub async fn quick_fixture() -> QashierFixture {
    QashierFixture::start_on_free_port(qashier::QashierConfig {
        list_delay: std::time::Duration::from_millis(300),
        ..qashier::QashierConfig::default()
    })
    .await
    .expect("qashier fixture")
}
