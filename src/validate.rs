//! The validation gate: runs over the staging object before anything is replaced, and fails the run
//! (terminally, with every reason listed) when the batch is not fit to replace the last good one.
//!
//! Checks: required columns present, row-count bounds, maximum drop against the last successful batch
//! of the same pipeline, and per-column checks (not null, unique key, allowed values, numeric range),
//! each an error or a warning, with a tolerated number of violations. Memory stays flat: values are
//! streamed, and the unique check keeps a Bloom filter sized to the row count plus the few keys it flags.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::keys::{KeyDisplay, RowList};
use crate::pipeline::StepError;

/// `[pipelines.validate]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// Columns that must be present: non-null in at least one row (a renamed or vanished source field
    /// leaves them null everywhere).
    #[serde(default)]
    pub required: Vec<String>,
    /// Fewest rows a batch may have (an empty batch always fails unless `min_rows = 0`).
    #[serde(default = "one")]
    pub min_rows: u64,
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Largest allowed drop in row count against the last successful batch, as a share (0.2 = 20 %).
    #[serde(default)]
    pub max_drop: Option<f64>,
    #[serde(default)]
    pub checks: Vec<Check>,
}

fn one() -> u64 {
    1
}

/// One per-column check (`check = "not_null" | "unique" | "allowed" | "range"`).
#[derive(Debug, Clone, Deserialize)]
pub struct Check {
    /// The column(s): each for `not_null`, `allowed` and `range`; the key for `unique`.
    pub columns: Vec<String>,
    #[serde(flatten)]
    pub rule: Rule,
    #[serde(default)]
    pub severity: Severity,
    /// Violations tolerated before an `error` check fails the batch (they are reported as warnings).
    #[serde(default)]
    pub max_violations: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum Rule {
    NotNull,
    Unique,
    Allowed {
        values: Vec<Value>,
    },
    Range {
        min: Option<f64>,
        max: Option<f64>,
    },
    /// A merge's key (added by the pipeline, not written in configs): no row may have an empty
    /// key (every key column null or "") and no two rows the same key, nulls comparing equal.
    #[serde(skip)]
    MergeKey,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Error,
    Warning,
}

impl ValidateConfig {
    /// Checks the config against the transform's columns.
    pub fn check(&self, columns: &[String]) -> Result<(), String> {
        let known = |c: &String| columns.contains(c);
        for c in self
            .required
            .iter()
            .chain(self.checks.iter().flat_map(|k| &k.columns))
        {
            if !known(c) {
                return Err(format!(
                    "validate names column \"{c}\", which the transform does not produce"
                ));
            }
        }
        if let Some(d) = self.max_drop
            && !(0.0..=1.0).contains(&d)
        {
            return Err("max_drop is a share between 0 and 1 (0.2 = 20 %)".into());
        }
        if let Some(max) = self.max_rows
            && max < self.min_rows
        {
            return Err("max_rows is smaller than min_rows".into());
        }
        for k in &self.checks {
            if k.columns.is_empty() {
                return Err("a check needs at least one column".into());
            }
        }
        Ok(())
    }
}

/// What the gate found, stored as the validate step's output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ValidationReport {
    pub rows: u64,
    pub previous_rows: Option<u64>,
    /// Reasons the batch was rejected (empty when it passed).
    pub errors: Vec<String>,
    /// Counted findings that did not block the batch.
    pub warnings: BTreeMap<String, u64>,
}

/// Streams the staging NDJSON (read twice when a unique check flags possible duplicates) and applies
/// every check. `open` gives a fresh reader for each pass. Keys are named as `keys` shows them, with
/// their row numbers in the batch (from 1).
pub fn validate<R: BufRead>(
    config: &ValidateConfig,
    previous_rows: Option<u64>,
    mut open: impl FnMut() -> std::io::Result<R>,
    expected_rows: u64,
    keys: &KeyDisplay,
) -> Result<ValidationReport, StepError> {
    let read_error =
        |e: std::io::Error| StepError::retryable(format!("cannot read the staging object: {e}"));
    let mut violations: Vec<u64> = vec![0; config.checks.len()];
    // Per check: the rows of empty merge keys.
    let mut empty_rows: Vec<RowList> = vec![RowList::default(); config.checks.len()];
    let mut present: HashMap<&str, bool> = config
        .required
        .iter()
        .map(|c| (c.as_str(), false))
        .collect();
    let hasher = RandomState::new();
    let mut filters: Vec<Option<(Bloom, HashSet<String>)>> = config
        .checks
        .iter()
        .map(|k| {
            matches!(k.rule, Rule::Unique | Rule::MergeKey)
                .then(|| (Bloom::for_rows(expected_rows), HashSet::new()))
        })
        .collect();

    let mut rows = 0u64;
    for_each_row(open().map_err(read_error)?, |row| {
        rows += 1;
        for (c, seen) in present.iter_mut() {
            if !*seen && !row.get(*c).is_none_or(Value::is_null) {
                *seen = true;
            }
        }
        for (i, check) in config.checks.iter().enumerate() {
            match &check.rule {
                Rule::Unique | Rule::MergeKey => {
                    let key = key_for(&check.rule, row, &check.columns);
                    if key.is_none() && matches!(check.rule, Rule::MergeKey) {
                        violations[i] += 1;
                        empty_rows[i].push(rows);
                    }
                    if let Some(key) = key
                        && let Some((bloom, suspects)) = filters[i].as_mut()
                        && !bloom.insert(&hasher, &key)
                    {
                        suspects.insert(key);
                    }
                }
                rule => {
                    violations[i] += check
                        .columns
                        .iter()
                        .filter(|c| violates(rule, row.get(*c)))
                        .count() as u64
                }
            }
        }
    })?;
    if rows != expected_rows {
        return Err(StepError::terminal(format!(
            "the staging object has {rows} rows but the transform wrote {expected_rows}"
        )));
    }

    // Second pass, only for keys the filters flagged: exact counts.
    // Per check: key -> (the key as shown, its rows).
    let mut duplicates: Vec<HashMap<String, (String, RowList)>> =
        vec![HashMap::new(); config.checks.len()];
    if filters
        .iter()
        .flatten()
        .any(|(_, suspects)| !suspects.is_empty())
    {
        let mut line = 0;
        for_each_row(open().map_err(read_error)?, |row| {
            line += 1;
            for (i, check) in config.checks.iter().enumerate() {
                if let Some((_, suspects)) = &filters[i]
                    && let Some(key) = key_for(&check.rule, row, &check.columns)
                    && suspects.contains(&key)
                {
                    let (_, found) = duplicates[i]
                        .entry(key)
                        .or_insert_with(|| (keys.row(row, &check.columns), RowList::default()));
                    found.push(line);
                }
            }
        })?;
    }

    let mut report = ValidationReport {
        rows,
        previous_rows,
        ..Default::default()
    };
    for (c, seen) in &present {
        if !seen {
            report.errors.push(format!(
                "required column {c} is missing: it is null in every one of the {rows} rows"
            ));
        }
    }
    if rows < config.min_rows {
        report.errors.push(format!(
            "{rows} rows, fewer than min_rows = {}",
            config.min_rows
        ));
    }
    if let Some(max) = config.max_rows
        && rows > max
    {
        report
            .errors
            .push(format!("{rows} rows, more than max_rows = {max}"));
    }
    if let (Some(max_drop), Some(prev)) = (config.max_drop, previous_rows)
        && prev > 0
        && (rows as f64) < prev as f64 * (1.0 - max_drop)
    {
        report.errors.push(format!(
            "row count dropped {:.0} % against the last successful batch ({rows} rows, was {prev}); max_drop is {:.0} %",
            (1.0 - rows as f64 / prev as f64) * 100.0,
            max_drop * 100.0
        ));
    }
    let duplicate_finding = |i: usize, check: &Check, what: &str| {
        let mut dups: Vec<&(String, RowList)> = duplicates[i]
            .values()
            .filter(|(_, r)| r.total > 1)
            .collect();
        let extra: u64 = dups.iter().map(|(_, r)| r.total - 1).sum();
        dups.sort_by_key(|(_, r)| r.listed.first().copied());
        let sample: Vec<String> = dups
            .iter()
            .take(5)
            .map(|(k, r)| format!("{k} at {}", r.describe()))
            .collect();
        (
            extra,
            format!(
                "duplicate {what}{} (e.g. {})",
                check.columns.join("+"),
                sample.join("; ")
            ),
        )
    };
    let mut findings: Vec<(&Check, u64, String)> = Vec::new();
    for (i, check) in config.checks.iter().enumerate() {
        match &check.rule {
            Rule::Unique => {
                let (count, what) = duplicate_finding(i, check, "");
                findings.push((check, count, what));
            }
            Rule::MergeKey => {
                let (count, what) = duplicate_finding(i, check, "merge key ");
                findings.push((check, count, what));
                findings.push((
                    check,
                    violations[i],
                    format!(
                        "empty merge key {} ({})",
                        check.columns.join("+"),
                        empty_rows[i].describe()
                    ),
                ));
            }
            Rule::NotNull => findings.push((
                check,
                violations[i],
                format!("null {}", check.columns.join(", ")),
            )),
            Rule::Allowed { values } => findings.push((
                check,
                violations[i],
                format!(
                    "{} not in {}",
                    check.columns.join(", "),
                    serde_json::to_string(values).unwrap_or_default()
                ),
            )),
            Rule::Range { min, max } => findings.push((
                check,
                violations[i],
                format!(
                    "{} outside {}..{}",
                    check.columns.join(", "),
                    min.map(|m| m.to_string()).unwrap_or_default(),
                    max.map(|m| m.to_string()).unwrap_or_default()
                ),
            )),
        }
    }
    for (check, count, what) in findings {
        if count == 0 {
            continue;
        }
        if check.severity == Severity::Error && count > check.max_violations {
            report.errors.push(format!(
                "{what}: {count} rows (at most {} allowed)",
                check.max_violations
            ));
        } else {
            report.warnings.insert(what, count);
        }
    }
    Ok(report)
}

fn for_each_row<R: BufRead>(
    reader: R,
    mut f: impl FnMut(&Map<String, Value>),
) -> Result<(), StepError> {
    for (n, line) in reader.lines().enumerate() {
        let line =
            line.map_err(|e| StepError::retryable(format!("cannot read the staging object: {e}")))?;
        let row: Map<String, Value> = serde_json::from_str(&line)
            .map_err(|e| StepError::terminal(format!("staging object line {}: {e}", n + 1)))?;
        f(&row);
    }
    Ok(())
}

/// The key a uniqueness rule compares: a `unique` check skips rows with a null part; a merge key
/// is empty only when every part is null or "", and its null parts compare equal.
fn key_for(rule: &Rule, row: &Map<String, Value>, columns: &[String]) -> Option<String> {
    match rule {
        Rule::MergeKey => crate::transform::merge_key(row, columns),
        _ => key_of(row, columns),
    }
}

fn key_of(row: &Map<String, Value>, columns: &[String]) -> Option<String> {
    let mut key = String::new();
    for c in columns {
        match row.get(c) {
            None | Some(Value::Null) => return None,
            Some(Value::String(s)) => key.push_str(s),
            Some(v) => key.push_str(&v.to_string()),
        }
        key.push('\u{1f}');
    }
    key.pop();
    Some(key)
}

fn violates(rule: &Rule, value: Option<&Value>) -> bool {
    let value = value.unwrap_or(&Value::Null);
    match rule {
        Rule::NotNull => value.is_null(),
        Rule::Unique | Rule::MergeKey => false,
        // Nulls are the business of not_null checks.
        Rule::Allowed { values } => !value.is_null() && !values.contains(value),
        Rule::Range { min, max } => match value {
            Value::Null => false,
            v => match v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                Some(x) => min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m),
                None => true,
            },
        },
    }
}

/// A Bloom filter sized for `rows` keys at 16 bits each: a key it has not seen is always told apart; a
/// seen one (or, rarely, a false positive) is flagged for an exact second pass.
struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    fn for_rows(rows: u64) -> Self {
        let words = ((rows.max(1024) * 16) / 64).next_power_of_two() as usize;
        Bloom {
            bits: vec![0; words],
        }
    }

    /// Inserts `key`; false when it was (probably) there already.
    fn insert(&mut self, hasher: &RandomState, key: &str) -> bool {
        let h = hasher.hash_one(key);
        let (h1, h2) = (h as u32 as u64, (h >> 32) | 1);
        let nbits = (self.bits.len() * 64) as u64;
        let mut fresh = false;
        for i in 0..7u64 {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % nbits;
            let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.bits[word] & mask == 0 {
                fresh = true;
                self.bits[word] |= mask;
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn config() -> ValidateConfig {
        toml::from_str(
            r#"
required = ["id", "name"]
min_rows = 3
max_drop = 0.2
checks = [
  { check = "unique", columns = ["id"], max_violations = 1 },
  { check = "allowed", columns = ["prov"], values = ["ON"], severity = "warning" },
  { check = "range", columns = ["lat"], min = 41.6, max = 57.0 },
]
"#,
        )
        .unwrap()
    }

    fn run(rows: &str, previous: Option<u64>) -> ValidationReport {
        let n = rows.lines().count() as u64;
        validate(
            &config(),
            previous,
            || Ok(Cursor::new(rows.as_bytes().to_vec())),
            n,
            &KeyDisplay::new("test", true),
        )
        .unwrap()
    }

    #[test]
    fn a_good_batch_passes_with_counted_warnings() {
        let rows = "{\"id\":\"1\",\"name\":\"a\",\"prov\":\"ON\",\"lat\":43.0}\n\
                    {\"id\":\"2\",\"name\":\"b\",\"prov\":\"QC\",\"lat\":45.0}\n\
                    {\"id\":\"2\",\"name\":\"c\",\"prov\":\"ON\",\"lat\":null}\n";
        let report = run(rows, Some(3));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.warnings.get("prov not in [\"ON\"]"), Some(&1));
        assert_eq!(
            report.warnings.get("duplicate id (e.g. 2 at rows 2, 3)"),
            Some(&1)
        );
    }

    #[test]
    fn every_reason_is_listed() {
        let rows =
            "{\"id\":\"1\",\"name\":null,\"lat\":99}\n{\"id\":\"1\",\"name\":null,\"lat\":1}\n";
        let report = run(rows, Some(10));
        let all = report.errors.join("\n");
        assert!(all.contains("required column name is missing"), "{all}");
        assert!(all.contains("2 rows, fewer than min_rows = 3"), "{all}");
        assert!(all.contains("row count dropped 80 %"), "{all}");
        assert!(all.contains("lat outside 41.6..57: 2 rows"), "{all}");
        assert_eq!(report.errors.len(), 4, "{all}");
    }

    #[test]
    fn the_unique_check_is_exact_on_many_rows() {
        let mut rows = String::new();
        for i in 0..50_000 {
            rows.push_str(&format!("{{\"id\":\"{}\",\"name\":\"x\"}}\n", i % 49_990));
        }
        let report = run(&rows, None);
        assert_eq!(
            report.errors,
            vec![
                "duplicate id (e.g. 0 at rows 1, 49991; 1 at rows 2, 49992; 2 at rows 3, 49993; \
                 3 at rows 4, 49994; 4 at rows 5, 49995): 10 rows (at most 1 allowed)"
            ]
        );
    }
}
