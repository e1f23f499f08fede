//! Log set-up: human-readable text on stdout, and rotating files (JSON or text) under
//! `[log] dir`. Every log line of the daemon goes through `tracing`.

use std::io::IsTerminal as _;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation as AppenderRotation};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat, Rotation};

mod json;
pub use json::JsonLines;

/// Keeps the background log writers alive; drop it last so buffered lines reach the file.
pub struct LogGuard {
    _file: Option<WorkerGuard>,
    _stdout: Option<WorkerGuard>,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create log directory {dir}: {source}")]
    Dir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open rotating log in {dir}: {message}")]
    Appender {
        dir: std::path::PathBuf,
        message: String,
    },
}

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr only: one-shot commands, whose stdout is their own output.
pub fn init_stderr(level: &str) {
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(filter(level))
        .try_init();
}

/// Which formatter writes the JSON log files. Both write the same lines; only the cost differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JsonFormatter {
    /// [`JsonLines`], the daemon's.
    #[default]
    JsonLines,
    /// tracing-subscriber's own JSON layer, the format `JsonLines` reproduces: the baseline of
    /// the `log_line` benchmark.
    TracingSubscriber,
}

/// Logs to stdout and, with `[log] dir` set, to rotating files there.
pub fn init(cfg: &LogConfig) -> Result<LogGuard, LogError> {
    init_with(cfg, true, JsonFormatter::JsonLines)
}

/// As [`init`], with the given JSON formatter: lets the `log_line` benchmark compare both
/// through the daemon's own set-up.
pub fn init_with_json_formatter(
    cfg: &LogConfig,
    json: JsonFormatter,
) -> Result<LogGuard, LogError> {
    init_with(cfg, true, json)
}

/// Logs to the rotating files only (for `pushdrop demo`, whose stdout is its report).
pub fn init_files_only(cfg: &LogConfig) -> Result<LogGuard, LogError> {
    init_with(cfg, false, JsonFormatter::JsonLines)
}

fn init_with(cfg: &LogConfig, stdout: bool, json: JsonFormatter) -> Result<LogGuard, LogError> {
    let Some(dir) = &cfg.dir else {
        if stdout {
            // No files: stdout is the daemon's log, every line of it.
            let _ = tracing_subscriber::registry()
                .with(
                    fmt::layer()
                        .with_target(false)
                        .with_ansi(std::io::stdout().is_terminal())
                        .with_writer(std::io::stdout),
                )
                .with(filter(&cfg.level))
                .try_init();
        }
        return Ok(LogGuard {
            _file: None,
            _stdout: None,
        });
    };
    std::fs::create_dir_all(dir).map_err(|source| LogError::Dir {
        dir: dir.clone(),
        source,
    })?;
    let rotation = match cfg.rotation {
        Rotation::Hourly => AppenderRotation::HOURLY,
        Rotation::Daily => AppenderRotation::DAILY,
        Rotation::Never => AppenderRotation::NEVER,
    };
    let appender = RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix("pushdrop")
        .filename_suffix("log")
        .max_log_files(cfg.keep_files.max(1))
        .build(dir)
        .map_err(|e| LogError::Appender {
            dir: dir.clone(),
            message: e.to_string(),
        })?;
    // Written by a background thread, a batch of lines per write (the worker flushes whenever
    // its queue runs dry). Never lossy: every delivery outcome must reach the file, so a
    // stalled disk slows the sender down instead of dropping lines.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("pushdrop-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, appender));
    let file_layer = match (cfg.format, json) {
        // One JSON object per line; see `json` for the format.
        (LogFormat::Json, JsonFormatter::JsonLines) => fmt::layer()
            .event_format(JsonLines::new())
            .with_writer(writer)
            .boxed(),
        (LogFormat::Json, JsonFormatter::TracingSubscriber) => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        (LogFormat::Text, _) => fmt::layer().with_ansi(false).with_writer(writer).boxed(),
    };
    // stdout off the sending threads too (a line per delivery); colours only on a terminal.
    // Lossy: a stdout nobody reads must not stall the daemon; the files have every line.
    let (stdout_layer, stdout_guard) = if stdout {
        let ansi = std::io::stdout().is_terminal();
        let (w, g) = NonBlockingBuilder::default()
            .thread_name("pushdrop-stdout")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stdout(),
            ));
        (
            Some(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(w)
                    // The files have every delivery line; stdout keeps only the unusual ones.
                    .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                        !(meta.target() == crate::sender::DELIVERY_TARGET
                            && *meta.level() >= tracing::Level::INFO)
                    })),
            ),
            Some(g),
        )
    } else {
        (None, None)
    };
    let _ = tracing_subscriber::registry()
        .with(stdout_layer)
        .with(file_layer)
        .with(filter(&cfg.level))
        .try_init();
    Ok(LogGuard {
        _file: Some(guard),
        _stdout: stdout_guard,
    })
}

use tracing_subscriber::Layer as _;
