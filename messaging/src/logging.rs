//! The node's logging: text or JSON lines on stderr, filtered by `[log] level` (or `RUST_LOG`),
//! with a handle to change the filter while running (`meshchat-node run` re-reads it on
//! SIGHUP). Colours only when stderr is a terminal, so journald gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Why logging could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter does not parse.
    #[error("log level {level:?}: {reason}")]
    Filter {
        /// The filter given.
        level: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A global subscriber was installed already, or the reload handle is gone.
    #[error("logging: {0}")]
    Setup(String),
}

/// Changes the running filter.
#[derive(Debug, Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Filter {
        level: level.into(),
        reason: e.to_string(),
    })
}

/// Installs the process's subscriber: `format` lines on stderr, filtered by `RUST_LOG` if set
/// (and valid: a bad one is reported once and `level` used), else by `level`.
pub fn init(format: LogFormat, level: &str) -> Result<LogHandle, LogError> {
    let mut bad_env = None;
    let initial = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => match filter(&env) {
            Ok(f) => f,
            Err(e) => {
                bad_env = Some(e);
                filter(level)?
            }
        },
        _ => filter(level)?,
    };
    let (layer, handle) = reload::Layer::new(initial);
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| LogError::Setup(e.to_string()))?;
    if let Some(e) = bad_env {
        tracing::warn!(error = %e, %level, "RUST_LOG ignored: using the configured level");
    }
    Ok(LogHandle(handle))
}

impl LogHandle {
    /// Replaces the filter (a bad one leaves the current one in place).
    pub fn set_level(&self, level: &str) -> Result<(), LogError> {
        let f = filter(level)?;
        self.0.reload(f).map_err(|e| LogError::Setup(e.to_string()))
    }
}
