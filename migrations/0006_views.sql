-- 0006: the three monitoring views.

-- ERROR and CRITICAL records with their experiment's name, newest first. No time window:
-- backfilled errors count too; add `WHERE ts > now() - interval '…'` (pruned by partition) to narrow.
CREATE OR REPLACE VIEW recent_experiment_errors AS
SELECT l.id,
       l.ts,
       l.experiment_id,
       e.name AS experiment_name,
       l.node_id,
       l.stage,
       l.level,
       l.message,
       l.traceback,
       l.logger,
       l.host,
       l.daemon,
       l.source,
       l.context
  FROM pipeline_logs l
  LEFT JOIN experiments e ON e.id = l.experiment_id
 WHERE l.level IN ('ERROR', 'CRITICAL')
 ORDER BY l.ts DESC, l.id DESC;

-- Per experiment: nodes by status, overall percent (the mean of its root nodes), last update.
CREATE OR REPLACE VIEW experiment_progress_summary AS
SELECT p.experiment_id,
       e.name AS experiment_name,
       count(*) AS total_nodes,
       count(*) FILTER (WHERE p.status = 'pending') AS pending_nodes,
       count(*) FILTER (WHERE p.status = 'running') AS running_nodes,
       count(*) FILTER (WHERE p.status = 'completed') AS completed_nodes,
       count(*) FILTER (WHERE p.status = 'failed') AS failed_nodes,
       count(*) FILTER (WHERE p.status = 'cancelled') AS cancelled_nodes,
       round(avg(coalesce(p.progress_percent, 0)) FILTER (WHERE p.parent_node_id IS NULL), 2)
           AS overall_percent,
       min(p.started_at) AS started_at,
       max(p.updated_at) AS last_update
  FROM pipeline_progress p
  LEFT JOIN experiments e ON e.id = p.experiment_id
 GROUP BY p.experiment_id, e.name;

-- Per experiment, host and daemon with a log record or metric sample in the last hour:
-- last record, records and errors in the last hour, latest CPU and memory, running nodes
-- and the experiment's overall percent.
CREATE OR REPLACE VIEW active_pipeline_monitoring AS
WITH recent_logs AS (
    SELECT l.experiment_id, l.host, l.daemon,
           max(l.ts) AS last_log_at,
           count(*) AS records_last_hour,
           count(*) FILTER (WHERE l.level IN ('ERROR', 'CRITICAL')) AS errors_last_hour
      FROM pipeline_logs l
     WHERE l.ts > now() - interval '1 hour'
     GROUP BY l.experiment_id, l.host, l.daemon
), recent_metrics AS (
    SELECT DISTINCT ON (m.experiment_id, m.host, m.daemon)
           m.experiment_id, m.host, m.daemon, m.ts, m.pid, m.cpu_percent,
           m.memory_rss_bytes, m.memory_percent, m.records_per_sec
      FROM pipeline_metrics m
     WHERE m.ts > now() - interval '1 hour'
     ORDER BY m.experiment_id, m.host, m.daemon, m.ts DESC
), active AS (
    SELECT experiment_id, host, daemon FROM recent_logs
    UNION
    SELECT experiment_id, host, daemon FROM recent_metrics
)
SELECT a.experiment_id,
       e.name AS experiment_name,
       a.host,
       a.daemon,
       greatest(rl.last_log_at, rm.ts) AS last_seen_at,
       rl.last_log_at,
       (SELECT l.message FROM pipeline_logs l
         WHERE l.host IS NOT DISTINCT FROM a.host AND l.daemon IS NOT DISTINCT FROM a.daemon
           AND l.experiment_id IS NOT DISTINCT FROM a.experiment_id
           AND l.ts = rl.last_log_at
         ORDER BY l.id DESC LIMIT 1) AS last_message,
       coalesce(rl.records_last_hour, 0) AS records_last_hour,
       coalesce(rl.errors_last_hour, 0) AS errors_last_hour,
       rm.ts AS metrics_at,
       rm.pid,
       rm.cpu_percent,
       rm.memory_rss_bytes,
       rm.memory_percent,
       rm.records_per_sec,
       coalesce(ps.running_nodes, 0) AS running_nodes,
       ps.overall_percent
  FROM active a
  LEFT JOIN recent_logs rl
         ON rl.experiment_id IS NOT DISTINCT FROM a.experiment_id
        AND rl.host IS NOT DISTINCT FROM a.host AND rl.daemon IS NOT DISTINCT FROM a.daemon
  LEFT JOIN recent_metrics rm
         ON rm.experiment_id IS NOT DISTINCT FROM a.experiment_id
        AND rm.host IS NOT DISTINCT FROM a.host AND rm.daemon IS NOT DISTINCT FROM a.daemon
  LEFT JOIN experiments e ON e.id = a.experiment_id
  LEFT JOIN experiment_progress_summary ps ON ps.experiment_id = a.experiment_id
 ORDER BY greatest(rl.last_log_at, rm.ts) DESC NULLS LAST;
