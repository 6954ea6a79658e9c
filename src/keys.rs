//! How a key value (merge key, `unique` check, `skip_dirty_keys`) is shown in run errors, step
//! outputs, logs and so webhooks: by default a short hash, `key#3f9a2c1b` (the first 8 hex digits of
//! SHA-256 over the pipeline's name and the key's values), never the values themselves, because a key
//! may hold personal data (the Qashier key is a customer's name and phone). The same key gets the same
//! hash in every step of a pipeline, so duplicates stay told apart; row numbers find them in the
//! source. `show_key_values = true` on a pipeline shows the values instead (keys that are not
//! personal). Every place that would quote a key goes through [`KeyDisplay`].

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// How many row numbers a listing names before "and N more".
pub const ROWS_LISTED: usize = 5;

/// Renders keys for one pipeline.
#[derive(Debug, Clone)]
pub struct KeyDisplay {
    salt: String,
    show_values: bool,
}

impl KeyDisplay {
    /// `salt`: the pipeline's name (hashes of two pipelines cannot be compared);
    /// `show_values`: the pipeline's `show_key_values`.
    pub fn new(salt: &str, show_values: bool) -> Self {
        KeyDisplay {
            salt: salt.to_string(),
            show_values,
        }
    }

    /// For `pipeline`, salted with its name.
    pub fn for_pipeline(pipeline: &crate::config::PipelineConfig) -> Self {
        Self::new(&pipeline.name, pipeline.show_key_values)
    }

    /// The key of `row` over `columns`.
    pub fn row(&self, row: &Map<String, Value>, columns: &[String]) -> String {
        let parts: Vec<&Value> = columns
            .iter()
            .map(|c| row.get(c).unwrap_or(&Value::Null))
            .collect();
        self.parts(&parts)
    }

    /// A key given as its parts: `key#<8 hex>`, or with `show_key_values` the values joined with
    /// '+' (null as `null`). A part's text is what is hashed (a number and its text hash alike), so
    /// a key read back from a database as text gets the hash the batch gave it.
    pub fn parts(&self, parts: &[&Value]) -> String {
        let texts: Vec<Option<String>> = parts
            .iter()
            .map(|v| match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                v => Some(v.to_string()),
            })
            .collect();
        if self.show_values {
            return texts
                .iter()
                .map(|t| t.as_deref().unwrap_or("null"))
                .collect::<Vec<_>>()
                .join("+");
        }
        let mut hasher = Sha256::new();
        hasher.update(self.salt.as_bytes());
        hasher.update([0u8]);
        hasher.update(serde_json::to_string(&texts).unwrap_or_default().as_bytes());
        format!("key#{}", &hex::encode(hasher.finalize())[..8])
    }
}

/// Row numbers as a listing: `row 7`, `rows 2, 5`, `rows 2, 5, 9, 11, 12 and 3 more` (`listed`
/// holds the first ones, `total` counts them all).
pub fn rows(listed: &[u64], total: u64) -> String {
    let shown: Vec<String> = listed
        .iter()
        .take(ROWS_LISTED)
        .map(u64::to_string)
        .collect();
    let more = total.saturating_sub(shown.len() as u64);
    let word = if total == 1 { "row" } else { "rows" };
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("{word} {}{tail}", shown.join(", "))
}

/// Keeps the first [`ROWS_LISTED`] row numbers of something and counts them all.
#[derive(Debug, Clone, Default)]
pub struct RowList {
    pub listed: Vec<u64>,
    pub total: u64,
}

impl RowList {
    pub fn push(&mut self, row: u64) {
        self.total += 1;
        if self.listed.len() < ROWS_LISTED {
            self.listed.push(row);
        }
    }

    /// See [`rows`].
    pub fn describe(&self) -> String {
        rows(&self.listed, self.total)
    }
}

/// `text` with every double-quoted span emptied to `"…"`: a database's data error (`invalid input
/// syntax for type date: "31/02/1990"`, its context `COPY t, line 3, column dob: "…"`) without the row
/// value it quotes.
pub fn without_quoted_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, piece) in text.split('"').enumerate() {
        match i % 2 {
            0 => out.push_str(piece),
            _ => out.push_str("\"…\""),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_key_is_a_salted_short_hash_unless_values_are_asked_for() {
        let row = json!({"name": "Somchai", "phone": "0812345678", "n": 7})
            .as_object()
            .unwrap()
            .clone();
        let cols = ["name".to_string(), "phone".to_string()];
        let shown = KeyDisplay::new("qashier", false).row(&row, &cols);
        assert!(shown.starts_with("key#") && shown.len() == 12, "{shown}");
        assert!(!shown.contains("Somchai") && !shown.contains("0812345678"));
        assert_eq!(shown, KeyDisplay::new("qashier", false).row(&row, &cols));
        assert_ne!(shown, KeyDisplay::new("other", false).row(&row, &cols));
        assert_eq!(
            KeyDisplay::new("qashier", true).row(&row, &cols),
            "Somchai+0812345678"
        );
        // A number and its text hash alike; null and "" do not.
        let d = KeyDisplay::new("p", false);
        assert_eq!(d.parts(&[&json!(7)]), d.parts(&[&json!("7")]));
        assert_ne!(d.parts(&[&json!(null)]), d.parts(&[&json!("")]));
        assert_eq!(KeyDisplay::new("p", true).parts(&[&json!(null)]), "null");
    }

    #[test]
    fn quoted_values_are_left_out() {
        assert_eq!(
            without_quoted_values(r#"value "0812345678" is out of range for type integer"#),
            r#"value "…" is out of range for type integer"#
        );
        assert_eq!(without_quoted_values("no quotes"), "no quotes");
    }

    #[test]
    fn row_listings_count_what_they_do_not_name() {
        assert_eq!(rows(&[7], 1), "row 7");
        assert_eq!(rows(&[2, 5], 2), "rows 2, 5");
        let mut list = RowList::default();
        (1..=8).for_each(|r| list.push(r));
        assert_eq!(list.describe(), "rows 1, 2, 3, 4, 5 and 3 more");
    }
}
