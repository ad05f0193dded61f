//! Logs: tracing-subscriber with an env filter (`QX_RELAY__LOG`, else `RUST_LOG`, else `info`), as text for
//! people or JSON for log pipelines. Initialised first, so even a config error uses the chosen format.

use std::io::IsTerminal;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

use super::config::ENV_LOG_FILTER;
use super::escape::Escaping;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = std::env::var(ENV_LOG_FILTER)
        .ok()
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            // Colours are for terminals: in a file or a log pipeline they are escape codes to strip.
            let colour =
                std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.fmt_fields(EscapedFields::default()).with_ansi(colour).init()
        }
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// tracing-subscriber's `key=value` fields with control characters escaped, the message's too: its text
/// formatter writes field values raw, and some (`event_name`, a publish error) come from the producers' rows.
#[derive(Default)]
struct EscapedFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> std::fmt::Result {
        let mut escaping = Escaping(&mut writer);
        self.0.format_fields(Writer::new(&mut escaping), fields)
    }
}
