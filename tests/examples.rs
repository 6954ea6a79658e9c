//! The shipped example configs stay valid and in step with each other, and `crm-sync schedules`
//! shows both reference pipelines from the combined one.

mod common;

use std::path::Path;

fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .unwrap()
}

fn pipeline_block(text: &str) -> &str {
    text[text.find("[[pipelines]]").unwrap()..].trim_end()
}

#[test]
fn every_example_passes_check_config() {
    for name in [
        "noop.toml",
        "ezfocus.toml",
        "ezfocus_gcp.toml",
        "qashier.toml",
        "crm-sync.toml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name);
        let (code, out, err) = common::run_binary(&path, &["check-config"]);
        assert_eq!(code, 0, "{name}: {out}{err}");
    }
}

#[test]
fn the_combined_example_holds_the_two_reference_pipelines_unchanged() {
    let combined = example("crm-sync.toml");
    for name in ["ezfocus.toml", "qashier.toml"] {
        let block = pipeline_block(&example(name)).to_string();
        assert!(
            combined.contains(&block),
            "examples/crm-sync.toml differs from examples/{name}"
        );
    }
}

#[test]
fn schedules_lists_both_reference_pipelines_in_local_time_and_utc() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/crm-sync.toml");
    let (code, out, err) = common::run_binary(&path, &["schedules", "--count", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ezfocus_accounts: \"0 1 * * *\" in America/Toronto"),
        "{out}"
    );
    assert!(
        out.contains("qashier_customers: \"0 2 * * *\" in Asia/Bangkok"),
        "{out}"
    );
    // 01:00 in Toronto is 05:00 or 06:00 UTC; 02:00 in Bangkok is 19:00 UTC the day before.
    let toronto: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("ezfocus"))
        .skip(1)
        .take(2)
        .collect();
    assert!(
        toronto.iter().all(|l| l.contains(" 01:00:00 E")
            && (l.contains(" 06:00:00 UTC") || l.contains(" 05:00:00 UTC"))),
        "{out}"
    );
    let bangkok: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("qashier"))
        .skip(1)
        .take(2)
        .collect();
    assert!(
        bangkok
            .iter()
            .all(|l| l.contains(" 02:00:00 +07") && l.contains(" 19:00:00 UTC")),
        "{out}"
    );
}
