//! crm-sync: scheduled CRM-to-warehouse syncs on a durable job queue kept in PostgreSQL.
//!
//! The crate is organised by domain:
//! - [`config`]: the TOML config file, validated as a whole (`crm-sync check-config`);
//! - [`db`]: connection pool and the embedded migrations of the `crm_sync` schema;
//! - [`queue`]: the durable step queue (enqueue, claim, complete, fail, lease, cancel, retry): thin Rust
//!   wrappers over the SQL functions in `migrations/`, which are the single source of truth;
//! - [`worker`]: the process that claims steps, runs them with timeouts and heartbeats, and reports back;
//! - [`pipeline`]: what a pipeline's steps are and how each one runs;
//! - [`registry`]: the pipelines, webhooks and live processes of every config using the database;
//! - [`sources`]: where data comes from (`noop`, `http_json`, `ezfocus`);
//! - [`backup`]: raw copies of every extract, the checkpoint later steps read;
//! - [`secrets`]: credentials from the environment or secret files, never from the config;
//! - [`private_fs`]: data and secret files created 0600 in 0700 directories;
//! - [`scheduler`]: cron ticks in time zones into runs, once per tick across replicas;
//! - [`transform`], [`validate`], [`destinations`]: cast to the declared [`schema`], gate, load atomically;
//! - [`keys`]: key values in errors and outputs shown as short hashes (`show_key_values` opts out);
//! - [`history`]: read-side queries over runs, steps and attempts (the run log);
//! - [`fixtures`]: stand-in EZ Focus and Qashier servers for tests and the demo;
//! - [`bench`]: the project's own benchmark commands;
//! - [`metrics`]: Prometheus metrics of the process and of the queue;
//! - [`api`]: the admin HTTP API (health, runs) served by `crm-sync serve`;
//! - [`notify`]: failure and recovery webhooks (Slack, JSON) from an outbox in PostgreSQL;
//! - [`retention`]: old run history deleted in small batches (`serve`, `crm-sync prune`);
//! - [`cli`]: the `crm-sync` command line.

pub mod api;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod destinations;
pub mod fixtures;
pub mod gcp;
pub mod history;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod private_fs;
pub mod queue;
pub mod registry;
pub mod retention;
pub mod scheduler;
pub mod schema;
pub mod secrets;
pub mod sources;
pub mod telemetry;
pub mod transform;
pub mod validate;
pub mod worker;
