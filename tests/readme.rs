//! README's commands work as written: every code block marked ```` ```sh runnable ```` is run, in
//! order, each in a fresh bash (`set -euo pipefail`) with the built `crm-sync` first on PATH and
//! `DATABASE_URL` pointing at this test's database; whatever a block starts in the background is
//! stopped when it ends. Blocks run from a scratch directory that sees the repository's
//! `examples/`, so backups they write never land in the clone.

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
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
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
        eprintln!(
            "README block at line {line}: ok in {:.1} s",
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
}
