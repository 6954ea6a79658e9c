//! The EZ Focus reference pipeline as tests run it: `examples/ezfocus.toml` pointed at a fixture.

use std::path::Path;

use crm_sync::fixtures::ezfocus::{self, EzFocusFixture};

/// `examples/ezfocus.toml` with its URLs on `fixture`, its secrets in files under `secrets`, its
/// backups under `backups`, fast retries and polling.
pub fn example_config(fixture: &EzFocusFixture, secrets: &Path, backups: &Path) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ezfocus.toml"
    ))
    .unwrap();
    crm_sync::fixtures::with_secret_files(&text, secrets, &ezfocus::EXAMPLE_SECRETS)
        .unwrap()
        .replace("http://127.0.0.1:8081", &fixture.base_url())
        .replace("./crm-sync-backups", &backups.display().to_string())
        .replace("retry_backoff = \"10s\"", "retry_backoff = \"50ms\"")
        .replace("[worker]", "[worker]\npoll_interval = \"100ms\"")
}
