//! A small Cloud Storage object store: streamed uploads with digests, streamed downloads.
//!
//! Built on `gcloud-storage` (yoshidan/google-cloud-rust) rather than Google's own
//! `google-cloud-storage` SDK because, against fake-gcs-server 1.54 (our test emulator):
//! * its streamed simple upload works as is, while the SDK's single-shot upload sends a checksum
//!   part that fake-gcs stores as data and its resumable upload drops the port from `Host`;
//! * it shares the HTTP/TLS stack (hyper, rustls with ring) with gcp-bigquery-client, while the SDK
//!   brings another reqwest plus aws-lc-sys, the slowest crate of a cold build.
//!
//! Uploads are single streamed requests (`uploadType=media`, chunked body): GCS creates the object
//! only when the whole body arrived, so a failed upload never leaves a partial object behind, and
//! memory stays at one chunk. The raw EZ Focus answer is ~2 MB; if objects grow to hundreds of MB,
//! switch to the crate's resumable upload so that a broken connection resumes instead of restarting.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::Error as HttpError;
use gcloud_storage::http::buckets::get::GetBucketRequest;
use gcloud_storage::http::buckets::insert::{InsertBucketParam, InsertBucketRequest};
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::upload::{Media, UploadObjectRequest, UploadType};
use sha2::{Digest, Sha256};

use super::error::{ErrorClass, class_for_status, class_for_transport, error_chain, status_suffix};
use super::{GcpAuth, install_crypto_provider};

/// Authentication for [`GcsStore`]; the same enum serves BigQuery.
pub type GcsAuth = GcpAuth;

/// A stream of object bytes as returned by [`GcsStore::get_stream`].
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, GcsError>> + Send>>;

/// Connect timeout for every request. There is deliberately no total timeout: uploads and
/// downloads are streams whose length we do not bound here; the read timeout catches stalls.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence tolerated on an open connection before the request fails (retryable).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// What GCS stored, with digests of the bytes we actually sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// `gs://bucket/object`, ready for a BigQuery load job.
    pub uri: String,
    /// Bytes stored (checked against the bytes streamed).
    pub size: u64,
    /// SHA-256 of the body, computed while streaming; lowercase hex. For the run log / manifests.
    pub sha256_hex: String,
    /// CRC32C as GCS reports it (base64 of the big-endian u32); checked against ours when present.
    pub crc32c: Option<String>,
    /// MD5 as GCS reports it (base64); absent for composite objects.
    pub md5: Option<String>,
    /// Object generation (changes on every overwrite).
    pub generation: i64,
}

/// A failed storage operation, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum GcsError {
    /// Network trouble, timeouts, 408/429/5xx: try again later.
    #[error("GCS {op} failed{}, retryable: {message}", status_suffix(.status))]
    Retryable {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    /// 400/401/403/404/409, bad credentials, invalid request: retrying cannot help.
    #[error("GCS {op} failed{}: {message}", status_suffix(.status))]
    Terminal {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    /// The caller's body stream failed, so nothing was stored. Classed terminal from the store's
    /// side; whether the source is worth re-reading is the caller's call.
    #[error("GCS upload of {uri} aborted: the source stream failed: {message}")]
    Source { uri: String, message: String },
    /// GCS stored something other than what we streamed (size or CRC32C differ). Retryable: a
    /// fresh upload normally fixes corruption in transit.
    #[error("GCS upload of {uri} stored other bytes than sent: {message}")]
    Integrity { uri: String, message: String },
}

impl GcsError {
    /// Retryable or terminal.
    pub fn class(&self) -> ErrorClass {
        match self {
            GcsError::Retryable { .. } | GcsError::Integrity { .. } => ErrorClass::Retryable,
            GcsError::Terminal { .. } | GcsError::Source { .. } => ErrorClass::Terminal,
        }
    }

    /// Shorthand for `class() == ErrorClass::Retryable`.
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// The HTTP status behind the error, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            GcsError::Retryable { status, .. } | GcsError::Terminal { status, .. } => *status,
            GcsError::Source { .. } | GcsError::Integrity { .. } => None,
        }
    }

    fn new(op: &'static str, class: ErrorClass, status: Option<u16>, message: String) -> Self {
        match class {
            ErrorClass::Retryable => GcsError::Retryable {
                op,
                status,
                message,
            },
            ErrorClass::Terminal => GcsError::Terminal {
                op,
                status,
                message,
            },
        }
    }

    /// Classifies an error of the storage crate.
    fn from_http(op: &'static str, err: HttpError) -> Self {
        match err {
            HttpError::Response(resp) => {
                let class = class_for_status(resp.code);
                Self::new(op, class, Some(resp.code), resp.message)
            }
            HttpError::HttpClient(e) => Self::from_reqwest(op, &e),
            HttpError::RawResponse(e, detail) => {
                let mut gcs = Self::from_reqwest(op, &e);
                if let GcsError::Retryable { message, .. } | GcsError::Terminal { message, .. } =
                    &mut gcs
                {
                    message.push_str(&format!(" ({detail})"));
                }
                gcs
            }
            // We install no middleware, so this only wraps transport errors.
            HttpError::HttpMiddleware(e) => {
                Self::new(op, ErrorClass::Retryable, None, format!("{e:#}"))
            }
            // Unusable credentials (bad key file, revoked account): a person has to act.
            HttpError::TokenSource(e) => Self::new(
                op,
                ErrorClass::Terminal,
                None,
                format!("cannot get an access token: {}", error_chain(e.as_ref())),
            ),
            HttpError::InvalidRangeHeader(h) => Self::new(
                op,
                ErrorClass::Terminal,
                None,
                format!("invalid range header: {h}"),
            ),
        }
    }

    fn from_reqwest(op: &'static str, err: &reqwest13::Error) -> Self {
        let status = err.status().map(|s| s.as_u16());
        let class = class_for_transport(status, err.is_builder());
        Self::new(op, class, status, error_chain(err))
    }
}

/// Sizes and digests accumulated while the body streams through.
#[derive(Default)]
struct StreamDigests {
    size: u64,
    sha256: Sha256,
    crc32c: u32,
    source_error: Option<String>,
}

fn lock(digests: &Mutex<StreamDigests>) -> MutexGuard<'_, StreamDigests> {
    // Only this module touches the mutex and never panics while holding it.
    digests
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `gs://bucket/object`.
pub fn gs_uri(bucket: &str, object: &str) -> String {
    format!("gs://{bucket}/{object}")
}

/// Splits `gs://bucket/object` into its parts; `None` if it is not such a URI.
pub fn parse_gs_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("gs://")?;
    let (bucket, object) = rest.split_once('/')?;
    (!bucket.is_empty() && !object.is_empty()).then_some((bucket, object))
}

/// Content type from the object name, so that backups open sensibly in the console.
fn content_type_for(object: &str) -> &'static str {
    let ext = object.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("json") => "application/json",
        Some("ndjson") | Some("jsonl") => "application/x-ndjson",
        Some("csv") => "text/csv",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

/// Cloud Storage client for one project (or the emulator).
#[derive(Clone)]
pub struct GcsStore {
    client: Client,
    project: Option<String>,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

impl GcsStore {
    /// Builds a client.
    ///
    /// * `endpoint`: `None` for production (`https://storage.googleapis.com`), or the emulator's
    ///   base URL such as `http://127.0.0.1:4443`.
    /// * `project`: needed only to create buckets; with credentials it defaults to theirs.
    /// * `auth`: [`GcpAuth::Anonymous`] for the emulator.
    pub async fn new(
        endpoint: Option<String>,
        project: Option<String>,
        auth: GcsAuth,
    ) -> Result<Self, GcsError> {
        install_crypto_provider();
        let http = reqwest13::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| GcsError::from_reqwest("client setup", &e))?;
        let mut config = ClientConfig {
            http: Some(reqwest_middleware::ClientBuilder::new(http).build()),
            project_id: project.clone(),
            ..Default::default()
        };
        if let Some(endpoint) = endpoint {
            config.storage_endpoint = endpoint.trim_end_matches('/').to_string();
        }
        let auth_error = |e: gcloud_storage::client::google_cloud_auth::error::Error| {
            GcsError::new(
                "authentication setup",
                ErrorClass::Terminal,
                None,
                error_chain(&e),
            )
        };
        let config = match auth {
            GcpAuth::Anonymous => config.anonymous(),
            GcpAuth::ApplicationDefault => config.with_auth().await.map_err(auth_error)?,
            GcpAuth::ServiceAccountKeyFile(path) => {
                let file = CredentialsFile::new_from_file(path.to_string_lossy().into_owned())
                    .await
                    .map_err(auth_error)?;
                config.with_credentials(file).await.map_err(auth_error)?
            }
        };
        // An explicit project wins over the one found in the credentials.
        let project = project.or_else(|| config.project_id.clone());
        Ok(Self {
            client: Client::new(config),
            project,
        })
    }

    /// Streams `body` into `gs://bucket/object`, replacing any existing object.
    ///
    /// Holds one chunk at a time; size, SHA-256 and CRC32C are computed on the way and the size and
    /// CRC32C are checked against what GCS reports. If `body` yields an error the upload is
    /// aborted, nothing is stored, and [`GcsError::Source`] carries the error's text.
    pub async fn put_stream<S, E>(
        &self,
        bucket: &str,
        object: &str,
        body: S,
    ) -> Result<ObjectInfo, GcsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + 'static,
    {
        let uri = gs_uri(bucket, object);
        let digests = Arc::new(Mutex::new(StreamDigests::default()));
        let tap = Arc::clone(&digests);
        let body = body.map(move |item| match item {
            Ok(chunk) => {
                let mut d = lock(&tap);
                d.size += chunk.len() as u64;
                d.sha256.update(&chunk);
                d.crc32c = crc32c::crc32c_append(d.crc32c, &chunk);
                Ok(chunk)
            }
            Err(e) => {
                let e: Box<dyn StdError + Send + Sync> = e.into();
                lock(&tap).source_error = Some(error_chain(e.as_ref()));
                Err(e)
            }
        });

        let mut media = Media::new(object.to_string());
        media.content_type = content_type_for(object).into();
        let request = UploadObjectRequest {
            bucket: bucket.to_string(),
            ..Default::default()
        };
        let result = self
            .client
            .upload_streamed_object(&request, body, &UploadType::Simple(media))
            .await;

        let (size, sha256, crc32c, source_error) = {
            let mut d = lock(&digests);
            let sha256 = std::mem::take(&mut d.sha256).finalize();
            (d.size, sha256, d.crc32c, d.source_error.take())
        };
        if let Some(message) = source_error {
            return Err(GcsError::Source { uri, message });
        }
        let stored = result.map_err(|e| GcsError::from_http("upload", e))?;

        if u64::try_from(stored.size).ok() != Some(size) {
            return Err(GcsError::Integrity {
                uri,
                message: format!("sent {size} bytes, GCS reports {}", stored.size),
            });
        }
        if let Some(reported) = &stored.crc32c {
            let ours = base64::engine::general_purpose::STANDARD.encode(crc32c.to_be_bytes());
            if *reported != ours {
                return Err(GcsError::Integrity {
                    uri,
                    message: format!("CRC32C sent {ours}, GCS reports {reported}"),
                });
            }
        }
        Ok(ObjectInfo {
            uri,
            size,
            sha256_hex: hex::encode(sha256),
            crc32c: stored.crc32c,
            md5: stored.md5_hash,
            generation: stored.generation,
        })
    }

    /// Streams the object's bytes. Errors before the first byte (404, 403, connection refused)
    /// come from this call; errors while reading come from the stream (retryable).
    pub async fn get_stream(&self, bucket: &str, object: &str) -> Result<ByteStream, GcsError> {
        let request = GetObjectRequest {
            bucket: bucket.to_string(),
            object: object.to_string(),
            ..Default::default()
        };
        let stream = self
            .client
            .download_streamed_object(&request, &Range::default())
            .await
            .map_err(|e| GcsError::from_http("download", e))?;
        Ok(Box::pin(
            stream.map_err(|e| GcsError::from_http("download (body)", e)),
        ))
    }

    /// Whether the object exists (404 means `false`, not an error).
    pub async fn exists(&self, bucket: &str, object: &str) -> Result<bool, GcsError> {
        let request = GetObjectRequest {
            bucket: bucket.to_string(),
            object: object.to_string(),
            ..Default::default()
        };
        match self.client.get_object(&request).await {
            Ok(_) => Ok(true),
            Err(e) => match GcsError::from_http("get object", e) {
                e if e.status() == Some(404) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Deletes the object; `Ok(false)` if it was already gone, so retries are idempotent.
    pub async fn delete(&self, bucket: &str, object: &str) -> Result<bool, GcsError> {
        let request = DeleteObjectRequest {
            bucket: bucket.to_string(),
            object: object.to_string(),
            ..Default::default()
        };
        match self.client.delete_object(&request).await {
            Ok(()) => Ok(true),
            Err(e) => match GcsError::from_http("delete", e) {
                e if e.status() == Some(404) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Creates the bucket unless it exists (for the emulator and tests; production buckets are
    /// provisioned, with their location and retention, outside crm-sync). `Ok(true)` if created.
    pub async fn ensure_bucket(&self, bucket: &str) -> Result<bool, GcsError> {
        let get = GetBucketRequest {
            bucket: bucket.to_string(),
            ..Default::default()
        };
        match self.client.get_bucket(&get).await {
            Ok(_) => return Ok(false),
            Err(e) => match GcsError::from_http("get bucket", e) {
                e if e.status() == Some(404) => {}
                e => return Err(e),
            },
        }
        let project = self.project.clone().ok_or_else(|| {
            GcsError::new(
                "create bucket",
                ErrorClass::Terminal,
                None,
                "no project configured".into(),
            )
        })?;
        let insert = InsertBucketRequest {
            name: bucket.to_string(),
            param: InsertBucketParam {
                project,
                ..Default::default()
            },
            ..Default::default()
        };
        match self.client.insert_bucket(&insert).await {
            Ok(_) => Ok(true),
            Err(e) => match GcsError::from_http("create bucket", e) {
                // Someone else created it between our get and insert.
                e if e.status() == Some(409) => Ok(false),
                e => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gs_uris_round_trip() {
        assert_eq!(gs_uri("b", "a/c.json"), "gs://b/a/c.json");
        assert_eq!(parse_gs_uri("gs://b/a/c.json"), Some(("b", "a/c.json")));
        assert_eq!(parse_gs_uri("gs://b/"), None);
        assert_eq!(parse_gs_uri("s3://b/o"), None);
    }

    #[test]
    fn content_types_follow_extensions() {
        assert_eq!(content_type_for("accounts/raw/a.json"), "application/json");
        assert_eq!(content_type_for("x.NDJSON"), "application/x-ndjson");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
    }
}
