//! Google Cloud: the `gcs` backup store and the `bigquery` destination of the EZ Focus pipeline.
//!
//! * [`gcs::GcsStore`]: streams the raw API answer (and the NDJSON staged for BigQuery) into Cloud
//!   Storage without holding the body in memory, hashing it on the way;
//! * [`bigquery::BigQueryLoader`]: replaces a BigQuery table atomically with a load job
//!   (`WRITE_TRUNCATE`, explicit schema) from a `gs://` URI. Never streaming inserts: rows streamed
//!   with `insertAll` cannot be truncated for up to 90 minutes, which breaks a daily full refresh.
//!
//! Every error carries an [`ErrorClass`] so that the job runner can tell "try again later" from
//! "stop and tell a person".
//!
//! TLS: the whole dependency tree uses rustls with the *ring* provider only (see Cargo.toml); the
//! constructors install it as the process default, see [`install_crypto_provider`].

pub mod bigquery;
pub mod error;
pub mod gcs;

use std::path::PathBuf;

pub use error::ErrorClass;

/// How a client authenticates to Google Cloud. Shared by GCS and BigQuery so that one config entry
/// serves both; no credential is ever read from the code or the config file itself, only a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcpAuth {
    /// No credentials at all: for the local emulators (fake-gcs-server, bqemulator).
    Anonymous,
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, the gcloud user file,
    /// or the metadata server when running on Google Cloud.
    ApplicationDefault,
    /// A service-account JSON key file at this path.
    ServiceAccountKeyFile(PathBuf),
}

/// `credentials = "application_default" | "anonymous" | { key_file = "/run/secrets/sa.json" }` in the
/// config of a `gcs` backup or a `bigquery` destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsConfig {
    /// `GOOGLE_APPLICATION_CREDENTIALS`, the gcloud user file, or the metadata server.
    #[default]
    ApplicationDefault,
    /// No credentials: the local emulators.
    Anonymous,
    /// A service-account key file (mounted as a secret).
    #[serde(untagged)]
    KeyFile { key_file: PathBuf },
}

impl From<&CredentialsConfig> for GcpAuth {
    fn from(c: &CredentialsConfig) -> Self {
        match c {
            CredentialsConfig::ApplicationDefault => GcpAuth::ApplicationDefault,
            CredentialsConfig::Anonymous => GcpAuth::Anonymous,
            CredentialsConfig::KeyFile { key_file } => {
                GcpAuth::ServiceAccountKeyFile(key_file.clone())
            }
        }
    }
}

/// Installs rustls' *ring* provider as the process-wide default, once.
///
/// Only ring is compiled in, so reqwest 0.12 (gcp-bigquery-client) would find it by itself, but
/// reqwest 0.13 (gcloud-storage) is built with `rustls-no-provider` and looks for the process
/// default. Calling this more than once, or after someone else installed ring, is harmless.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means a provider is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
