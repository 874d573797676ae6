//! Telemetry shared by every Switchyard binary:
//!
//! - logs: `tracing` to stderr, level from `RUST_LOG` (default `info`), so stdout stays free for
//!   machine-readable output; as text (coloured only when stderr is a terminal and `NO_COLOR`
//!   is unset) or as one JSON object a line ([`LogFormat`]);
//! - traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported by OTLP/gRPC
//!   ([`otel`]), and W3C trace context crosses process boundaries ([`propagation`]);
//! - metrics: a Prometheus registry per component and an axum router serving it ([`metrics`]).

pub mod capture;
mod error_chain;
pub mod metrics;
pub mod otel;
pub mod propagation;
mod span_fields;
pub mod weighted_histogram;

use std::io::IsTerminal as _;

pub use error_chain::{ErrorChain, chain_text};
pub use otel::{Telemetry, TelemetryError, init};
pub use span_fields::LatestSpanFields;

/// How log lines are written (`--log-format`, `SWITCHYARD_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `<time> <LEVEL> <span{fields}>: <target>: <message> <fields>`, for people.
    #[default]
    Text,
    /// One JSON object a line (`timestamp`, `level`, `target`, `fields` with the `message`,
    /// the current `span` and the list of `spans` with their fields), for log pipelines.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Whether text logs on stderr are coloured: only on a terminal, and never with `NO_COLOR` set
/// (to anything but the empty string, as <https://no-color.org> says). A file, a pipe or a
/// container runtime's log collector gets plain text.
pub fn colour_stderr() -> bool {
    colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs a logs-only global subscriber (no OTLP export). Safe to call more than once (later
/// calls are no-ops). Binaries call [`init`] instead.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(otel::env_filter())
        .with_writer(std::io::stderr)
        .with_ansi(colour_stderr())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(
            !colour(false, None),
            "a file or a pipe gets no escape codes"
        );
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert!("logfmt".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }
}
