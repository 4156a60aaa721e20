//! The node's logging: text or JSON lines on stderr, filtered by `[log] level` (or `RUST_LOG`),
//! with a handle to change the filter while running (`meshchat-node run` re-reads it on
//! SIGHUP). Colours only when stderr is a terminal, so journald gets plain text.
//!
//! With `[log] otlp_endpoint`, the same spans (per connection, per request, per peer) are also
//! exported over OTLP/HTTP (protobuf) by a batch exporter on a thread of its own, sampled per
//! trace (`otlp_sample_ratio`). The export never blocks the node: a full batch queue drops
//! spans. [`LogHandle::shutdown`] flushes what is queued.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

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

/// Changes the running filter; flushes the span export at the end.
#[derive(Debug, Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    otlp: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// The OTLP span exporter of `endpoint`, sampling `ratio` of the traces of node `node_id`.
fn otlp_provider(
    endpoint: &str,
    ratio: f64,
    node_id: u32,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, LogError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::trace::Sampler;
    // `http://collector:4318` is what collectors document: the traces path goes after it.
    let endpoint = match endpoint.trim_end_matches('/') {
        base if base.matches('/').count() == 2 => format!("{base}/v1/traces"),
        _ => endpoint.to_owned(),
    };
    let endpoint = endpoint.as_str();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| LogError::Setup(format!("OTLP exporter {endpoint}: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("meshchat-node")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node_id.to_string(),
        ))
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build())
}

fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Filter {
        level: level.into(),
        reason: e.to_string(),
    })
}

/// Installs the process's subscriber: `config.format` lines on stderr, filtered by `RUST_LOG`
/// if set (and valid: a bad one is reported once and `config.level` used), else by
/// `config.level`; and the OTLP export of node `node_id`'s spans if `config.otlp_endpoint` is
/// set.
pub fn init(config: &LogConfig, node_id: u32) -> Result<LogHandle, LogError> {
    let (format, level) = (config.format, config.level.as_str());
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
    let otlp = match &config.otlp_endpoint {
        Some(endpoint) => Some(otlp_provider(endpoint, config.otlp_sample_ratio, node_id)?),
        None => None,
    };
    let otel = otlp.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("meshchat"))
    });
    tracing_subscriber::registry()
        .with(layer)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(|e| LogError::Setup(e.to_string()))?;
    if let Some(e) = bad_env {
        tracing::warn!(error = %e, %level, "RUST_LOG ignored: using the configured level");
    }
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(
            %endpoint,
            ratio = config.otlp_sample_ratio,
            "exporting spans over OTLP/HTTP"
        );
    }
    Ok(LogHandle {
        filter: handle,
        otlp,
    })
}

impl LogHandle {
    /// Replaces the filter (a bad one leaves the current one in place).
    pub fn set_level(&self, level: &str) -> Result<(), LogError> {
        let f = filter(level)?;
        self.filter
            .reload(f)
            .map_err(|e| LogError::Setup(e.to_string()))
    }

    /// Exports the spans still queued and stops the exporter (at most its 5 s timeout).
    /// Blocking: call it off the async workers (`spawn_blocking`) or at the very end.
    pub fn shutdown(&self) {
        if let Some(p) = &self.otlp
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "OTLP export: spans lost at shutdown");
        }
    }
}
