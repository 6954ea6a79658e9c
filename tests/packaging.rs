//! The shipped Dockerfile and docker-compose.yml cannot run here (no Docker engine), so they are
//! checked against the code: the compose file parses, every crm-sync service runs a command line
//! the binary accepts with only environment variables it reads, the compose config passes
//! check-config, ports agree everywhere, and the image builds from the files the build needs.

mod common;
#[path = "packaging/compose_database_role.rs"]
mod compose_database_role;
#[path = "packaging/compose_security.rs"]
mod compose_security;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::compose::{compose, interpolate, read, repo, strings};
use serde_yaml_ng::Value;

/// The services that run the crm-sync image, with their command lines.
fn crm_sync_services(doc: &Value) -> Vec<(String, &Value)> {
    doc["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .filter(|(_, s)| s["image"].as_str() == Some("crm-sync:latest"))
        .map(|(name, s)| (name.as_str().unwrap().to_string(), s))
        .collect()
}

/// The names that follow `prefix` in quotes, e.g. `var("` -> DATABASE_URL.
fn quoted_after(text: &str, prefix: &str) -> Vec<String> {
    text.match_indices(prefix)
        .filter_map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest.find('"')?;
            let name = &rest[..end];
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| name.to_string())
        })
        .collect()
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every environment variable the binary reads: clap `env = ..` arguments, `std::env::var(..)`,
/// the token lists (and their `_FILE` forms), `RUST_LOG`, plus the secret references of `config`.
fn known_env(config: &str) -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_sources(&repo().join("src"), &mut files);
    let mut known = BTreeSet::from(["RUST_LOG".to_string()]);
    for file in files {
        if file.components().any(|c| c.as_os_str() == "fixtures") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        known.extend(quoted_after(&text, "var(\""));
        known.extend(quoted_after(&text, "var_os(\""));
        for name in quoted_after(&text, "load(\"") {
            known.insert(format!("{name}_FILE"));
            known.insert(name);
        }
        known.extend(
            quoted_after(&text, "env = \"")
                .into_iter()
                .filter(|n| n.starts_with("CRM_SYNC_")),
        );
    }
    known.extend(quoted_after(config, "{ env = \""));
    known
}

#[test]
fn compose_services_use_only_commands_and_variables_the_binary_knows() {
    let doc = compose();
    let config = read("deploy/compose/crm-sync.toml");
    let known = known_env(&config);
    assert!(known.contains("DATABASE_URL") && known.contains("CRM_SYNC_ADMIN_TOKENS"));
    let services = crm_sync_services(&doc);
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["migrate", "crm-sync", "worker", "ezfocus", "qashier"] {
        assert!(
            names.contains(&expected),
            "service {expected} missing: {names:?}"
        );
    }
    for (name, service) in &services {
        let command = strings(&service["command"]);
        assert!(!command.is_empty(), "{name} has no command");
        // The binary accepts the exact command line (clap rejects unknown subcommands and flags
        // before it answers --help).
        let out = Command::new(common::binary())
            .args(&command)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: `crm-sync {}` is not a command line the binary accepts: {}",
            command.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(env) = service["environment"].as_mapping() {
            for (key, _) in env {
                let key = key.as_str().unwrap();
                assert!(
                    known.contains(key),
                    "{name}: environment variable {key} is not read by crm-sync (known: {known:?})"
                );
            }
        }
        if let Some(volumes) = service["volumes"].as_sequence() {
            for v in volumes {
                let source = v.as_str().unwrap().split(':').next().unwrap();
                if source.starts_with("./") {
                    assert!(
                        repo().join(source).exists(),
                        "{name} mounts missing {source}"
                    );
                }
            }
        }
    }
    // Roles: one serve without workers, scalable workers exporting metrics on 9464.
    let serve = strings(&doc["services"]["crm-sync"]["command"]);
    assert_eq!(serve, ["serve", "--no-workers"]);
    let worker = strings(&doc["services"]["worker"]["command"]);
    assert!(
        worker.join(" ").contains("--listen 0.0.0.0:9464"),
        "{worker:?}"
    );
    // The other services' files exist where they are mounted from.
    for service in ["prometheus", "grafana"] {
        for v in doc["services"][service]["volumes"].as_sequence().unwrap() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                repo().join(source).exists(),
                "{service} mounts missing {source}"
            );
        }
    }
}

#[test]
fn the_compose_config_passes_check_config_with_the_compose_environment() {
    let doc = compose();
    let env = doc["services"]["crm-sync"]["environment"]
        .as_mapping()
        .unwrap();
    let mut cmd = Command::new(common::binary());
    cmd.arg("--config")
        .arg(repo().join("deploy/compose/crm-sync.toml"))
        .arg("check-config");
    // Every required variable set (as a .env would), the others at their defaults.
    let dotenv: BTreeMap<String, String> = common::compose::references(&read("docker-compose.yml"))
        .into_iter()
        .map(|(_, r)| {
            (
                r.name().to_string(),
                "a-stand-in-value-0123456789abcdef".into(),
            )
        })
        .filter(|(name, _)| name != "CRM_SYNC_BIND_ADDRESS")
        .collect();
    for (k, v) in env {
        let expanded = interpolate(v.as_str().unwrap(), &dotenv).unwrap();
        cmd.env(k.as_str().unwrap(), expanded);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config = read("deploy/compose/crm-sync.toml");
    assert!(config.contains("listen = \"0.0.0.0:8080\""));
    assert!(config.contains("http://ezfocus:8081") && config.contains("http://qashier:8082"));
    assert!(config.contains("/var/lib/crm-sync/backups"));
}

#[test]
fn ports_agree_across_dockerfile_compose_config_and_prometheus() {
    let doc = compose();
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("EXPOSE 8080"));
    let ports = strings(&doc["services"]["crm-sync"]["ports"]);
    assert_eq!(ports, ["${CRM_SYNC_BIND_ADDRESS:-127.0.0.1}:8080:8080"]);
    let prometheus = read("deploy/prometheus/prometheus.yml");
    assert!(prometheus.contains("\"crm-sync:8080\""));
    assert!(prometheus.contains("names: [\"worker\"]") && prometheus.contains("port: 9464"));
    let datasource = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(datasource.contains("http://prometheus:9090"));
    assert_eq!(
        strings(&doc["services"]["prometheus"]["ports"]),
        ["${CRM_SYNC_BIND_ADDRESS:-127.0.0.1}:9090:9090"]
    );
    let ezfocus = strings(&doc["services"]["ezfocus"]["command"]);
    assert!(ezfocus.ends_with(&["--port".to_string(), "8081".to_string()]));
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_healthcheck_the_binary_answers() {
    let dockerfile = read("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(froms[1].contains("-slim"), "small runtime base: {froms:?}");
    // The builder's Rust is at least the crate's rust-version.
    let manifest = read("Cargo.toml");
    let rust_version = quoted_after(&manifest, "rust-version = \"").join("");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap_or(rust_version);
    assert!(
        froms[0].contains(&format!("rust:{rust_version}")),
        "{} vs rust-version {rust_version}",
        froms[0]
    );
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(dockerfile.contains("useradd --system --uid 10001"));
    assert!(dockerfile.contains(
        "CMD [\"crm-sync\", \"healthcheck\", \"--url\", \"http://127.0.0.1:8080/healthz\"]"
    ));
    // Everything the build reads is copied into the build stage.
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "migrations",
        "examples",
    ] {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY ") && !l.contains("--from") && l.contains(path)),
            "the build stage does not copy {path}"
        );
    }
    for var in ["CRM_SYNC_CONFIG", "CRM_SYNC_LOG_FORMAT"] {
        assert!(known_env("").contains(var), "{var}");
        assert!(dockerfile.contains(var));
    }
}

#[tokio::test]
async fn healthcheck_exits_zero_on_a_healthy_server_and_one_otherwise() {
    let db = common::TestDb::new().await;
    let config = db.config("").await;
    let server = common::ApiServer::start(
        &db,
        &config,
        "Pa6Kq2Vw9Nx4Lp7Rb3Hm8Zc5Jd",
        "Pr3Xn7Qw5Vk9Lb2Pz8Hc4Mj6Yd",
    )
    .await;
    let ok = tokio::process::Command::new(common::binary())
        .args(["healthcheck", "--url", &format!("{}/healthz", server.base)])
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let port = common::emulators::free_port();
    let down = tokio::process::Command::new(common::binary())
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz"),
            "--timeout",
            "2s",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("Connection refused"));
    let missing = tokio::process::Command::new(common::binary())
        .args(["healthcheck", "--url", &format!("{}/nope", server.base)])
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
}
