//! docker-compose.yml ships no known credentials and nothing on every interface: every token and
//! password must be set in .env (`${VAR:?message}` saying how to make one), every published port is
//! bound to 127.0.0.1 unless CRM_SYNC_BIND_ADDRESS says otherwise, Grafana's admin password is
//! required, and `deploy/compose/new-env.sh` writes a private .env that satisfies it all. No Docker
//! engine here, so the file is read as compose reads it.

use super::common;

use std::collections::BTreeMap;
use std::process::Command;

use common::compose::{Reference, compose, interpolate, read, references, repo};

/// Variables with a default: options that hold no secret.
const OPTIONS: [&str; 1] = ["CRM_SYNC_BIND_ADDRESS"];
/// Credentials of the CRMs: they come from the vendor, so the message says where, not how to
/// generate one.
const CRM_CREDENTIALS: [&str; 5] = [
    "EZFOCUS_ACCOUNTS_KEY",
    "EZFOCUS_USERNAME",
    "EZFOCUS_PASSWORD",
    "QASHIER_USERNAME",
    "QASHIER_PASSWORD",
];

#[test]
fn every_secret_must_be_set_with_a_message_saying_how_to_make_one() {
    let text = read("docker-compose.yml");
    let refs = references(&text);
    assert!(refs.len() >= 10, "{refs:?}");
    for (_, r) in &refs {
        match r {
            Reference::Default(name, _) => assert!(
                OPTIONS.contains(&name.as_str()),
                "${{{name}:-...}} gives a default to what may be a secret: use ${{{name}:?message}}"
            ),
            Reference::Plain(name) => panic!("${{{name}}} may expand to nothing: use :?"),
            Reference::Required(name, message) => {
                assert!(
                    message.contains(name) && message.contains(".env"),
                    "{name}: {message}"
                );
                if !CRM_CREDENTIALS.contains(&name.as_str()) {
                    // API tokens need 16 distinct characters, which hex gives only 3 times in 4.
                    let how = if name.ends_with("_TOKENS") {
                        "openssl rand -base64 32"
                    } else {
                        "openssl rand -hex 32"
                    };
                    assert!(
                        message.contains(how),
                        "{name}: the message must say how to generate one ({how}): {message}"
                    );
                }
            }
        }
    }
    // No environment value of any service is a literal secret.
    let doc = compose();
    for (service, s) in doc["services"].as_mapping().unwrap() {
        let Some(env) = s["environment"].as_mapping() else {
            continue;
        };
        for (key, value) in env {
            let (key, value) = (key.as_str().unwrap(), value.as_str().unwrap_or(""));
            if ["PASSWORD", "TOKEN", "KEY", "USERNAME", "DATABASE_URL"]
                .iter()
                .any(|w| key.contains(w))
            {
                assert!(
                    references(value)
                        .iter()
                        .any(|(_, r)| matches!(r, Reference::Required(..))),
                    "{service:?}: {key} = {value} is not a required variable"
                );
            }
        }
    }
    let grafana = doc["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        .as_str()
        .unwrap();
    assert!(
        grafana.starts_with("${GRAFANA_ADMIN_PASSWORD:?"),
        "{grafana}"
    );
    // Without a .env, compose refuses to start, naming the first missing variable.
    let err = interpolate(&text, &BTreeMap::new()).unwrap_err();
    assert!(err.contains("openssl rand -hex 32"), "{err}");
}

/// The published ports of every service, expanded from `env`.
fn published(env: &BTreeMap<String, String>) -> Vec<String> {
    let doc = compose();
    let mut out = Vec::new();
    for (_, s) in doc["services"].as_mapping().unwrap() {
        for port in common::compose::strings(&s["ports"]) {
            out.push(interpolate(&port, env).unwrap());
        }
    }
    out
}

#[test]
fn ports_are_published_on_localhost_unless_the_user_opts_in() {
    let ports = published(&BTreeMap::new());
    assert_eq!(
        ports,
        [
            "127.0.0.1:8080:8080",
            "127.0.0.1:9090:9090",
            "127.0.0.1:3000:3000"
        ]
    );
    let everywhere = BTreeMap::from([("CRM_SYNC_BIND_ADDRESS".into(), "0.0.0.0".into())]);
    assert!(
        published(&everywhere)
            .iter()
            .all(|p| p.starts_with("0.0.0.0:")),
        "{ports:?}"
    );
    // Nothing else publishes a port (PostgreSQL, the workers' metrics, the stand-in CRMs).
    let doc = compose();
    for (name, s) in doc["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if !["crm-sync", "prometheus", "grafana"].contains(&name) {
            assert!(s.get("ports").is_none(), "{name} publishes ports");
        }
    }
}

#[test]
fn crm_sync_logs_in_as_the_role_the_init_script_creates_not_as_the_superuser() {
    let doc = compose();
    let postgres = &doc["services"]["postgres"];
    assert!(
        postgres["environment"].get("POSTGRES_USER").is_none(),
        "the superuser keeps its own name (postgres)"
    );
    let volumes = common::compose::strings(&postgres["volumes"]);
    assert!(
        volumes.contains(&"./deploy/compose/postgres-init:/docker-entrypoint-initdb.d:ro".into()),
        "{volumes:?}"
    );
    let init = read("deploy/compose/postgres-init/10-crm-sync-role.sh");
    assert!(
        init.contains("-v role=crm_sync -v database=crm_sync")
            && init.contains("-f /docker-entrypoint-initdb.d/crm-sync-role.psql"),
        "{init}"
    );
    let url = doc["services"]["crm-sync"]["environment"]["DATABASE_URL"]
        .as_str()
        .unwrap();
    assert!(
        url.starts_with("postgres://crm_sync:${CRM_SYNC_DB_PASSWORD:?")
            && url.ends_with("@postgres:5432/crm_sync"),
        "{url}"
    );
    // The init script reads the same password.
    assert!(
        postgres["environment"]["CRM_SYNC_DB_PASSWORD"]
            .as_str()
            .unwrap()
            .starts_with("${CRM_SYNC_DB_PASSWORD:?")
    );
    // The image's entry point runs only *.sh, *.sql and compressed *.sql files: the psql file is
    // run by the script alone, with its variables.
    for entry in std::fs::read_dir(repo().join("deploy/compose/postgres-init")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(name.ends_with(".sh") || name.ends_with(".psql"), "{name}");
    }
}

#[test]
fn new_env_writes_a_private_env_file_that_compose_accepts_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    let script = repo().join("deploy/compose/new-env.sh");
    let run = || {
        Command::new(&script)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.path().join(".env");
    assert_eq!(crm_sync::private_fs::mode(&path).unwrap(), 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let env: BTreeMap<String, String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let compose_text = read("docker-compose.yml");
    interpolate(&compose_text, &env).expect("every required variable is set");
    let generated: Vec<&String> = env
        .iter()
        .filter(|(k, _)| !CRM_CREDENTIALS.contains(&k.as_str()))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(generated.len(), 5, "{env:?}");
    for (k, v) in env
        .iter()
        .filter(|(k, _)| !CRM_CREDENTIALS.contains(&k.as_str()))
    {
        if k.ends_with("_TOKENS") {
            // serve's own check: 16 distinct characters, no placeholder.
            crm_sync::api::check_token_strength(k, std::slice::from_ref(v))
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            assert!(
                v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit()),
                "{k}: {v}"
            );
        }
    }
    let distinct: std::collections::BTreeSet<_> = generated.iter().collect();
    assert_eq!(distinct.len(), generated.len(), "values repeat");

    // A second run leaves the file alone and says why.
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("cannot write .env"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}
