//! `crm-sync check-config` (the real binary) fed malformed and hostile config files: huge numbers,
//! negative and endless durations, NUL and non-UTF-8 bytes, 10 MB strings, deep nesting, wrong types,
//! unknown keys in every table, path traversal, SQL in names, bad time zones and cron, literal
//! secrets, duplicate keys. Each must exit 1 quickly with errors naming the line and the field,
//! never panic, never echo a secret and never print a huge line.

use std::process::Command;
use std::time::{Duration, Instant};

/// A recognisable value written where a secret reference belongs: it must never be printed.
const LITERAL_SECRET: &str = "LITERAL-SECRET-8d2f6c";

const EZFOCUS_SOURCE: &str = r#"source = { kind = "ezfocus", base_url = "http://127.0.0.1:1", key = { env = "K" }, username = { env = "U" }, password = { env = "P" } }"#;

/// One file and the words its report must contain (each names a line and a field).
struct Case {
    name: &'static str,
    text: Vec<u8>,
    expect: Vec<String>,
}

fn case(name: &'static str, text: impl Into<Vec<u8>>, expect: &[&str]) -> Case {
    Case {
        name,
        text: text.into(),
        expect: expect.iter().map(|s| s.to_string()).collect(),
    }
}

fn noop(name: &str, extra: &str) -> String {
    format!("[[pipelines]]\nname = \"{name}\"\n{extra}\nsource = {{ kind = \"noop\" }}\n")
}

fn cases() -> Vec<Case> {
    let deep_array = format!("x = {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let deep_inline = format!("x = {}1{}\n", "{ a = ".repeat(5_000), " }".repeat(5_000));
    let deep_tables = format!("[{}]\n", vec!["a"; 5_000].join("."));
    let many: String = (0..20_000)
        .map(|i| {
            format!(
                "[[pipelines]]\nname = \"p{i}\"\nsource = {{ kind = \"noop\", steps = 99999 }}\n"
            )
        })
        .collect();
    vec![
        // Numbers.
        case(
            "an integer past i64",
            "[worker]\nconcurrency = 99999999999999999999999\n",
            &["case.toml:2: syntax: invalid type: integer"],
        ),
        case(
            "numbers out of range and of the wrong kind",
            format!(
                "[worker]\nconcurrency = 9223372036854775807\n{}{}{}{}",
                noop("a", "max_attempts = 1.5"),
                noop("b", "max_attempts = inf"),
                noop("c", "max_attempts = 4294967296"),
                noop("d", "max_concurrent_runs = -1"),
            ),
            &[
                "case.toml:1: worker.concurrency: must be between 1 and 10000",
                "case.toml:3: pipelines[0] \"a\".max_attempts: invalid type: floating point `1.5`, expected u32",
                "pipelines[1] \"b\".max_attempts: invalid type: floating point `inf`",
                "pipelines[2] \"c\".max_attempts: invalid value: integer `4294967296`, expected u32",
                "pipelines[3] \"d\".max_concurrent_runs: invalid value: integer `-1`, expected u32",
            ],
        ),
        case(
            "worker limits",
            "[worker]\nclaim_batch = 0\nmax_connections = 1\npoll_interval = \"0s\"\n",
            &[
                "worker.claim_batch: must be between 1 and 10000",
                "worker.max_connections: must be at least 2",
                "worker.poll_interval: must be greater than zero",
            ],
        ),
        // Durations.
        case(
            "a negative duration",
            noop("a", "step_timeout = \"-5s\""),
            &["case.toml:1: pipelines[0] \"a\".step_timeout: invalid duration \"-5s\""],
        ),
        case(
            "an unparseable duration",
            noop("a", "retry_backoff = \"99999999999999999999y\""),
            &[
                "pipelines[0] \"a\".retry_backoff: invalid duration",
                "number is too large",
            ],
        ),
        case(
            "a duration past 10 years",
            noop("a", "freshness_sla = \"500000000y\""),
            &["pipelines[0] \"a\".freshness_sla: duration \"500000000y\" is longer than 10 years"],
        ),
        case(
            "an endless lease",
            "[worker]\nlease = \"300y\"\n",
            &["case.toml:1: worker.lease: duration \"300y\" is longer than 10 years"],
        ),
        case(
            "a lease past a day",
            "[worker]\nlease = \"2d\"\n",
            &["worker.lease: must be between 300ms and 24h"],
        ),
        case(
            "an empty duration",
            noop("a", "step_timeout = \"\""),
            &["pipelines[0] \"a\".step_timeout: invalid duration \"\""],
        ),
        case(
            "a zero step timeout",
            noop("a", "step_timeout = \"0s\""),
            &["pipelines[0] \"a\".step_timeout: must be greater than zero"],
        ),
        // Bytes.
        case(
            "a raw NUL byte",
            "[[pipelines]]\nname = \"a\0b\"\nsource = { kind = \"noop\" }\n",
            &["case.toml:2: syntax: invalid basic string"],
        ),
        case(
            "an escaped NUL in a name",
            noop("a\\u0000b", ""),
            &["pipelines[0] \"a\\0b\".name: \"a\\0b\" is not a valid pipeline name"],
        ),
        case(
            "non-UTF-8 bytes",
            b"[worker]\nconcurrency = 2\n# \xff\xfe\n".to_vec(),
            &["file: cannot read the config file: stream did not contain valid UTF-8"],
        ),
        case(
            "a 10 MB name",
            noop(&"x".repeat(10_000_000), ""),
            &[
                "case.toml:1: pipelines[0] \"xxxxxxxx",
                "...\".name",
                "is not a valid pipeline name",
            ],
        ),
        case(
            "a 10 MB comment",
            format!("# {}\n[worker]\nconcurrency = 0\n", "c".repeat(10_000_000)),
            &["case.toml:2: worker.concurrency"],
        ),
        case(
            "20,000 pipelines",
            many,
            &[
                "20000 problems found",
                "case.toml:59998: pipelines[19999] \"p19999\".source: noop steps must be between 1 and 50",
            ],
        ),
        // Nesting.
        case(
            "arrays nested 100,000 deep",
            deep_array,
            &["case.toml:1: syntax:", "recursion"],
        ),
        case(
            "inline tables nested 5,000 deep",
            deep_inline,
            &["case.toml:1: syntax:", "recursion"],
        ),
        case(
            "dotted tables 5,000 deep",
            deep_tables,
            &["syntax: recursion limit"],
        ),
        // Types and keys.
        case(
            "wrong types",
            format!(
                "[worker]\nconcurrency = \"eight\"\n[[pipelines]]\nname = 5\nsource = {{ kind = \"noop\" }}\n{}{}",
                noop("b", "enabled = \"yes\""),
                "[[pipelines]]\nname = \"c\"\nsource = \"noop\"\n"
            ),
            &[
                "case.toml:1: worker.concurrency: invalid type: string \"eight\", expected usize",
                "case.toml:3: pipelines[0].name: invalid type: integer `5`, expected a string",
                "pipelines[1] \"b\".enabled: invalid type: string \"yes\", expected a boolean",
                "pipelines[2] \"c\".source: invalid type: string \"noop\"",
            ],
        ),
        case(
            "an unknown top-level key",
            "databse_url = \"postgres://x\"\n",
            &["case.toml:1: syntax: unknown field `databse_url`"],
        ),
        case(
            "unknown keys in every table",
            format!(
                "[worker]\ncolour = 1\n[server]\ncolour = 2\n[[pipelines]]\nname = \"a\"\nsource = {{ kind = \"noop\", colour = 3 }}\n{}{}[[notifications.webhooks]]\nname = \"w\"\nurl = {{ env = \"X\", colour = 5 }}\nformat = \"json\"\n",
                noop("b", "colour = 4"),
                "[[pipelines]]\nname = \"c\"\nbackup = { kind = \"local\", colour = 6 }\nsource = { kind = \"noop\" }\n",
            ),
            &[
                "case.toml:1: worker.colour: unknown field `colour`",
                "case.toml:3: server.colour: unknown field `colour`",
                "case.toml:5: pipelines[0] \"a\".source.colour: unknown field `colour`",
                "pipelines[1] \"b\".colour: unknown field `colour`",
                "pipelines[2] \"c\".backup.colour: unknown field `colour`",
                "notifications.webhooks[0] \"w\".url: unknown field `colour`",
            ],
        ),
        case(
            "a duplicate key",
            "[worker]\nconcurrency = 1\nconcurrency = 2\n",
            &["case.toml:3: syntax: duplicate key"],
        ),
        case(
            "a duplicate table",
            "[worker]\nconcurrency = 1\n[worker]\nconcurrency = 2\n",
            &["case.toml:3: syntax: duplicate key"],
        ),
        case(
            "a duplicate pipeline name",
            format!("{}{}", noop("a", ""), noop("a", "")),
            &["case.toml:5: pipelines[1] \"a\".name: pipeline name \"a\" is used more than once"],
        ),
        // Names and paths.
        case(
            "path traversal in a pipeline name",
            noop("../../etc/passwd", ""),
            &[
                "pipelines[0] \"../../etc/passwd\".name: \"../../etc/passwd\" is not a valid pipeline name",
            ],
        ),
        case(
            "pipeline names that are or start with dots (backup directories)",
            format!("{}{}{}", noop("..", ""), noop(".", ""), noop("-rf", "")),
            &[
                "case.toml:1: pipelines[0] \"..\".name: \"..\" is not a valid pipeline name (1-64 characters: letters, digits, '_', '-', '.', starting with a letter, a digit or '_')",
                "case.toml:5: pipelines[1] \".\".name: \".\" is not a valid pipeline name",
                "case.toml:9: pipelines[2] \"-rf\".name: \"-rf\" is not a valid pipeline name",
            ],
        ),
        case(
            "path traversal in a backup path",
            format!(
                "[[pipelines]]\nname = \"a\"\n{EZFOCUS_SOURCE}\nbackup = {{ kind = \"local\", dir = \"/tmp\", path = \"../../../etc/{{date}}.json\" }}\n"
            ),
            &[
                "pipelines[0] \"a\".backup: backup path \"../../../etc/{date}.json\" must be relative and must not contain \"..\"",
            ],
        ),
        case(
            "SQL in table and column names",
            format!(
                "[[pipelines]]\nname = \"a\"\n{EZFOCUS_SOURCE}\ntransform = {{ kind = \"json\", columns = [ {{ name = \"x\\\"; DROP TABLE crm_sync.runs; --\", type = \"string\" }} ] }}\ndestination = {{ kind = \"postgres\", table = \"public.t; DROP TABLE x\" }}\n"
            ),
            &[
                "pipelines[0] \"a\".transform: column name \"x\"; DROP TABLE crm_sync.runs; --\" must be letters, digits and '_'",
                "pipelines[0] \"a\".destination: table \"public.t; DROP TABLE x\" must be schema.table",
            ],
        ),
        case(
            "a webhook name with a path",
            "[[notifications.webhooks]]\nname = \"../x\"\nurl = { env = \"X\" }\nformat = \"json\"\n",
            &["notifications.webhooks[0] \"../x\".name: \"../x\" is not a valid webhook name"],
        ),
        // Time zones and cron.
        case(
            "bad time zones and cron",
            format!(
                "{}{}{}{}",
                noop(
                    "a",
                    "schedule = \"0 1 * * *\"\ntimezone = \"../../../etc/localtime\""
                ),
                noop("b", "schedule = \"99999999999999999999 * * * *\""),
                noop("c", "schedule = \"*/0 * * * *\""),
                noop("d", "schedule = \"0 1 * *\"\ncatch_up = \"all:0\"")
            ),
            &[
                "case.toml:1: pipelines[0] \"a\".timezone: unknown time zone \"../../../etc/localtime\"",
                "pipelines[1] \"b\".schedule: \"99999999999999999999 * * * *\": minute field: 99999999999999999999 is out of range 0-59",
                "pipelines[2] \"c\".schedule: \"*/0 * * * *\": minute field: step must be at least 1",
                "pipelines[3] \"d\"",
            ],
        ),
        case(
            "a bad listen address and public URL",
            "[server]\nlisten = \"999.1.1.1:99999\"\n",
            &["case.toml:1: server.listen: invalid socket address syntax"],
        ),
        case(
            "a script as the public URL",
            "[server]\npublic_url = \"javascript:alert(1)\"\n",
            &["server.public_url: \"javascript:alert(1)\" is not an http(s) base URL"],
        ),
        // Secrets written where a reference belongs.
        case(
            "a literal API key",
            format!(
                "[[pipelines]]\nname = \"a\"\nsource = {{ kind = \"ezfocus\", base_url = \"http://127.0.0.1:1\", key = \"{LITERAL_SECRET}\", username = {{ env = \"U\" }}, password = {{ env = \"P\" }} }}\n"
            ),
            &[
                "case.toml:1: pipelines[0] \"a\".source.key: a secret must not be written as a literal string in the config file; write { env = \"NAME\" }",
            ],
        ),
        case(
            "a literal password in a table",
            format!(
                "[[pipelines]]\nname = \"a\"\n[pipelines.source]\nkind = \"ezfocus\"\nbase_url = \"http://127.0.0.1:1\"\nkey = {{ env = \"K\" }}\nusername = {{ env = \"U\" }}\npassword = \"{LITERAL_SECRET}\"\n"
            ),
            &[
                "pipelines[0] \"a\".source.password: a secret must not be written as a literal string",
            ],
        ),
        case(
            "a numeric PIN as a password",
            "[[pipelines]]\nname = \"a\"\nsource = { kind = \"ezfocus\", base_url = \"http://127.0.0.1:1\", key = { env = \"K\" }, username = { env = \"U\" }, password = 73519286 }\n",
            &["a secret must not be written as a number"],
        ),
        case(
            "a literal webhook URL",
            format!(
                "[[notifications.webhooks]]\nname = \"w\"\nurl = \"https://hooks.example.com/{LITERAL_SECRET}\"\nformat = \"slack\"\n"
            ),
            &["case.toml:1: notifications.webhooks[0] \"w\".url: a literal URL is not allowed"],
        ),
        case(
            "a literal secret in a browser export",
            format!(
                "[[pipelines]]\nname = \"a\"\nsource = {{ kind = \"browser_export\", login_url = \"http://127.0.0.1:1/login\", username = {{ env = \"U\" }}, password = \"{LITERAL_SECRET}\" }}\n"
            ),
            &["pipelines[0] \"a\".source.password:"],
        ),
    ]
}

#[test]
fn hostile_config_files_are_refused_fast_with_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.toml");
    let cases = cases();
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, "");
    let mut problems = 0;
    for c in &cases {
        std::fs::write(&path, &c.text).unwrap();
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_crm-sync"))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .env_remove("DATABASE_URL")
            .output()
            .expect("run crm-sync");
        let elapsed = t.elapsed();
        if elapsed > slowest.0 {
            slowest = (elapsed, c.name);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let head: String = stderr.chars().take(3000).collect();
        assert_eq!(out.status.code(), Some(1), "{}: {stdout}{head}", c.name);
        assert!(!stderr.contains("panicked"), "{}: {head}", c.name);
        assert!(stderr.contains("problem"), "{}: {head}", c.name);
        for expected in &c.expect {
            assert!(
                stderr.contains(expected.as_str()),
                "{}: missing {expected:?} in:\n{head}",
                c.name
            );
        }
        assert!(
            !stderr.contains(LITERAL_SECRET) && !stdout.contains(LITERAL_SECRET),
            "{}: the literal secret was echoed:\n{head}",
            c.name
        );
        let longest = stderr.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 1000, "{}: a {longest}-byte line", c.name);
        assert!(
            elapsed < Duration::from_secs(10),
            "{}: took {elapsed:?}",
            c.name
        );
        problems += stderr
            .lines()
            .next()
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
    }
    eprintln!(
        "{} hostile config files refused with exit 1 in {:.1?} ({problems} problems reported, none echoing a secret); slowest {:.0?} ({})",
        cases.len(),
        started.elapsed(),
        slowest.0,
        slowest.1
    );
}
