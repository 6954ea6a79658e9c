//! Refuses API tokens that are placeholders or too weak to be secret: fewer than
//! [`MIN_DISTINCT`] distinct characters (`aaaaaaaaaaaaaaaa`), or containing `change-me`. Messages
//! name the token by where it came from and its position, never by its value.

use std::collections::HashSet;

/// Distinct characters a token needs.
pub const MIN_DISTINCT: usize = 16;

/// How to make a token that passes (shown in every refusal).
pub const HOW_TO_MAKE_ONE: &str =
    "make one with `openssl rand -base64 32` (44 characters, about 30 distinct)";

/// Checks every token of `tokens`, which came from `source` (an environment variable or file).
pub fn check_all(source: &str, tokens: &[String]) -> anyhow::Result<()> {
    for (i, token) in tokens.iter().enumerate() {
        if let Some(problem) = weakness(token) {
            anyhow::bail!(
                "{source}: token {} of {} {problem}; {HOW_TO_MAKE_ONE}",
                i + 1,
                tokens.len()
            );
        }
    }
    Ok(())
}

/// What is wrong with `token`, if anything.
fn weakness(token: &str) -> Option<String> {
    if token.to_ascii_lowercase().contains("change-me") {
        return Some("is a placeholder (it contains \"change-me\")".into());
    }
    let distinct = token.chars().collect::<HashSet<_>>().len();
    (distinct < MIN_DISTINCT).then(|| {
        format!(
            "is too weak: it has {distinct} distinct characters, at least {MIN_DISTINCT} needed"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_and_placeholder_tokens_are_named_by_position_not_value() {
        let weak = vec![
            "Zq8vN3xL1pR7tK2mW9sB4yH6".to_string(),
            "aaaaaaaaaaaaaaaa".to_string(),
        ];
        let err = check_all("CRM_SYNC_ADMIN_TOKENS", &weak)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("CRM_SYNC_ADMIN_TOKENS: token 2 of 2 is too weak: it has 1 distinct"),
            "{err}"
        );
        assert!(
            err.contains("openssl rand -base64 32") && !err.contains("aaaa"),
            "{err}"
        );
        let placeholder = vec!["local-admin-token-CHANGE-ME-0123456789".to_string()];
        let err = check_all("CRM_SYNC_READ_TOKENS_FILE (/run/t)", &placeholder)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token 1 of 1 is a placeholder"), "{err}");
        assert!(check_all("X", &weak[..1]).is_ok());
    }
}
