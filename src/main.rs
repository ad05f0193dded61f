//! `qx-relay`: CLI → telemetry → config → runtime → exit code; nothing else.

use clap::Parser;
use qx_relay::relay::cli::{self, Cli, Command, DeadCommand};
use qx_relay::relay::config::{self, Config};
use qx_relay::relay::store::Requeue;
use qx_relay::relay::{self, error_chain, ops, shutdown, telemetry, ExitCode};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return exit(if err.use_stderr() { ExitCode::Usage } else { ExitCode::Ok });
        }
    };
    telemetry::init(cli.log_format);
    if let Some(command) = cli.command.as_ref().filter(|command| command.is_offline()) {
        return exit(offline(command));
    }
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for warning in config::unknown_env_keys(names) {
        warn!("{warning}");
    }
    let config = match Config::load(cli.config.as_deref(), &cli.overrides) {
        Ok(config) => config,
        Err(err) => {
            error!("configuration error: {err}");
            return exit(ExitCode::Config);
        }
    };
    // One thread: the relay spends under half a core, mostly waiting on Postgres and NATS, and on a second
    // worker every ack and every batch would cross threads to wake the engine.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            error!("cannot start the async runtime: {err}");
            return exit(ExitCode::Internal);
        }
    };
    let code = runtime.block_on(dispatch(cli.command.unwrap_or(Command::Run), config));
    // Tasks still waiting on a server that stopped answering must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    exit(code)
}

async fn dispatch(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Run => {
            let token = CancellationToken::new();
            if let Err(err) = shutdown::listen(token.clone()) {
                error!("cannot install signal handlers: {err}");
                return ExitCode::Internal;
            }
            match relay::run(config, token).await {
                Ok(_) => ExitCode::Ok,
                Err(err) => {
                    error!("relay stopped: {}", error_chain(&err));
                    ExitCode::from(&err)
                }
            }
        }
        Command::Check { json } => ops::check(&config, json).await,
        Command::Config { json, .. } => ops::print_config(&config, json),
        Command::Status { json } => ops::status(&config, json).await,
        Command::Dead { command: DeadCommand::List { limit, event_name, json } } => {
            ops::dead_list(&config, limit, event_name.as_deref(), json).await
        }
        Command::Dead { command: DeadCommand::Show { id, json } } => ops::dead_show(&config, id, json).await,
        Command::Dead { command: DeadCommand::Requeue { ids, event_name, all, dry_run, json } } => {
            let which = match (all, event_name) {
                (true, _) => Requeue::All,
                (false, Some(name)) => Requeue::EventName(name),
                (false, None) => Requeue::Ids(ids),
            };
            ops::dead_requeue(&config, &which, dry_run, json).await
        }
        offline @ (Command::Completions { .. } | Command::Man { .. }) => self::offline(&offline),
    }
}

/// What the binary prints about itself, without settings: the configuration reference, shell completions,
/// man pages.
fn offline(command: &Command) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = match command {
        Command::Completions { shell } => {
            cli::completions(*shell, &mut stdout);
            Ok(())
        }
        Command::Man { out_dir } => cli::man(out_dir.as_deref(), &mut stdout),
        _ => write!(stdout, "{}", config::reference::markdown()),
    };
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::Ok,
        // `| head` closing the pipe early is not a failure.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::Ok,
        Err(err) => {
            error!("cannot write: {err}");
            ExitCode::Internal
        }
    }
}

fn exit(code: ExitCode) -> std::process::ExitCode {
    std::process::ExitCode::from(code as u8)
}
