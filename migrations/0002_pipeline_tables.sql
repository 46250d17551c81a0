-- 0002: the four monitoring tables and the indexes their queries need.
--
-- pipeline_logs, pipeline_events and pipeline_metrics are range-partitioned by `ts` into
-- daily partitions (named <table>_pYYYYMMDD, UTC days) plus a DEFAULT partition that catches
-- any timestamp without a partition of its own. The daily partitions are created by
-- pipewatch_ensure_partitions() (0003). `id` uses a sequence default because identity
-- columns are not supported on partitioned tables before PostgreSQL 17; the primary key is
-- (id, ts) because a partitioned table's unique keys must include the partition key.

-- The five levels, ranked, for "minimum severity" filters.
CREATE OR REPLACE FUNCTION pipewatch_level_rank(p_level text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE upper(p_level)
        WHEN 'DEBUG' THEN 10
        WHEN 'INFO' THEN 20
        WHEN 'WARNING' THEN 30
        WHEN 'ERROR' THEN 40
        WHEN 'CRITICAL' THEN 50
    END
$$;

CREATE TABLE pipeline_logs (
    id            bigserial,
    ts            timestamptz NOT NULL,
    level         text NOT NULL
                  CHECK (level IN ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')),
    message       text NOT NULL DEFAULT '',
    logger        text,
    experiment_id uuid,
    node_id       text,
    stage         text,
    context       jsonb NOT NULL DEFAULT '{}',
    traceback     text,
    metrics       jsonb,
    host          text,
    daemon        text,
    source        text,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE pipeline_logs_default PARTITION OF pipeline_logs DEFAULT;

-- get_experiment_logs: one experiment, newest first.
CREATE INDEX pipeline_logs_experiment_ts_idx ON pipeline_logs (experiment_id, ts DESC);
-- get_experiment_logs with p_level >= ERROR, get_error_summary.
CREATE INDEX pipeline_logs_experiment_errors_idx ON pipeline_logs (experiment_id, ts DESC)
    WHERE level IN ('ERROR', 'CRITICAL');
-- recent_experiment_errors: all errors, newest first.
CREATE INDEX pipeline_logs_errors_ts_idx ON pipeline_logs (ts DESC)
    WHERE level IN ('ERROR', 'CRITICAL');
-- active_pipeline_monitoring and per-daemon queries.
CREATE INDEX pipeline_logs_host_daemon_ts_idx ON pipeline_logs (host, daemon, ts DESC);

CREATE TABLE pipeline_events (
    id            bigserial,
    ts            timestamptz NOT NULL DEFAULT now(),
    experiment_id uuid,
    node_id       text,
    event_type    text NOT NULL,
    severity      text NOT NULL DEFAULT 'INFO'
                  CHECK (severity IN ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')),
    message       text,
    details       jsonb NOT NULL DEFAULT '{}',
    host          text,
    daemon        text,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE pipeline_events_default PARTITION OF pipeline_events DEFAULT;

CREATE INDEX pipeline_events_experiment_ts_idx ON pipeline_events (experiment_id, ts DESC);
CREATE INDEX pipeline_events_type_ts_idx ON pipeline_events (event_type, ts DESC);
CREATE INDEX pipeline_events_host_daemon_ts_idx ON pipeline_events (host, daemon, ts DESC);

CREATE TABLE pipeline_metrics (
    id                       bigserial,
    ts                       timestamptz NOT NULL DEFAULT now(),
    experiment_id            uuid,
    node_id                  text,
    host                     text,
    daemon                   text,
    pid                      integer,
    cpu_percent              double precision,
    memory_rss_bytes         bigint,
    memory_percent           double precision,
    disk_read_bytes_per_sec  double precision,
    disk_write_bytes_per_sec double precision,
    disk_used_percent        double precision,
    records_per_sec          double precision,
    custom                   jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE pipeline_metrics_default PARTITION OF pipeline_metrics DEFAULT;

CREATE INDEX pipeline_metrics_experiment_ts_idx ON pipeline_metrics (experiment_id, ts DESC);
CREATE INDEX pipeline_metrics_host_daemon_ts_idx ON pipeline_metrics (host, daemon, ts DESC);

-- Progress is small (one row per node) and updated in place, so it is not partitioned.
CREATE TABLE pipeline_progress (
    id               bigserial PRIMARY KEY,
    experiment_id    uuid NOT NULL,
    node_id          text NOT NULL,
    parent_node_id   text,
    level            text CHECK (level IN ('pipeline', 'phase', 'step', 'substep')),
    name             text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    progress_percent numeric(5, 2) CHECK (progress_percent BETWEEN 0 AND 100),
    items_done       bigint,
    items_total      bigint,
    started_at       timestamptz,
    completed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    details          jsonb NOT NULL DEFAULT '{}',
    UNIQUE (experiment_id, node_id)
);

-- The trigger finds a node's children; the tree walk too.
CREATE INDEX pipeline_progress_parent_idx ON pipeline_progress (experiment_id, parent_node_id);
-- experiment_progress_summary and running-node lookups.
CREATE INDEX pipeline_progress_status_idx ON pipeline_progress (status, experiment_id);
