//! Routing records to rows. (Interim version; replaced by the parse work.)

use crate::model::{EventRow, LogRow, ProgressRow, Record};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub struct SourceContext<'a> {
    pub host: &'a str,
    pub daemon: &'a str,
    pub source: &'a str,
    pub path_captures: &'a Map<String, Value>,
    pub default_experiment_id: Option<uuid::Uuid>,
    pub default_node_id: Option<&'a str>,
}

pub struct Routed {
    pub log: LogRow,
    pub event: Option<EventRow>,
    pub progress: Option<ProgressRow>,
}

pub fn route(r: Record, src: &SourceContext, read_time: DateTime<Utc>) -> Routed {
    Routed {
        log: LogRow {
            ts: r.ts.unwrap_or(read_time),
            level: r.level,
            message: r.message,
            logger: r.logger,
            experiment_id: r.experiment_id.or(src.default_experiment_id),
            node_id: r.node_id,
            stage: r.stage,
            context: Value::Object(r.context),
            traceback: r.traceback,
            metrics: r.metrics,
            host: src.host.to_string(),
            daemon: src.daemon.to_string(),
            source: Some(src.source.to_string()),
        },
        event: None,
        progress: None,
    }
}

pub fn path_captures(_pattern: &regex::Regex, _path: &str) -> Map<String, Value> {
    Map::new()
}
