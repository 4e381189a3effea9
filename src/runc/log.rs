//! runc's `--log` and `--log-format`: text, or one JSON object a line with `level`, `msg`
//! and `time`, the form containerd's shim and Podman read a failed command's error from
//! (the last `error` line).

use std::fmt::Write as _;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Sends silo's log to `file` (appended) or stderr, at debug level with `debug`.
pub fn init(file: Option<&Path>, format: Format, debug: bool) -> std::io::Result<()> {
    let filter = if debug {
        tracing_subscriber::EnvFilter::new("debug")
    } else {
        crate::log_filter()
    };
    let writer = match file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // A second subscriber (from a test harness, say) is no reason to fail a command.
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.event_format(JsonLines).try_init(),
    };
    Ok(())
}

/// One JSON object a line, as logrus (runc's logger) writes them.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        let line = serde_json::json!({
            "level": level,
            "msg": fields.msg,
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        });
        writeln!(writer, "{line}")
    }
}

/// The event's message, with its other fields after it as `key=value`.
#[derive(Default)]
struct Fields {
    msg: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.msg);
            let _ = write!(self.msg, "{value:?}{rest}");
        } else {
            let _ = write!(self.msg, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg.insert_str(0, value);
        } else {
            let _ = write!(self.msg, " {}={value}", field.name());
        }
    }
}
