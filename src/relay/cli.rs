//! The command line: subcommands and the flags that override the config.

use std::path::PathBuf;

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use uuid::Uuid;

use super::config::Overrides;
use super::telemetry::LogFormat;

const EXIT_CODES: &str = "\
Exit codes:
  0   clean stop (SIGTERM/SIGINT/SIGHUP, in-flight batch finished)
  1   dead show: no row with that id
  64  usage error (bad flags)
  69  a dependency (Postgres, NATS, Redis) unavailable at start or for longer than relay.give_up_after
  70  internal error
  78  configuration error (one line names the key), or a server refusing our TLS settings, certificate or
      credentials at start (one line names the server)
  130 second SIGTERM/SIGINT/SIGHUP: stopped without finishing";

/// Relays the Qx transactional outbox (`qx_outbox_events`) to NATS JetStream.
///
/// With no subcommand it runs the relay, so `qx-relay --shard-id 1 --shard-count 3` works.
#[derive(Debug, Parser)]
#[command(name = "qx-relay", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings file (TOML); defaults and env apply without it.
    #[arg(long, global = true, value_name = "PATH", env = "QX_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        value_enum,
        default_value_t,
        env = "QX_RELAY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Settings that override the file and env.
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay the outbox until SIGTERM (the default).
    Run,
    /// Validate the config, connect to Postgres and NATS, check the table and the stream; one line per check.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective config (all layers merged) as TOML, secrets redacted; unset keys as comments.
    Config {
        /// Print the reference of every setting instead (Markdown: type, default, variable, meaning).
        #[arg(long, conflicts_with = "json")]
        reference: bool,
        /// Print JSON instead of TOML, unset keys as null.
        #[arg(long)]
        json: bool,
    },
    /// Pending, parked and recently published rows per shard, and who holds the leader locks.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rows parked after failing for good (list, show, requeue).
    Dead {
        /// list, show or requeue.
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Print the shell completion script for SHELL.
    // Hidden, as `man`: packaging steps, not operator commands; the README's install section names both.
    #[command(hide = true)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one per command into DIR.
    #[command(hide = true)]
    Man {
        /// Write qx-relay.1 and a page per subcommand (qx-relay-run.1, …) here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

impl Command {
    /// Whether it runs without the relay's settings: it prints what the binary knows about itself.
    pub fn is_offline(&self) -> bool {
        matches!(self, Self::Config { reference: true, .. } | Self::Completions { .. } | Self::Man { .. })
    }
}

/// Writes the completion script of `shell` for `qx-relay`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "qx-relay", out);
}

/// Writes the man page of `qx-relay` to `out`, or, with `out_dir`, one page per command into it.
///
/// # Errors
/// Writing failed.
pub fn man(out_dir: Option<&std::path::Path>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(Cli::command(), dir)
        }
        None => clap_mangen::Man::new(Cli::command()).render(out),
    }
}

/// `qx-relay dead …`.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List parked rows, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Only this event name.
        #[arg(long)]
        event_name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Give parked rows a fresh start (attempts = 0, last_error = NULL). Never deletes anything.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "event_name", "all"])))]
    Requeue {
        /// These row ids.
        #[arg(long = "id", value_name = "ID", num_args = 1..)]
        ids: Vec<Uuid>,
        /// Every parked row of this event name.
        #[arg(long)]
        event_name: Option<String>,
        /// Every parked row.
        #[arg(long)]
        all: bool,
        /// Print the rows that would be requeued, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one row, parked or not, with its payload.
    Show {
        /// The row id.
        id: Uuid,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}
