//! The `pushdrop` command line: parses arguments and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pushdrop::cli;

/// mimalloc instead of the system allocator: see Cargo.toml.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns JSON files dropped into an inbox directory into Apple push notifications.
#[derive(Parser)]
#[command(name = "pushdrop", version, about)]
struct Cli {
    /// The configuration file [default: config/pushdrop.toml] (`demo` and `simulate` need
    /// none, and check one only when it is named).
    #[arg(long, global = true, env = "PUSHDROP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: inbox watcher, sender, admin endpoint.
    Run,
    /// A self-contained tour: temp dir, built-in APNs simulator, the files of inbox-example/.
    Demo {
        /// Folder of drop files to use instead of the built-in examples.
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Keep the demo's temporary folder and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Checks drop files without ingesting them; exit 1 if any would be rejected.
    Validate {
        /// Drop files (`*.json`, `*.jsonl`) to check; nothing is moved or written.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Ingests drop files once, through the same path as the watcher.
    Ingest {
        /// Drop files to ingest, in this order; each is moved to processed/ or rejected/.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Whether a daemon runs, files waiting in the inbox, queue depth by state and app, oldest
    /// queued age, devices, paused apps, recent errors.
    Status {
        /// The same figures as JSON (as the admin endpoint's /status, which adds the
        /// inbox's stuck files).
        #[arg(long)]
        json: bool,
    },
    /// One notification and its deliveries.
    Show {
        /// The notification's id (the record's `id`, or the one pushdrop assigned).
        id: String,
        /// The app, when the same id exists for several apps.
        #[arg(long)]
        app: Option<String>,
        /// As JSON (the target uncut, and also as the record's `to` object).
        #[arg(long)]
        json: bool,
    },
    /// The device registry.
    Devices {
        /// Only this app's devices.
        #[arg(long)]
        app: Option<String>,
        /// Only this user's devices.
        #[arg(long)]
        user: Option<String>,
        /// Only invalidated devices.
        #[arg(long)]
        invalid: bool,
        /// As a JSON array, one object per device.
        #[arg(long)]
        json: bool,
        /// At most this many rows (default: all; a cut list is said on stderr).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Requeues failed deliveries of one notification, or all of them.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "failed"])))]
    Retry {
        /// The notification whose failed deliveries to requeue.
        id: Option<String>,
        /// The app of the notification, when two apps use its id; with --failed, only that
        /// app's failed deliveries.
        #[arg(long)]
        app: Option<String>,
        /// Every failed delivery instead.
        #[arg(long)]
        failed: bool,
    },
    /// Drops finished notifications and deliveries, invalid devices, unregistered tokens
    /// nothing refers to and committed-file records past retention (keep_finished_days).
    Purge,
    /// Runs the APNs simulator as a server, for your own integration tests.
    #[command(after_help = SIMULATE_HELP)]
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2197")]
        listen: std::net::SocketAddr,
        /// Folder to write the CA, a .p8 key and a matching config snippet into: a new or
        /// empty one, or one an earlier start wrote (its credentials are kept).
        #[arg(long, default_value = "simulator")]
        dir: PathBuf,
        /// Simulated latency per answer, in milliseconds (at most an hour).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=pushdrop::simulator::MAX_DELAY_MS))]
        latency_ms: u64,
        /// A TOML file of scripted answers (per token, per connection); re-read on SIGHUP.
        #[arg(long)]
        script: Option<PathBuf>,
        /// A bundle id the simulated team may push to (repeatable; default
        /// com.example.simulated). Other topics get 400 TopicDisallowed, as from Apple; "*"
        /// allows any.
        #[arg(long = "bundle-id", value_name = "ID", value_parser = bundle_id_arg)]
        bundle_ids: Vec<String>,
    },
    /// Validates the configuration file.
    CheckConfig,
    /// Writes a consistent copy of the database, safe while the daemon runs.
    Backup {
        /// Where to write the copy (a new file; an existing one is refused).
        dest: PathBuf,
    },
}

/// What `simulate --help` shows after the options: where its files go and the script format,
/// for a user who has the binary and not the README.
const SIMULATE_HELP: &str = "\
It writes into --dir: ca.pem (for [apns] ca_file), AuthKey_<KEYID>.p8 with its key and team ids
(simulator-ids.toml), client.pem/client-key.pem (certificate auth) and pushdrop-simulator.toml,
a config pointing at it; it prints the same on start. A restart on the same --dir keeps them.

--script FILE (TOML; re-read on SIGHUP) scripts answers per connection and per device token:
  latency_ms = 0                        # before every answer
  goaway_after = 100                    # new connections: GOAWAY after 100 streams
  drop_after = 50                       # ... or closed without a word after 50 answers
  streams_one_until_authorized = true   # MAX_CONCURRENT_STREAMS 1 until the first authorised answer
  [tokens]
  \"a0b1c2d3a0b1c2d3a0b1c2d3a0b1c2d3\" = { status = 410, timestamp_ms = 1796000000000 }  # Unregistered as of then (omitted: now)
  \"0a281d3d0a281d3d0a281d3d0a281d3d\" = { status = 400 }              # BadDeviceToken
  \"8c68b5de8c68b5de8c68b5de8c68b5de\" = { status = 503, first = 2 }   # 503 twice, then 200
  \"5f1ce9a05f1ce9a05f1ce9a05f1ce9a0\" = { delay_ms = 2000 }           # a slow answer
  \"77aa01bc77aa01bc77aa01bc77aa01bc\" = { status = 400, reason = \"DeviceTokenNotForTopic\" }
status is any 4xx or 5xx; reason defaults to Apple's for 400, 410, 429, 500 and 503 and must be
one of Apple's for a status Apple documents. GOAWAYs and scripted drops are logged on stderr
(sim_goaway, sim_connection_dropped); on stop it says how many requests it served.";

/// `--bundle-id`: what `check-config` takes as a bundle id, or `*`.
fn bundle_id_arg(s: &str) -> Result<String, String> {
    if s == "*" || pushdrop::config::is_bundle_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a bundle id (not empty, no spaces), nor \"*\""
        ))
    }
}

fn main() -> ExitCode {
    // `PUSHDROP_CONFIG=` (set, but empty) means the default, as an unset one does; clap would
    // call it a missing value of `--config`, an option the user never gave.
    if std::env::var_os("PUSHDROP_CONFIG").is_some_and(|v| v.is_empty()) {
        // SAFETY: the first thing the process does, before any other thread exists.
        unsafe { std::env::remove_var("PUSHDROP_CONFIG") };
    }
    let cli = Cli::parse();
    cli::exit_1_when_output_fails();
    if matches!(
        cli.command,
        Command::Status { .. }
            | Command::Show { .. }
            | Command::Devices { .. }
            | Command::Validate { .. }
            | Command::CheckConfig
    ) {
        cli::quiet_on_closed_pipe();
    }
    let named = cli.config.as_deref();
    let config = named.unwrap_or(Path::new("config/pushdrop.toml"));
    let result = match cli.command {
        Command::Run => cli::run::run(config),
        Command::Demo { examples, keep } => {
            cli::check_named_config(named).and_then(|()| cli::demo::demo(examples.as_deref(), keep))
        }
        Command::Validate { files } => cli::inbox_cmds::validate(config, &files),
        Command::Ingest { files } => cli::inbox_cmds::ingest(config, &files),
        Command::Status { json } => cli::store_cmds::status(config, json),
        Command::Show { id, app, json } => cli::store_cmds::show(config, &id, app.as_deref(), json),
        Command::Devices {
            app,
            user,
            invalid,
            json,
            limit,
        } => cli::store_cmds::devices(
            config,
            &cli::store_cmds::DeviceFilter {
                app,
                user,
                invalid,
                limit,
            },
            json,
        ),
        Command::Retry { id, app, failed: _ } => {
            cli::store_cmds::retry(config, id.as_deref(), app.as_deref())
        }
        Command::Purge => cli::store_cmds::purge(config),
        Command::Simulate {
            listen,
            dir,
            latency_ms,
            script,
            bundle_ids,
        } => cli::check_named_config(named).and_then(|()| {
            cli::simulate::simulate(listen, &dir, latency_ms, script.as_deref(), &bundle_ids)
        }),
        Command::CheckConfig => cli::check_config(config),
        Command::Backup { dest } => cli::store_cmds::backup(config, &dest),
    };
    cli::exit(result)
}
