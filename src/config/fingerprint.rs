//! The fingerprint of a pipeline's definition: a short digest of its `[[pipelines]]` table as written,
//! so that processes with different config files can tell whether they define a pipeline the same way.
//!
//! Normalised: key order, inline or standard tables, comments and whitespace do not count; any value
//! that differs does, a default written out included. The table holds secret references
//! (`{ env = "EZFOCUS_PASSWORD" }`), never secret values (the config refuses literal secrets), so
//! the digest carries nothing secret.

use sha2::{Digest, Sha256};

/// Twelve hex digits of the SHA-256 of the table's canonical JSON form.
pub fn fingerprint(table: &toml::Table) -> String {
    let mut canonical = String::new();
    write_table(table, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    hex::encode(&digest[..6])
}

fn write_table(table: &toml::Table, out: &mut String) {
    let mut keys: Vec<&String> = table.keys().collect();
    keys.sort();
    out.push('{');
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(key, out);
        out.push(':');
        write_value(&table[key], out);
    }
    out.push('}');
}

fn write_value(value: &toml::Value, out: &mut String) {
    match value {
        toml::Value::String(s) => write_string(s, out),
        toml::Value::Integer(i) => out.push_str(&i.to_string()),
        toml::Value::Float(f) => out.push_str(&format!("{f:?}")),
        toml::Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        toml::Value::Datetime(d) => write_string(&d.to_string(), out),
        toml::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        toml::Value::Table(t) => write_table(t, out),
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> String {
        fingerprint(&toml::from_str::<toml::Table>(text).unwrap())
    }

    #[test]
    fn layout_does_not_count_values_do() {
        let a = of("name = \"p\"\nmax_attempts = 3\nsource = { kind = \"noop\", steps = 2 }\n");
        let b = of(
            "# comment\nmax_attempts   = 3\nname = \"p\"\n[source]\nsteps = 2\nkind = \"noop\"\n",
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 12);
        assert_ne!(
            a,
            of("name = \"p\"\nmax_attempts = 4\nsource = { kind = \"noop\", steps = 2 }\n")
        );
        // A default written out is a different definition as written.
        assert_ne!(
            of("name = \"p\"\nsource = { kind = \"noop\" }\n"),
            of("name = \"p\"\nsource = { kind = \"noop\", steps = 1 }\n")
        );
        // Strings cannot be confused with other values or with each other's keys.
        assert_ne!(of("a = \"1\""), of("a = 1"));
        assert_ne!(of("a = \"b:c\""), of("a = { b = \"c\" }"));
    }
}
