-- 0005: the query functions of CONTRACT.md §3 and the retention function.

-- A progress tree, depth first. Roots are nodes without a parent or whose parent row is
-- missing; siblings come in the order they first appeared. `path` lists the node ids from
-- the root; a cycle is cut where a node would repeat.
CREATE OR REPLACE FUNCTION get_progress_tree(p_experiment_id uuid)
RETURNS TABLE (
    node_id          text,
    parent_node_id   text,
    depth            integer,
    level            text,
    name             text,
    status           text,
    progress_percent numeric,
    items_done       bigint,
    items_total      bigint,
    started_at       timestamptz,
    completed_at     timestamptz,
    updated_at       timestamptz,
    path             text[]
)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE nodes AS (
        SELECT * FROM pipeline_progress WHERE experiment_id = p_experiment_id
    ), tree AS (
        SELECT n.id, n.node_id, n.parent_node_id, 0 AS depth,
               ARRAY[n.node_id] AS path, ARRAY[n.id] AS sort_key
          FROM nodes n
         WHERE n.parent_node_id IS NULL
            OR n.parent_node_id = n.node_id
            OR NOT EXISTS (SELECT 1 FROM nodes p WHERE p.node_id = n.parent_node_id)
        UNION ALL
        SELECT c.id, c.node_id, c.parent_node_id, t.depth + 1,
               t.path || c.node_id, t.sort_key || c.id
          FROM tree t
          JOIN nodes c ON c.parent_node_id = t.node_id
         WHERE c.node_id <> ALL (t.path) AND t.depth < 64
    )
    SELECT t.node_id, t.parent_node_id, t.depth, n.level, n.name, n.status,
           n.progress_percent, n.items_done, n.items_total, n.started_at, n.completed_at,
           n.updated_at, t.path
      FROM tree t
      JOIN nodes n ON n.id = t.id
     ORDER BY t.sort_key
$$;

-- An experiment's log records, newest first. p_level is a minimum severity
-- (DEBUG < INFO < WARNING < ERROR < CRITICAL); p_search a case-insensitive substring of the
-- message or the traceback (LIKE wildcards in it are taken literally). The ERROR/CRITICAL
-- branch is written out so that the planner can use the partial error index.
CREATE OR REPLACE FUNCTION get_experiment_logs(
    p_experiment_id uuid,
    p_level         text DEFAULT NULL,
    p_search        text DEFAULT NULL,
    p_limit         integer DEFAULT 100,
    p_since         timestamptz DEFAULT NULL,
    p_node_id       text DEFAULT NULL
) RETURNS SETOF pipeline_logs
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_rank    integer := pipewatch_level_rank(p_level);
    v_pattern text;
BEGIN
    IF p_level IS NOT NULL AND v_rank IS NULL THEN
        RAISE EXCEPTION 'unknown level %: use DEBUG, INFO, WARNING, ERROR or CRITICAL', p_level
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_search IS NOT NULL AND p_search <> '' THEN
        v_pattern := '%' || replace(replace(replace(p_search, '\', '\\'), '%', '\%'), '_', '\_') || '%';
    END IF;
    IF v_rank >= 40 THEN
        RETURN QUERY
        SELECT * FROM pipeline_logs l
         WHERE l.experiment_id = p_experiment_id
           AND l.level IN ('ERROR', 'CRITICAL')
           AND (v_rank = 40 OR l.level = 'CRITICAL')
           AND (p_since IS NULL OR l.ts >= p_since)
           AND (p_node_id IS NULL OR l.node_id = p_node_id)
           AND (v_pattern IS NULL OR l.message ILIKE v_pattern OR l.traceback ILIKE v_pattern)
         ORDER BY l.ts DESC, l.id DESC
         LIMIT greatest(coalesce(p_limit, 100), 0);
    ELSE
        RETURN QUERY
        SELECT * FROM pipeline_logs l
         WHERE l.experiment_id = p_experiment_id
           AND (v_rank IS NULL OR pipewatch_level_rank(l.level) >= v_rank)
           AND (p_since IS NULL OR l.ts >= p_since)
           AND (p_node_id IS NULL OR l.node_id = p_node_id)
           AND (v_pattern IS NULL OR l.message ILIKE v_pattern OR l.traceback ILIKE v_pattern)
         ORDER BY l.ts DESC, l.id DESC
         LIMIT greatest(coalesce(p_limit, 100), 0);
    END IF;
END
$$;

-- An experiment's ERROR and CRITICAL records grouped by message, most frequent first.
CREATE OR REPLACE FUNCTION get_error_summary(
    p_experiment_id uuid,
    p_since         timestamptz DEFAULT NULL
) RETURNS TABLE (
    message          text,
    count            bigint,
    first_seen       timestamptz,
    last_seen        timestamptz,
    nodes            text[],
    sample_traceback text,
    max_level        text
)
LANGUAGE sql STABLE AS $$
    SELECT l.message,
           count(*),
           min(l.ts),
           max(l.ts),
           coalesce(array_agg(DISTINCT l.node_id ORDER BY l.node_id)
                    FILTER (WHERE l.node_id IS NOT NULL), '{}'),
           (array_agg(l.traceback ORDER BY l.ts DESC) FILTER (WHERE l.traceback IS NOT NULL))[1],
           CASE WHEN bool_or(l.level = 'CRITICAL') THEN 'CRITICAL' ELSE 'ERROR' END
      FROM pipeline_logs l
     WHERE l.experiment_id = p_experiment_id
       AND l.level IN ('ERROR', 'CRITICAL')
       AND (p_since IS NULL OR l.ts >= p_since)
     GROUP BY l.message
     ORDER BY count(*) DESC, max(l.ts) DESC
$$;

-- Retention: removes log, event and metric rows older than p_days days and returns how many
-- rows went. Daily partitions entirely older than the cutoff are dropped whole (their rows
-- counted first); the boundary partition and the DEFAULT partition are cleaned with DELETE.
CREATE OR REPLACE FUNCTION cleanup_old_logs(p_days integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff  timestamptz;
    v_table   text;
    v_part    record;
    v_rows    bigint;
    v_total   bigint := 0;
BEGIN
    IF p_days IS NULL OR p_days < 0 THEN
        RAISE EXCEPTION 'cleanup_old_logs: p_days must be 0 or more, not %', p_days
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := now() - make_interval(days => p_days);
    FOREACH v_table IN ARRAY ARRAY['pipeline_logs', 'pipeline_events', 'pipeline_metrics'] LOOP
        FOR v_part IN
            SELECT c.relname
              FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = v_table::regclass
               AND c.relname ~ ('^' || v_table || '_p[0-9]{8}$')
               AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                   <= v_cutoff
             ORDER BY c.relname
        LOOP
            EXECUTE format('SELECT count(*) FROM %I', v_part.relname) INTO v_rows;
            EXECUTE format('DROP TABLE %I', v_part.relname);
            v_total := v_total + v_rows;
        END LOOP;
        EXECUTE format('DELETE FROM %I WHERE ts < %L', v_table, v_cutoff);
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        v_total := v_total + v_rows;
    END LOOP;
    RETURN v_total;
END
$$;
