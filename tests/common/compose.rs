//! docker-compose.yml as the tests read it: parsed (merge keys resolved), and `${VAR}` references
//! expanded the way compose does for the forms the file uses (`${VAR:-default}`, `${VAR:?message}`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_yaml_ng::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository.
pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// docker-compose.yml, parsed, with its merge keys (`<<: *crm-sync`) resolved.
pub fn compose() -> Value {
    let mut doc: Value = serde_yaml_ng::from_str(&read("docker-compose.yml")).expect("valid YAML");
    doc.apply_merge().expect("merge keys resolve");
    doc
}

/// A YAML sequence of strings (empty when `v` is not one).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// One `${...}` reference: the variable, and what follows it (`:-default`, `:?message`, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Plain(String),
    Default(String, String),
    Required(String, String),
}

impl Reference {
    pub fn name(&self) -> &str {
        match self {
            Reference::Plain(n) | Reference::Default(n, _) | Reference::Required(n, _) => n,
        }
    }
}

/// Every `${...}` reference of `text`, in order, with its byte range.
pub fn references(text: &str) -> Vec<(std::ops::Range<usize>, Reference)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = text[from..].find("${").map(|i| i + from) {
        let end = start
            + text[start..]
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ at byte {start}"));
        let inner = &text[start + 2..end];
        let reference = if let Some((name, default)) = inner.split_once(":-") {
            Reference::Default(name.into(), default.into())
        } else if let Some((name, message)) = inner.split_once(":?") {
            Reference::Required(name.into(), message.into())
        } else {
            Reference::Plain(inner.into())
        };
        out.push((start..end + 1, reference));
        from = end + 1;
    }
    out
}

/// `text` with its references expanded from `env` as compose does: an unset or empty variable
/// takes its default, and a required one that is unset or empty is an error with its message.
pub fn interpolate(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut last = 0;
    for (range, reference) in references(text) {
        out.push_str(&text[last..range.start]);
        let value = env.get(reference.name()).filter(|v| !v.is_empty()).cloned();
        out.push_str(&match (value, &reference) {
            (Some(v), _) => v,
            (None, Reference::Default(_, d)) => d.clone(),
            (None, Reference::Required(name, message)) => {
                return Err(format!(
                    "required variable {name} is missing a value: {message}"
                ));
            }
            (None, Reference::Plain(_)) => String::new(),
        });
        last = range.end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}
