//! The transform step: reads the raw backup, renames and casts each record to the declared columns,
//! adds the batch columns, and writes newline-delimited JSON (the staging object the load reads).
//!
//! It streams: records are read one at a time from the raw object and written as they are cast, so
//! memory does not grow with the row count. Values that cannot be cast become NULL and are counted as
//! warnings per column and reason; a payload that is not what the source promised is a terminal error.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::{BufReader, BufWriter, Read, Write};

use chrono::{DateTime, Utc};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::keys::KeyDisplay;
use crate::pipeline::StepError;
use crate::schema::ColumnSpec;

/// `[pipelines.transform]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// The raw format: `json` (a top-level array of flat objects) or `csv` (a header row, then one
    /// record per row; a UTF-8 byte-order mark is skipped).
    pub kind: TransformKind,
    /// The output columns, in order; source fields not listed are dropped (and counted).
    pub columns: Vec<ColumnSpec>,
    /// Name of the column carrying the run's batch id.
    #[serde(default = "default_batch_column")]
    pub batch_column: String,
    /// Name of the column carrying the UTC time the batch was prepared for loading.
    #[serde(default = "default_timestamp_column")]
    pub timestamp_column: String,
}

fn default_batch_column() -> String {
    "batch_id".into()
}
fn default_timestamp_column() -> String {
    "load_timestamp".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformKind {
    Json,
    Csv,
}

impl TransformConfig {
    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.columns.is_empty() {
            return Err("transform needs at least one column".into());
        }
        let mut seen = BTreeSet::new();
        for name in self
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .chain([self.batch_column.as_str(), self.timestamp_column.as_str()])
        {
            if !is_identifier(name) {
                return Err(format!(
                    "column name \"{name}\" must be letters, digits and '_', starting with a letter or '_'"
                ));
            }
            if !seen.insert(name) {
                return Err(format!("column \"{name}\" is declared twice"));
            }
        }
        Ok(())
    }
}

/// Whether a name is safe to use unquoted as a SQL column (and matches BigQuery's rules).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// What the transform did, recorded in its step output.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransformStats {
    pub rows: u64,
    /// "column: reason" -> count of values stored as NULL.
    pub warnings: BTreeMap<String, u64>,
    /// Source fields not in the declared columns (at most 50 names listed).
    pub dropped_fields: BTreeSet<String>,
    /// Rows a merge left out ([`KeyFilter`]): "empty KEY" / "duplicate KEY" -> count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<String, u64>,
    /// The first few rows left out, each as `key#<hash> at row N` (a repeated key, shown by
    /// [`KeyDisplay`]) or `empty key at row N`; N counts the extract's records from 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_keys: Vec<String>,
}

/// Leaves out the rows a merge cannot key, when the destination allows it (`skip_dirty_keys`): a row
/// whose key is empty (every key column null or "") and a row whose key an earlier row of the batch
/// already has (the first row of a key wins, so a number copied onto a second account does not
/// take over the first). Memory: a 128-bit digest per distinct key, not the keys themselves.
pub struct KeyFilter {
    columns: Vec<String>,
    display: KeyDisplay,
    seen: HashSet<u128>,
    /// Records offered so far.
    records: u64,
}

/// How many skipped rows a transform output names.
const SKIPPED_KEYS_LISTED: usize = 10;

impl KeyFilter {
    pub fn new(columns: Vec<String>, display: KeyDisplay) -> Self {
        KeyFilter {
            columns,
            display,
            seen: HashSet::new(),
            records: 0,
        }
    }

    /// Whether `row` goes into the batch; a row left out is counted in `stats`.
    fn admit(&mut self, row: &Map<String, Value>, stats: &mut TransformStats) -> bool {
        self.records += 1;
        let (reason, shown) = match merge_key(row, &self.columns) {
            None => ("empty", "empty key".to_string()),
            Some(key) => {
                let digest = Sha256::digest(key.as_bytes());
                let mut first = [0u8; 16];
                first.copy_from_slice(&digest[..16]);
                if self.seen.insert(u128::from_le_bytes(first)) {
                    return true;
                }
                ("duplicate", self.display.row(row, &self.columns))
            }
        };
        *stats
            .skipped
            .entry(format!("{reason} {}", self.columns.join("+")))
            .or_default() += 1;
        if stats.skipped_keys.len() < SKIPPED_KEYS_LISTED {
            stats
                .skipped_keys
                .push(format!("{shown} at row {}", self.records));
        }
        false
    }
}

/// A row's merge key as a JSON array of its values (so null and "" stay apart, and a null part
/// equals another null part), or `None` when the key is empty: every part null or "".
pub fn merge_key(row: &Map<String, Value>, columns: &[String]) -> Option<String> {
    let parts: Vec<&Value> = columns
        .iter()
        .map(|c| row.get(c).unwrap_or(&Value::Null))
        .collect();
    if parts.iter().all(|v| v.is_null() || v.as_str() == Some("")) {
        return None;
    }
    serde_json::to_string(&parts).ok()
}

/// Reads a JSON array of records from `input` and writes one cast record per line to `output`
/// (leaving out the rows `keys` refuses, when given).
pub fn json_to_ndjson<R: Read, W: Write>(
    config: &TransformConfig,
    input: R,
    output: W,
    batch_id: &str,
    prepared_at: DateTime<Utc>,
    keys: Option<&mut KeyFilter>,
) -> Result<TransformStats, StepError> {
    let mut writer = BufWriter::with_capacity(256 * 1024, output);
    let mut stats = TransformStats::default();
    let mut io_error = None;
    let sink = RecordSink {
        config,
        out: &mut writer,
        stats: &mut stats,
        batch_id,
        prepared_at: prepared_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        io_error: &mut io_error,
        keys,
    };
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(256 * 1024, input));
    let parsed = sink.deserialize(&mut de).and_then(|_| de.end());
    if let Some(e) = io_error {
        return Err(StepError::retryable(format!(
            "cannot write the staging object: {e}"
        )));
    }
    parsed.map_err(|e| {
        if e.is_io() {
            StepError::retryable(format!("cannot read the raw backup: {e}"))
        } else {
            // serde quotes a text element where an object belongs: a row value, left out.
            StepError::terminal(format!(
                "the extract is not a JSON array of records: {}",
                crate::keys::without_quoted_values(&e.to_string())
            ))
        }
    })?;
    writer
        .flush()
        .map_err(|e| StepError::retryable(format!("cannot write the staging object: {e}")))?;
    Ok(stats)
}

/// Reads a CSV export (header row, BOM tolerated, quoted or bare fields) and writes one cast record
/// per line. The header must name exactly the source fields of the declared columns: a changed
/// header is a terminal error naming what is missing and what is unexpected.
pub fn csv_to_ndjson<R: Read, W: Write>(
    config: &TransformConfig,
    input: R,
    output: W,
    batch_id: &str,
    prepared_at: DateTime<Utc>,
    mut keys: Option<&mut KeyFilter>,
) -> Result<TransformStats, StepError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(BufReader::with_capacity(256 * 1024, input));
    let header: Vec<String> = reader
        .headers()
        .map_err(csv_error)?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if i == 0 {
                h.trim_start_matches('\u{feff}')
            } else {
                h
            }
            .trim()
            .to_string()
        })
        .collect();
    let expected: Vec<&str> = config.columns.iter().map(|c| c.source_field()).collect();
    let missing: Vec<&str> = expected
        .iter()
        .filter(|e| !header.iter().any(|h| h == *e))
        .copied()
        .collect();
    let unexpected: Vec<&str> = header
        .iter()
        .filter(|h| !expected.contains(&h.as_str()))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(StepError::terminal(format!(
            "the CSV header changed: missing {missing:?}, unexpected {unexpected:?}"
        )));
    }

    let mut writer = BufWriter::with_capacity(256 * 1024, output);
    let mut stats = TransformStats::default();
    let stamp = prepared_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let mut record = csv::StringRecord::new();
    let mut line = Vec::with_capacity(1024);
    let write_error =
        |e: std::io::Error| StepError::retryable(format!("cannot write the staging object: {e}"));
    while reader.read_record(&mut record).map_err(csv_error)? {
        let raw: Map<String, Value> = header
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.clone(), Value::String(v.to_string())))
            .collect();
        let mut row = cast_record(config, &raw, &mut stats);
        if let Some(keys) = keys.as_deref_mut()
            && !keys.admit(&row, &mut stats)
        {
            continue;
        }
        row.insert(
            config.batch_column.clone(),
            Value::String(batch_id.to_string()),
        );
        row.insert(
            config.timestamp_column.clone(),
            Value::String(stamp.clone()),
        );
        line.clear();
        serde_json::to_writer(&mut line, &row).map_err(|e| StepError::terminal(e.to_string()))?;
        line.push(b'\n');
        writer.write_all(&line).map_err(write_error)?;
        stats.rows += 1;
    }
    writer.flush().map_err(write_error)?;
    Ok(stats)
}

fn csv_error(e: csv::Error) -> StepError {
    if let csv::ErrorKind::Io(io) = e.kind() {
        return StepError::retryable(format!("cannot read the raw backup: {io}"));
    }
    let at = e
        .position()
        .map(|p| format!(" at line {}", p.line()))
        .unwrap_or_default();
    StepError::terminal(format!("the export is not valid CSV{at}: {e}"))
}

/// Receives the records of the top-level array one by one (serde's streaming way to read an array).
struct RecordSink<'a, W: Write> {
    config: &'a TransformConfig,
    out: &'a mut W,
    stats: &'a mut TransformStats,
    batch_id: &'a str,
    prepared_at: String,
    io_error: &'a mut Option<std::io::Error>,
    keys: Option<&'a mut KeyFilter>,
}

impl<'de, W: Write> DeserializeSeed<'de> for RecordSink<'_, W> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, W: Write> Visitor<'de> for RecordSink<'_, W> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut line = Vec::with_capacity(1024);
        while let Some(record) = seq.next_element::<Map<String, Value>>()? {
            let mut row = cast_record(self.config, &record, self.stats);
            if let Some(keys) = self.keys.as_deref_mut()
                && !keys.admit(&row, self.stats)
            {
                continue;
            }
            row.insert(
                self.config.batch_column.clone(),
                Value::String(self.batch_id.to_string()),
            );
            row.insert(
                self.config.timestamp_column.clone(),
                Value::String(self.prepared_at.clone()),
            );
            line.clear();
            serde_json::to_writer(&mut line, &row).map_err(serde::de::Error::custom)?;
            line.push(b'\n');
            if let Err(e) = self.out.write_all(&line) {
                let message = e.to_string();
                *self.io_error = Some(e);
                return Err(serde::de::Error::custom(message));
            }
            self.stats.rows += 1;
        }
        Ok(())
    }
}

/// Casts one record to the declared columns, counting what could not be cast and what was dropped.
pub fn cast_record(
    config: &TransformConfig,
    record: &Map<String, Value>,
    stats: &mut TransformStats,
) -> Map<String, Value> {
    let mut row = Map::new();
    for column in &config.columns {
        let raw = record.get(column.source_field()).unwrap_or(&Value::Null);
        let value = match column.cast(raw) {
            Ok(v) => v,
            Err(reason) => {
                *stats
                    .warnings
                    .entry(format!("{}: {reason}", column.name))
                    .or_default() += 1;
                Value::Null
            }
        };
        row.insert(column.name.clone(), value);
    }
    if stats.dropped_fields.len() < 50 {
        for field in record.keys() {
            if !config.columns.iter().any(|c| c.source_field() == field) {
                stats.dropped_fields.insert(field.clone());
            }
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn config() -> TransformConfig {
        toml::from_str(
            r#"
kind = "json"
columns = [
  { name = "store_id", from = "accnt_no", type = "string" },
  { name = "latitude", type = "float" },
  { name = "client_since", type = "date" },
]
"#,
        )
        .unwrap()
    }

    #[test]
    fn renames_casts_and_stamps_every_record() {
        let input =
            br#"[{"accnt_no": 7, "latitude": "43.5", "client_since": "2020-01-02", "extra": 1},
                          {"accnt_no": "8", "latitude": null, "client_since": "someday"}]"#;
        let mut out = Vec::new();
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 6, 0, 0).unwrap();
        let stats = json_to_ndjson(&config(), &input[..], &mut out, "b1", at, None).unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(stats.rows, 2);
        assert_eq!(lines[0]["store_id"], "7");
        assert_eq!(lines[0]["latitude"], 43.5);
        assert_eq!(lines[0]["client_since"], "2020-01-02");
        assert_eq!(lines[0]["batch_id"], "b1");
        assert_eq!(lines[0]["load_timestamp"], "2026-11-24T06:00:00.000000Z");
        assert_eq!(lines[1]["client_since"], Value::Null);
        assert_eq!(
            stats.warnings.get("client_since: unparseable date"),
            Some(&1)
        );
        assert!(stats.dropped_fields.contains("extra"));
    }

    fn csv_config() -> TransformConfig {
        toml::from_str(
            r#"
kind = "csv"
timestamp_column = "update_time"
columns = [
  { name = "customer_name", from = "Customer", type = "string" },
  { name = "contact_number", from = "Contact Number", type = "string" },
  { name = "address", from = "Address", type = "string" },
  { name = "date_joined", from = "Date Joined", type = "date", formats = ["%d/%m/%Y"] },
  { name = "available_point", from = "Available Point", type = "numeric" },
  { name = "sms_pdpa", from = "SMS PDPA", type = "boolean" },
]
"#,
        )
        .unwrap()
    }

    fn csv_rows(input: &str) -> Result<Vec<Value>, StepError> {
        let mut out = Vec::new();
        json_to_ndjson_csv(input, &mut out)?;
        Ok(String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect())
    }

    fn json_to_ndjson_csv(input: &str, out: &mut Vec<u8>) -> Result<TransformStats, StepError> {
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 19, 0, 0).unwrap();
        csv_to_ndjson(&csv_config(), input.as_bytes(), out, "b1", at, None)
    }

    #[test]
    fn csv_exports_with_bom_quotes_and_empties_are_read_exactly() {
        let input = "\u{feff}\"Customer\",\"Contact Number\",\"Address\",\"Date Joined\",\"Available Point\",\"SMS PDPA\"\n\
                     \"Somchai\",\"0812345678\",\"12/3 Soi 5, \"\"Green\"\" Tower\",\"05/01/2024\",\"1,234.50\",\"Yes\"\n\
                     \"Somchai\",\"66812345678\",,\"\",0,\"No\"";
        let rows = csv_rows(input).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["customer_name"], "Somchai");
        assert_eq!(
            rows[0]["contact_number"], "0812345678",
            "a leading zero is kept"
        );
        assert_eq!(rows[0]["address"], "12/3 Soi 5, \"Green\" Tower");
        assert_eq!(rows[0]["date_joined"], "2024-01-05");
        assert_eq!(rows[0]["available_point"], "1234.50");
        assert_eq!(rows[0]["sms_pdpa"], true);
        assert_eq!(rows[0]["update_time"], "2026-11-24T19:00:00.000000Z");
        assert_eq!(rows[1]["contact_number"], "66812345678");
        assert_eq!(
            rows[1]["address"],
            Value::Null,
            "a bare empty field is NULL"
        );
        assert_eq!(
            rows[1]["date_joined"],
            Value::Null,
            "a quoted empty field is NULL"
        );
        assert_eq!(rows[1]["available_point"], "0");
        assert_eq!(rows[1]["sms_pdpa"], false);
    }

    #[test]
    fn a_changed_csv_header_is_a_terminal_error_naming_the_columns() {
        let input = "\"Customer\",\"Phone\",\"Address\",\"Date Joined\",\"Available Point\",\"SMS PDPA\"\n\"a\",\"1\",,,,";
        let err = csv_rows(input).unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message
                .contains("missing [\"Contact Number\"], unexpected [\"Phone\"]"),
            "{}",
            err.message
        );
        let ragged = "\"Customer\",\"Contact Number\",\"Address\",\"Date Joined\",\"Available Point\",\"SMS PDPA\"\n\"a\",\"1\"";
        let err = csv_rows(ragged).unwrap_err();
        assert!(
            err.message.contains("not valid CSV at line 2"),
            "{}",
            err.message
        );
    }

    #[test]
    fn malformed_payloads_are_terminal_errors_that_say_where() {
        let at = Utc::now();
        for (input, expect) in [
            (
                &b"[{\"accnt_no\": 1}, {\"accnt_no\": "[..],
                "EOF while parsing",
            ),
            (
                &b"{\"error\": \"maintenance\"}"[..],
                "expected a JSON array of objects",
            ),
            (&b"[1, 2]"[..], "invalid type: integer"),
            (
                &b"[\"Somchai 0812345678\"]"[..],
                "invalid type: string \"\u{2026}\", expected a map",
            ),
            (&b"[] trailing"[..], "trailing characters"),
        ] {
            let err = json_to_ndjson(&config(), input, Vec::new(), "b", at, None).unwrap_err();
            assert!(!err.is_retryable(), "{input:?}");
            assert!(
                err.message.contains(expect),
                "{}: {}",
                String::from_utf8_lossy(input),
                err.message
            );
        }
        let stats = json_to_ndjson(&config(), &b"[]"[..], Vec::new(), "b", at, None).unwrap();
        assert_eq!(stats.rows, 0);
    }

    #[test]
    fn the_key_filter_leaves_out_empty_and_repeated_keys_first_row_winning() {
        let config: TransformConfig = toml::from_str(
            r#"
kind = "json"
columns = [
  { name = "store", type = "string" },
  { name = "phone", type = "string" },
  { name = "points", type = "integer" },
]
"#,
        )
        .unwrap();
        let input = br#"[
            {"store": "A", "phone": "1", "points": 1},
            {"store": "A", "phone": "1", "points": 2},
            {"store": "A", "phone": null, "points": 3},
            {"store": "A", "phone": null, "points": 4},
            {"store": "A", "phone": "", "points": 5},
            {"store": null, "phone": "", "points": 6},
            {"store": "", "phone": null, "points": 7}
        ]"#;
        let mut keys = KeyFilter::new(
            vec!["store".into(), "phone".into()],
            KeyDisplay::new("t", true),
        );
        let mut out = Vec::new();
        let at = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap();
        let stats =
            json_to_ndjson(&config, &input[..], &mut out, "b", at, Some(&mut keys)).unwrap();
        let points: Vec<i64> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["points"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        // A null part equals another null part (a blank text is null once cast); all-empty keys
        // are left out; the first row of a key wins.
        assert_eq!(points, vec![1, 3]);
        assert_eq!(stats.rows, 2);
        assert_eq!(
            stats.skipped,
            BTreeMap::from([
                ("duplicate store+phone".to_string(), 3),
                ("empty store+phone".to_string(), 2)
            ])
        );
        assert_eq!(
            stats.skipped_keys,
            vec![
                "A+1 at row 2",
                "A+null at row 4",
                "A+null at row 5",
                "empty key at row 6",
                "empty key at row 7"
            ]
        );
    }
}
