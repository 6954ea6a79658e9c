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

/// The bucket and project the GCP variant uses against the emulators.
pub const BUCKET: &str = "crm-sync-test";
pub const PROJECT: &str = "test";

/// `examples/ezfocus_gcp.toml` on `fixture`, fake-gcs-server at `gcs_endpoint` and bqemulator at
/// `bq_url` (anonymous credentials), secrets in files under `secrets`, up to 30 attempts with
/// 100-500 ms backoff (emulator outages in tests last seconds), fast polling.
pub fn gcp_example_config(
    fixture: &EzFocusFixture,
    secrets: &Path,
    gcs_endpoint: &str,
    bq_url: &str,
) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ezfocus_gcp.toml"
    ))
    .unwrap();
    let text = crm_sync::fixtures::with_secret_files(&text, secrets, &ezfocus::EXAMPLE_SECRETS)
        .unwrap()
        .replace("http://127.0.0.1:8081", &fixture.base_url())
        .replace("my-company-crm-backups", BUCKET)
        .replace("my-gcp-project", PROJECT)
        .replace(
            "credentials = \"application_default\"\n\n[pipelines.transform]",
            &format!(
                "credentials = \"anonymous\"\nendpoint = \"{gcs_endpoint}\"\n\n[pipelines.transform]"
            ),
        )
        .replace(
            "table = \"Accounts_List\"\ncredentials = \"application_default\"",
            &format!("table = \"Accounts_List\"\ncredentials = \"anonymous\"\nendpoint = \"{bq_url}\""),
        )
        .replace("max_attempts = 5", "max_attempts = 30")
        .replace(
            "retry_backoff = \"10s\"",
            "retry_backoff = \"100ms\"\nretry_backoff_max = \"500ms\"",
        )
        .replace("[worker]", "[worker]\npoll_interval = \"100ms\"");
    assert!(
        !text.contains("credentials = \"application_default\""),
        "{text}"
    );
    text
}
