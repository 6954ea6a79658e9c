//! README's commands work as written: every code block marked ```` ```sh runnable ```` is run, in
//! order, each in a fresh bash (`set -euo pipefail`) with the built `crm-sync` first on PATH and
//! `DATABASE_URL` pointing at this test's database; whatever a block starts in the background is
//! stopped when it ends. Blocks run from a scratch directory that sees the repository's
//! `examples/`, so backups they write never land in the clone. Every `curl` in those blocks must fail
//! on an HTTP error (`-f`), so that a 4xx or 5xx fails the block instead of passing unnoticed.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The runnable blocks of a Markdown text, with the line each starts on.
fn runnable_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_end() == "```sh runnable" => current = Some((i + 1, String::new())),
            Some(_) if line.trim_end() == "```" => blocks.push(current.take().unwrap()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unterminated runnable block");
    blocks
}

/// The README, as the tests read it.
fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The `## ` section a line (1-based) belongs to.
fn section_of(markdown: &str, line: usize) -> &str {
    markdown
        .lines()
        .take(line)
        .filter_map(|l| l.strip_prefix("## "))
        .last()
        .unwrap_or("")
}

/// Each `curl` command of a script (backslash continuations joined), up to the end of its pipeline
/// stage or list element.
fn curl_commands(script: &str) -> Vec<String> {
    let joined = script.replace("\\\n", " ");
    let mut commands = Vec::new();
    for line in joined.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        for (i, token) in tokens.iter().enumerate() {
            if *token == "curl" || token.ends_with("(curl") {
                let args = tokens[i + 1..].iter().take_while(|t| {
                    !["|", "||", "&&", ";", "&"].contains(t) && !t.starts_with('#')
                });
                commands.push(
                    std::iter::once("curl")
                        .chain(args.copied())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
        }
    }
    commands
}

/// Whether a `curl` command fails on HTTP errors: `--fail`, `--fail-with-body`, or `-f` alone or
/// among other short options (`-fsS`).
fn fails_on_http_errors(command: &str) -> bool {
    command.split_whitespace().any(|arg| {
        arg == "--fail"
            || arg == "--fail-with-body"
            || (arg.len() > 1
                && arg.starts_with('-')
                && !arg.starts_with("--")
                && arg[1..].chars().all(|c| c.is_ascii_alphabetic())
                && arg.contains('f'))
    })
}

#[test]
fn every_curl_in_a_runnable_block_fails_on_http_errors() {
    let readme = readme();
    let mut curls = 0;
    for (line, script) in runnable_blocks(&readme) {
        for command in curl_commands(&script) {
            curls += 1;
            assert!(
                fails_on_http_errors(&command),
                "README block at line {line}: `{command}` exits 0 on an HTTP error; add -f"
            );
        }
    }
    assert!(
        curls >= 20,
        "expected the README's curl examples, found {curls}"
    );
    // The check itself tells the two apart.
    assert!(!fails_on_http_errors(
        "curl -s -X POST localhost:8080/api/runs"
    ));
    assert!(fails_on_http_errors("curl -fsS localhost:8080/healthz"));
    assert!(fails_on_http_errors(
        "curl --fail-with-body -s localhost:8080/healthz"
    ));
    assert_eq!(
        curl_commands(
            "id=$(curl -s -X POST \\\n  -d '{}' host/x | python3 -f)  # -f\ncurl -fsS h || true"
        ),
        ["curl -s -X POST -d '{}' host/x", "curl -fsS h"]
    );
}

#[test]
fn operations_and_the_sql_interface_are_runnable() {
    let readme = readme();
    let sections: Vec<&str> = runnable_blocks(&readme)
        .iter()
        .map(|(line, _)| section_of(&readme, *line))
        .collect();
    for section in ["Operations", "SQL interface"] {
        assert!(
            sections.contains(&section),
            "README section {section:?} has no ```sh runnable block (runnable sections: {sections:?})"
        );
    }
}

fn run_block(line: usize, script: &str, cwd: &Path, db: &common::TestDb) -> String {
    let bin_dir = common::binary().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = cwd.join(format!("block-{line}.log"));
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(cwd)
        .env("PATH", path)
        .env("DATABASE_URL", &db.url)
        .env_remove("CRM_SYNC_CONFIG")
        .env_remove("CRM_SYNC_ADMIN_TOKENS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap().try_clone().unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Stop what the block left running (workers, servers, fixtures), gracefully first.
    let group = Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let _ = killpg(group, Signal::SIGKILL);
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(s) if s.success() => output,
        Some(s) => {
            panic!("README block at line {line} failed ({s}):\n{script}\n--- output ---\n{output}")
        }
        None => panic!(
            "README block at line {line} did not finish in 120 s:\n{script}\n--- output ---\n{output}"
        ),
    }
}

#[tokio::test]
async fn readme_runnable_blocks_work_as_written() {
    let readme = readme();
    let blocks = runnable_blocks(&readme);
    assert!(
        blocks.len() >= 8,
        "expected the README's runnable blocks, found {}",
        blocks.len()
    );
    let db = common::TestDb::new().await;
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
        cwd.path().join("examples"),
    )
    .unwrap();
    let mut outputs = Vec::new();
    for (line, script) in &blocks {
        let started = Instant::now();
        // Blocking is fine here: nothing else runs on this test's runtime meanwhile.
        let output = run_block(*line, script, cwd.path(), &db);
        // Shown with --no-capture (or when the test fails): what each block printed.
        eprintln!(
            "README block at line {line}: ok in {:.1} s\n{output}",
            started.elapsed().as_secs_f64()
        );
        outputs.push((line, output));
    }
    // Spot checks that the blocks did what their comments say.
    let all: String = outputs.iter().map(|(_, o)| o.as_str()).collect();
    assert!(all.contains("succeeded"), "{all}");
    assert!(all.contains("event: snapshot"), "{all}");
    assert!(all.contains("{\"scope\":\"admin\"}"), "{all}");
    assert!(all.contains("crm_sync_worker_slots"), "{all}");
    // The retry examples ran against runs that really failed (and were then retried).
    assert!(all.contains("planned failure 5 of 5"), "{all}");
}
