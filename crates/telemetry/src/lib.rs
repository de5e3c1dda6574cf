//! Logging for both binaries: JSON lines shaped like GitLab's agent logs (`level`, `time`, `msg`, then flat
//! fields such as `mod_name`, `agent_id`, `project_id`), or a human format on request; the level can change
//! at run time (agentk follows `observability.logging.level` from its configuration, kas re-reads
//! `logging.level` from `kas.yaml` on SIGHUP). [`observability`] answers `/metrics`, `/livez` and `/readyz`.

pub mod observability;

/// The metrics library both binaries register their metrics with.
pub use prometheus_client;

use std::{fmt, io};

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter, Registry,
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    reload,
    util::SubscriberInitExt,
};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// Changes the level of the installed logger.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogHandle")
    }
}

/// Crates whose logs are the transport's internals, governed by the separate "grpc" level.
const TRANSPORT_TARGETS: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "tungstenite",
    "tokio_tungstenite",
    "rustls",
    "gix",
    "reqwest",
];

/// The filter for an application level and a transport level, e.g. `("info", "error")`.
pub fn filter_directives(level: &str, grpc_level: &str) -> String {
    let mut directives = level.to_owned();
    for target in TRANSPORT_TARGETS {
        directives.push_str(&format!(",{target}={grpc_level}"));
    }
    directives
}

fn build_filter(directives: &str) -> Result<EnvFilter, Error> {
    EnvFilter::try_new(directives).map_err(|e| Error::Filter {
        filter: directives.to_owned(),
        message: e.to_string(),
    })
}

impl LogHandle {
    /// Switches the levels, e.g. `set_levels("debug", "error")`.
    pub fn set_levels(&self, level: &str, grpc_level: &str) -> Result<(), Error> {
        let filter = build_filter(&filter_directives(level, grpc_level))?;
        self.filter
            .reload(filter)
            .map_err(|_| Error::AlreadyInstalled)
    }
}

/// Installs the global logger writing to stderr. `RUST_LOG`, when set, overrides the levels.
pub fn init(format: Format, level: &str, grpc_level: &str) -> Result<LogHandle, Error> {
    let directives =
        std::env::var("RUST_LOG").unwrap_or_else(|_| filter_directives(level, grpc_level));
    let (filter, handle) = reload::Layer::new(build_filter(&directives)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        Format::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(FlatJson)
                    .with_writer(io::stderr),
            )
            .try_init(),
        Format::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(io::stderr))
            .try_init(),
    };
    result.map_err(|_| Error::AlreadyInstalled)?;
    Ok(LogHandle { filter: handle })
}

/// One flat JSON object per event: `level`, `time`, `msg`, then the fields of the enclosing spans (outermost
/// first) and of the event itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        object.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        object.insert(
            "time".into(),
            Value::from(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
        );
        object.insert("msg".into(), Value::Null);
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields.as_str()) {
                    object.extend(map);
                }
            }
        }
        let mut visitor = FieldVisitor(&mut object);
        event.record(&mut visitor);
        if object.get("msg").is_some_and(Value::is_null) {
            object.remove("msg");
        }
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct FieldVisitor<'a>(&'a mut Map<String, Value>);

impl FieldVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg",
            other => other,
        };
        self.0.insert(name.to_owned(), value);
    }
}

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_are_flat_like_the_seed() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(FlatJson)
                .with_writer(captured.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("gitops", mod_name = "gitops", agent_id = 43);
            let _guard = span.enter();
            tracing::info!(project_id = "group/config", "Cluster successfully synced");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "info");
        assert_eq!(line["msg"], "Cluster successfully synced");
        assert_eq!(line["mod_name"], "gitops");
        assert_eq!(line["agent_id"], 43);
        assert_eq!(line["project_id"], "group/config");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        let keys: Vec<_> = line.as_object().unwrap().keys().cloned().collect();
        assert_eq!(&keys[..3], ["level", "time", "msg"], "seed's key order");
    }

    #[test]
    fn filter_directives_cover_transport_crates() {
        let d = filter_directives("debug", "error");
        assert!(d.starts_with("debug,"));
        assert!(d.contains("h2=error") && d.contains("tonic=error"));
        assert!(build_filter(&d).is_ok());
    }
}
