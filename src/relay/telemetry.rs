//! Logs: tracing-subscriber with an env filter (`QX_RELAY__LOG`, else `RUST_LOG`, else `info`), as text for
//! people or JSON for log pipelines. Initialised first, so even a config error uses the chosen format.
//!
//! The libraries stay at warn unless named: at debug async-nats writes a line per message and sqlx one per
//! statement. A bare level is the relay's own: `debug` means `qx_relay=debug`, the rest at info or quieter.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
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

/// Libraries kept at warn unless a directive names them.
const QUIET_LIBRARIES: &[&str] =
    &["async_nats", "sqlx", "sqlx_core", "sqlx_postgres", "hyper", "hyper_util", "redis", "rustls"];

/// Library targets silenced unless a directive names their library:
/// - async-nats' connector logs each failed (re)connect at error, and the relay reports each one itself, with
///   the server (a credentials error would otherwise be logged twice, and every 2 s during an outage);
/// - sqlx logs every statement over a second at warn, and a claim that waits on rows another relay holds (up
///   to `lock_wait`) or on a busy server is no news: the relay reports a step that fails or times out itself.
const SILENCED: &[(&str, &str)] = &[("async_nats", "async_nats::connector"), ("sqlx", "sqlx::query")];

/// The crate's own target, which a bare level applies to.
const OWN_TARGET: &str = "qx_relay";

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let written = [ENV_LOG_FILTER, "RUST_LOG"].into_iter().find_map(|name| {
        std::env::var(name).ok().filter(|value| !value.trim().is_empty()).map(|v| (name, v))
    });
    let (filter, refused) = match &written {
        Some((name, value)) => match EnvFilter::try_new(directives(value)) {
            Ok(filter) => (filter, None),
            Err(err) => (EnvFilter::new(directives("")), Some((*name, err))),
        },
        None => (EnvFilter::new(directives("")), None),
    };
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
    if let Some((name, err)) = refused {
        tracing::warn!("{name} is not a log filter ({err}); logging at info");
    }
}

/// The filter for what the user wrote: their directives, a bare level turned into the relay's own (the rest
/// at that level or info, whichever is quieter), and the libraries at warn unless named.
fn directives(written: &str) -> String {
    let (mut bare, mut named) = (None, Vec::new());
    for directive in written.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.parse::<LevelFilter>() {
            Ok(level) => bare = Some(level),
            Err(_) => named.push(directive),
        }
    }
    let names = |target: &str| named.iter().any(|d| d.split(['[', '=']).next() == Some(target));
    let mut out = vec![bare.map_or(LevelFilter::INFO, |level| level.min(LevelFilter::INFO)).to_string()];
    if let Some(level) = bare.filter(|_| !names(OWN_TARGET)) {
        out.push(format!("{OWN_TARGET}={level}"));
    }
    out.extend(named.iter().map(|directive| (*directive).to_owned()));
    out.extend(
        QUIET_LIBRARIES.iter().filter(|library| !names(library)).map(|library| format!("{library}=warn")),
    );
    let names_library = |library: &str| named.iter().any(|d| d.starts_with(library));
    out.extend(
        SILENCED
            .iter()
            .filter(|(library, _)| !names_library(library))
            .map(|(_, target)| format!("{target}=off")),
    );
    out.join(",")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_stay_at_warn_unless_named() {
        assert_eq!(
            directives(""),
            "info,async_nats=warn,sqlx=warn,sqlx_core=warn,sqlx_postgres=warn,hyper=warn,hyper_util=warn,\
             redis=warn,rustls=warn,async_nats::connector=off,sqlx::query=off"
        );
        let debug = directives("debug");
        assert!(debug.starts_with("info,qx_relay=debug,async_nats=warn,"), "{debug}");
        let named = directives("qx_relay=debug,async_nats=debug");
        assert!(named.starts_with("info,qx_relay=debug,async_nats=debug,sqlx=warn,"), "{named}");
        assert!(!named.contains("async_nats=warn"), "{named}");
        assert!(!named.contains("async_nats::connector=off"), "named, it logs as asked: {named}");
        let quiet = directives("warn");
        assert!(quiet.starts_with("warn,qx_relay=warn,"), "{quiet}");
        for written in ["", "debug", "info,qx_relay=debug", "warn,async_nats[connect]=trace", "trace"] {
            EnvFilter::try_new(directives(written)).unwrap_or_else(|err| panic!("{written}: {err}"));
        }
    }
}
