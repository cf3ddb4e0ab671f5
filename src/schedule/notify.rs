//! Webhook notifications: a JSON POST that Slack and Mattermost incoming
//! webhooks display (`text`), with the structured facts alongside for
//! anything else that consumes it.
//!
//! The URL is a secret (Slack puts the token in the path): it is never
//! logged, and transport errors are reported without it.

use crate::records::jobs::{JobRun, Outcome};
use crate::schedule::config::Notify;
use secrecy::ExposeSecret;

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Failure,
    Recovery,
    Success,
}

/// Which event (if any) a finished run triggers, given the outcome of the
/// job's previous finished run.
pub fn event_for(outcome: Outcome, previous: Option<Outcome>, on_success: bool) -> Option<Event> {
    if outcome.is_bad() {
        return Some(Event::Failure);
    }
    if outcome == Outcome::Success {
        if previous.is_some_and(Outcome::is_bad) {
            return Some(Event::Recovery);
        }
        if on_success {
            return Some(Event::Success);
        }
    }
    None
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The JSON body for an event.
pub fn payload(event: Event, run: &JobRun, host: &str, detail: &str) -> serde_json::Value {
    let duration = run
        .finished_ms
        .map(|f| (f - run.started_ms) as f64 / 1000.0)
        .unwrap_or(0.0);
    let head = match event {
        Event::Failure => format!(
            ":x: labctl job `{}` on {host}: {} after {} attempt(s)",
            run.job, run.outcome, run.attempts
        ),
        Event::Recovery => format!(
            ":white_check_mark: labctl job `{}` on {host} recovered",
            run.job
        ),
        Event::Success => format!(
            ":white_check_mark: labctl job `{}` on {host} succeeded",
            run.job
        ),
    };
    let mut text = format!("{head} ({duration:.0}s)");
    if let Some(e) = &run.error {
        text.push_str(&format!("\n> {e}"));
    } else if !detail.is_empty() {
        text.push_str(&format!("\n{detail}"));
    }
    serde_json::json!({
        "text": text,
        "username": "labctl",
        "event": event,
        "job": run.job,
        "host": host,
        "outcome": run.outcome,
        "trigger": run.trigger,
        "attempts": run.attempts,
        "started": rfc3339(run.started_ms),
        "finished": run.finished_ms.map(rfc3339),
        "duration_seconds": duration,
        "bytes_read": run.bytes_read,
        "bytes_added": run.bytes_added,
        "snapshots": run.snapshots,
        "error": run.error,
    })
}

/// Sends `body`, retrying twice on transport errors and 5xx/429.
///
/// # Errors
/// A message without the URL.
pub async fn send(n: &Notify, body: &serde_json::Value) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(n.timeout)
        .build()
        .map_err(|e| format!("webhook client: {}", e.without_url()))?;
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500 * 2u64.pow(attempt))).await;
        }
        match client.post(n.url.expose_secret()).json(body).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => {
                last = format!("webhook (from {}) answered {}", n.origin, r.status());
                if !(r.status().is_server_error() || r.status().as_u16() == 429) {
                    return Err(last);
                }
            }
            Err(e) => last = format!("webhook (from {}): {}", n.origin, e.without_url()),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_follow_outcomes() {
        assert_eq!(
            event_for(Outcome::Failure, None, false),
            Some(Event::Failure)
        );
        assert_eq!(
            event_for(Outcome::Timeout, Some(Outcome::Success), false),
            Some(Event::Failure)
        );
        assert_eq!(
            event_for(Outcome::Success, Some(Outcome::Failure), false),
            Some(Event::Recovery)
        );
        assert_eq!(
            event_for(Outcome::Success, Some(Outcome::Success), false),
            None
        );
        assert_eq!(
            event_for(Outcome::Success, None, true),
            Some(Event::Success)
        );
        assert_eq!(
            event_for(Outcome::Skipped, Some(Outcome::Failure), true),
            None
        );
        assert_eq!(event_for(Outcome::Cancelled, None, true), None);
    }
}
