//! The bodies webhooks receive: a flat JSON object for programs, and Slack's `text` + `blocks` for
//! people. Both carry the same facts; neither carries anything secret (run errors are secret-free by
//! design, and the webhook URL is not part of the facts).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::WebhookFormat;

/// Longest run error quoted in a Slack message: enough to act on, short enough to read in a channel.
pub const SLACK_ERROR_CHARS: usize = 500;
/// Longest run error sent in the JSON form (validation failures can list many reasons).
pub const JSON_ERROR_CHARS: usize = 4000;

/// What a notification says about a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFacts {
    /// `run_failed` or `run_recovered`.
    pub event: String,
    pub pipeline: String,
    pub run_id: Uuid,
    pub batch_id: String,
    pub status: String,
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub attempts: i32,
    pub finished_at: Option<DateTime<Utc>>,
    /// `{public_url}/runs/{run_id}`.
    pub console_url: String,
}

impl RunFacts {
    fn failed(&self) -> bool {
        self.event == "run_failed"
    }
}

/// The body for a webhook of `format`.
pub fn body(format: WebhookFormat, facts: &RunFacts) -> Value {
    match format {
        WebhookFormat::Json => json_body(facts),
        WebhookFormat::Slack => slack_body(facts),
    }
}

/// `{"event", "pipeline", "run_id", "batch_id", "status", "failed_step", "error", "attempts",
/// "finished_at", "console_url"}`; absent facts are `null`.
pub fn json_body(f: &RunFacts) -> Value {
    json!({
        "event": f.event,
        "pipeline": f.pipeline,
        "run_id": f.run_id,
        "batch_id": f.batch_id,
        "status": f.status,
        "failed_step": f.failed_step,
        "error": f.error.as_deref().map(|e| truncate(e, JSON_ERROR_CHARS)),
        "attempts": f.attempts,
        "finished_at": f.finished_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "console_url": f.console_url,
    })
}

/// A Slack message: `text` is what notifications and old clients show, `blocks` the full layout.
pub fn slack_body(f: &RunFacts) -> Value {
    let pipeline = escape(&f.pipeline);
    let step = f.failed_step.as_deref().map(escape);
    let (marker, headline) = if f.failed() {
        let at = step
            .as_deref()
            .map(|s| format!(" at step `{s}`"))
            .unwrap_or_default();
        (":red_circle:", format!("*{pipeline}* run failed{at}"))
    } else {
        (
            ":large_green_circle:",
            format!("*{pipeline}* recovered: the run succeeded after a failure"),
        )
    };
    let mut fields = vec![
        field("Pipeline", &format!("`{pipeline}`")),
        field("Batch", &format!("`{}`", escape(&f.batch_id))),
    ];
    if let Some(step) = &step {
        fields.push(field("Failed step", &format!("`{step}`")));
    }
    fields.push(field("Attempts", &f.attempts.to_string()));
    if let Some(t) = f.finished_at {
        fields.push(field(
            "Finished",
            &t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ));
    }
    let mut blocks = vec![
        section(&format!("{marker} {headline}")),
        json!({ "type": "section", "fields": fields }),
    ];
    let mut text = format!("{marker} crm-sync: {headline}");
    if let Some(error) = f.error.as_deref().filter(|_| f.failed()) {
        let quoted = escape(&truncate(error, SLACK_ERROR_CHARS)).replace("```", "'''");
        blocks.push(section(&format!("*Error*\n```{quoted}```")));
        text.push_str(": ");
        text.push_str(&escape(&truncate(error, 150)));
    }
    blocks.push(section(&format!("<{}|Open run>", f.console_url)));
    json!({ "text": text, "blocks": blocks })
}

fn section(mrkdwn: &str) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": mrkdwn } })
}

fn field(label: &str, value: &str) -> Value {
    json!({ "type": "mrkdwn", "text": format!("*{label}*\n{value}") })
}

/// Slack's three control characters in mrkdwn; everything else is shown as is.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters, with an ellipsis when cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(event: &str) -> RunFacts {
        RunFacts {
            event: event.into(),
            pipeline: "ezfocus_accounts".into(),
            run_id: Uuid::nil(),
            batch_id: "ezfocus_accounts_20261124T140000Z_3fa9c1".into(),
            status: if event == "run_failed" {
                "failed"
            } else {
                "succeeded"
            }
            .into(),
            failed_step: (event == "run_failed").then(|| "load".to_string()),
            error: (event == "run_failed")
                .then(|| "step load failed: <html> & more ```x```".to_string()),
            attempts: 3,
            finished_at: Some("2026-11-24T14:00:05.250Z".parse().unwrap()),
            console_url: format!("https://crm.example/runs/{}", Uuid::nil()),
        }
    }

    #[test]
    fn json_form_has_every_fact() {
        let b = json_body(&facts("run_failed"));
        assert_eq!(b["event"], "run_failed");
        assert_eq!(b["failed_step"], "load");
        assert_eq!(b["attempts"], 3);
        assert_eq!(b["finished_at"], "2026-11-24T14:00:05.250Z");
        assert_eq!(b["run_id"], Uuid::nil().to_string());
        let r = json_body(&facts("run_recovered"));
        assert_eq!(r["status"], "succeeded");
        assert!(r["failed_step"].is_null() && r["error"].is_null(), "{r}");
    }

    #[test]
    fn slack_form_escapes_marks_and_links() {
        let b = slack_body(&facts("run_failed"));
        let all = b.to_string();
        assert!(b["text"].as_str().unwrap().starts_with(":red_circle:"));
        assert!(all.contains("&lt;html&gt; &amp; more '''x'''"), "{all}");
        assert!(!all.contains("<html>"), "{all}");
        assert!(
            all.contains(&format!(
                "<https://crm.example/runs/{}|Open run>",
                Uuid::nil()
            )),
            "{all}"
        );
        assert!(all.contains("*Failed step*\\n`load`"), "{all}");
        let r = slack_body(&facts("run_recovered"));
        assert!(
            r["text"]
                .as_str()
                .unwrap()
                .starts_with(":large_green_circle:")
        );
        assert!(!r.to_string().contains("*Error*"));
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let mut f = facts("run_failed");
        f.error = Some("é".repeat(2000));
        let b = slack_body(&f);
        let error_block = b["blocks"][2]["text"]["text"].as_str().unwrap();
        assert_eq!(
            error_block.chars().filter(|c| *c == 'é').count(),
            SLACK_ERROR_CHARS
        );
        assert!(error_block.contains('…'));
        assert_eq!(truncate("short", 10), "short");
    }
}
