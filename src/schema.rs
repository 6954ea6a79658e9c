//! Column types of a pipeline's output and how raw values are cast to them. One schema serves the
//! transform (casting), the validation (types), and the destinations (PostgreSQL and BigQuery DDL).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

/// The type of an output column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    String,
    Integer,
    Float,
    Boolean,
    Date,
    Timestamp,
    /// Exact decimal, carried as a string ("1234.50") so no digit is lost.
    Numeric,
}

impl ColumnType {
    pub fn postgres(self) -> &'static str {
        match self {
            ColumnType::String => "text",
            ColumnType::Integer => "bigint",
            ColumnType::Float => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamptz",
            ColumnType::Numeric => "numeric",
        }
    }

    pub fn bigquery(self) -> &'static str {
        match self {
            ColumnType::String => "STRING",
            ColumnType::Integer => "INT64",
            ColumnType::Float => "FLOAT64",
            ColumnType::Boolean => "BOOL",
            ColumnType::Date => "DATE",
            ColumnType::Timestamp => "TIMESTAMP",
            ColumnType::Numeric => "NUMERIC",
        }
    }
}

/// One output column: `{ name = "store_id", from = "accnt_no", type = "string" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// The column's name in the destination.
    pub name: String,
    /// The source field it comes from (default: the same name).
    #[serde(default)]
    pub from: Option<String>,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    /// chrono formats tried in order for dates and timestamps (default: ISO 8601).
    #[serde(default)]
    pub formats: Vec<String>,
}

impl ColumnSpec {
    pub fn source_field(&self) -> &str {
        self.from.as_deref().unwrap_or(&self.name)
    }

    /// Casts a raw value. `Ok(Value::Null)` for absent or empty values; `Err(reason)` when the value
    /// cannot be read as the column's type (the transform counts it as a warning and stores NULL).
    pub fn cast(&self, raw: &Value) -> Result<Value, &'static str> {
        let text = match raw {
            Value::Null => return Ok(Value::Null),
            Value::String(s) if s.trim().is_empty() => return Ok(Value::Null),
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(_) | Value::Object(_) => {
                return Err("nested value where a scalar was expected");
            }
        };
        match self.column_type {
            ColumnType::String => Ok(Value::String(match raw {
                Value::String(s) => s.clone(),
                _ => text,
            })),
            ColumnType::Integer => strip_separators(&text)
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| "not an integer"),
            ColumnType::Float => strip_separators(&text)
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::from)
                .ok_or("not a number"),
            ColumnType::Numeric => {
                let plain = strip_separators(&text);
                let valid = !plain.is_empty()
                    && plain.trim_start_matches(['-', '+']).split('.').count() <= 2
                    && plain
                        .trim_start_matches(['-', '+'])
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.')
                    && plain.chars().any(|c| c.is_ascii_digit());
                if valid {
                    Ok(Value::String(plain))
                } else {
                    Err("not a decimal number")
                }
            }
            ColumnType::Boolean => match text.to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "n" | "0" => Ok(Value::Bool(false)),
                _ => Err("not a boolean"),
            },
            ColumnType::Date => self
                .parse_date(&text)
                .map(|d| Value::String(d.format("%Y-%m-%d").to_string())),
            ColumnType::Timestamp => self
                .parse_timestamp(&text)
                .map(|t| Value::String(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())),
        }
    }

    fn parse_date(&self, text: &str) -> Result<NaiveDate, &'static str> {
        if self.formats.is_empty() {
            // ISO dates, also as the date part of a timestamp.
            return NaiveDate::parse_from_str(text.get(..10).unwrap_or(text), "%Y-%m-%d")
                .map_err(|_| "unparseable date");
        }
        self.formats
            .iter()
            .find_map(|f| NaiveDate::parse_from_str(text, f).ok())
            .ok_or("unparseable date")
    }

    fn parse_timestamp(&self, text: &str) -> Result<DateTime<Utc>, &'static str> {
        if let Ok(t) = DateTime::parse_from_rfc3339(text) {
            return Ok(t.with_timezone(&Utc));
        }
        let formats: Vec<&str> = if self.formats.is_empty() {
            vec!["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]
        } else {
            self.formats.iter().map(String::as_str).collect()
        };
        formats
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
            .map(|t| t.and_utc())
            .ok_or("unparseable timestamp")
    }
}

/// "1,234.50" -> "1234.50"; spaces and thousands separators go.
fn strip_separators(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ',' && *c != '_' && !c.is_whitespace())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(t: ColumnType) -> ColumnSpec {
        ColumnSpec {
            name: "c".into(),
            from: None,
            column_type: t,
            formats: vec![],
        }
    }

    #[test]
    fn casts_the_dirt_of_real_crm_answers() {
        assert_eq!(
            col(ColumnType::String).cast(&json!(100002)),
            Ok(json!("100002"))
        );
        assert_eq!(col(ColumnType::String).cast(&json!("  ")), Ok(Value::Null));
        assert_eq!(
            col(ColumnType::Float).cast(&json!("43.65")),
            Ok(json!(43.65))
        );
        assert_eq!(
            col(ColumnType::Float).cast(&json!("north")),
            Err("not a number")
        );
        assert_eq!(
            col(ColumnType::Integer).cast(&json!("1,234")),
            Ok(json!(1234))
        );
        assert_eq!(
            col(ColumnType::Numeric).cast(&json!("1,234.50")),
            Ok(json!("1234.50"))
        );
        assert_eq!(
            col(ColumnType::Numeric).cast(&json!("1.2.3")),
            Err("not a decimal number")
        );
        assert_eq!(
            col(ColumnType::Boolean).cast(&json!("Yes")),
            Ok(json!(true))
        );
        assert_eq!(
            col(ColumnType::Date).cast(&json!("2021-03-04")),
            Ok(json!("2021-03-04"))
        );
        assert_eq!(
            col(ColumnType::Date).cast(&json!("soon")),
            Err("unparseable date")
        );
        let dmy = ColumnSpec {
            formats: vec!["%d/%m/%Y".into()],
            ..col(ColumnType::Date)
        };
        assert_eq!(dmy.cast(&json!("04/03/2021")), Ok(json!("2021-03-04")));
        assert_eq!(
            col(ColumnType::Timestamp).cast(&json!("2026-11-24T01:02:03+07:00")),
            Ok(json!("2026-11-23T18:02:03.000000Z"))
        );
        assert_eq!(
            col(ColumnType::String).cast(&json!({"a": 1})),
            Err("nested value where a scalar was expected")
        );
    }
}
