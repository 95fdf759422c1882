//! The daemon's log lines: `text` (tracing-subscriber's human format, the
//! default) or `json` (one JSON object per line, from the very first line:
//! the event's fields flattened next to `timestamp`, `level`, `target`,
//! `message`, plus `span`, the current span, and `spans`, every span it is
//! in, outermost first, each with its fields, e.g. a request's
//! `request_id` or an environment task's `env_id`).
//!
//! Under systemd both formats go to stderr, which journald reads line by
//! line; a JSON line reaches the journal as its `MESSAGE`, unchanged (see
//! docs/operations.md, "Logs", for why there is no journald-native
//! writer).

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// `--log-format` / `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?} (expected text or json)")]
pub struct BadLogFormat(String);

impl std::str::FromStr for LogFormat {
    type Err = BadLogFormat;
    fn from_str(s: &str) -> Result<Self, BadLogFormat> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(BadLogFormat(other.to_string())),
        }
    }
}

/// What `RUST_LOG` does not say: shoal at info, everything else at warn.
pub const DEFAULT_FILTER: &str = "shoal=info,warn";

/// Installs the global subscriber, writing to stderr. Call once, before
/// anything logs.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            // Colours only on a terminal: a log file or journald gets plain text.
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_names_and_refuses_others() {
        for (s, want) in [
            ("text", Some(LogFormat::Text)),
            ("json", Some(LogFormat::Json)),
        ] {
            assert_eq!(s.parse::<LogFormat>().ok(), want, "{s}");
            assert_eq!(want.unwrap().as_str(), s);
        }
        for bad in ["", "JSON", "journald", "txt"] {
            let e = bad.parse::<LogFormat>().unwrap_err().to_string();
            assert!(e.contains("text or json"), "{bad}: {e}");
        }
        #[derive(Deserialize)]
        struct C {
            log_format: LogFormat,
        }
        let c: C = toml::from_str("log_format = \"json\"").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(toml::from_str::<C>("log_format = \"xml\"").is_err());
    }
}
