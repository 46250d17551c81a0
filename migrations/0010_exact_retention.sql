-- 0010: retention by an exact age. `cleanup --older-than 36h` used to delete everything older
-- than one day (ages were rounded down to whole days); now the cut-off is exactly now() minus
-- the age asked for.
--
-- pipewatch_cleanup_before(p_cutoff) is the one place that deletes: it drops the daily
-- partitions that lie entirely before the cut-off (upper bound <= p_cutoff) and deletes the
-- rows with ts < p_cutoff from the rest (including the DEFAULT partitions). A row exactly at
-- the cut-off stays. cleanup_old_logs(p_days) keeps its contract and calls it;
-- pipewatch_cleanup_older_than(p_older_than) takes any interval; the interval form of
-- pipewatch_apply_retention is what agents call for `[retention] older_than`.

CREATE OR REPLACE FUNCTION pipewatch_cleanup_before(p_cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_table   text;
    v_part    record;
    v_rows    bigint;
    v_total   bigint := 0;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION 'pipewatch_cleanup_before: the cut-off must not be NULL'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_table IN ARRAY ARRAY['pipeline_logs', 'pipeline_events', 'pipeline_metrics'] LOOP
        FOR v_part IN
            SELECT c.relname
              FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = v_table::regclass
               AND c.relname ~ ('^' || v_table || '_p[0-9]{8}$')
               AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                   <= p_cutoff
             ORDER BY c.relname
        LOOP
            EXECUTE format('SELECT count(*) FROM %I', v_part.relname) INTO v_rows;
            EXECUTE format('DROP TABLE %I', v_part.relname);
            v_total := v_total + v_rows;
        END LOOP;
        EXECUTE format('DELETE FROM %I WHERE ts < %L', v_table, p_cutoff);
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        v_total := v_total + v_rows;
    END LOOP;
    RETURN v_total;
END
$$;

-- The contract function, unchanged in what it does: rows older than p_days whole days.
CREATE OR REPLACE FUNCTION cleanup_old_logs(p_days integer) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF p_days IS NULL OR p_days < 0 THEN
        RAISE EXCEPTION 'cleanup_old_logs: p_days must be 0 or more, not %', p_days
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pipewatch_cleanup_before(now() - make_interval(days => p_days));
END
$$;

CREATE OR REPLACE FUNCTION pipewatch_cleanup_older_than(p_older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'pipewatch_cleanup_older_than: the age must be 0 or more, not %', p_older_than
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pipewatch_cleanup_before(now() - p_older_than);
END
$$;

ALTER TABLE pipewatch_retention ADD COLUMN IF NOT EXISTS last_older_than interval;

-- Like pipewatch_apply_retention(integer, …) of 0009, with the exact age: at most once per
-- p_min_interval across the fleet, never younger than one day.
CREATE OR REPLACE FUNCTION pipewatch_apply_retention(
    p_older_than   interval,
    p_host         text,
    p_min_interval interval DEFAULT interval '23 hours'
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_last timestamptz;
    v_rows bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '1 day' THEN
        RAISE EXCEPTION 'pipewatch: retention must keep at least 1 day, got %', p_older_than;
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('pipewatch_apply_retention')) THEN
        RETURN NULL;
    END IF;
    INSERT INTO pipewatch_retention (id) VALUES (true) ON CONFLICT (id) DO NOTHING;
    SELECT last_run_at INTO v_last FROM pipewatch_retention WHERE id;
    IF v_last IS NOT NULL AND v_last > now() - p_min_interval THEN
        RETURN NULL;
    END IF;
    v_rows := pipewatch_cleanup_before(now() - p_older_than);
    UPDATE pipewatch_retention
       SET last_run_at = now(),
           last_days = floor(extract(epoch FROM p_older_than) / 86400)::integer,
           last_older_than = p_older_than,
           last_rows = v_rows,
           last_host = p_host
     WHERE id;
    RETURN v_rows;
END
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION pipewatch_apply_retention(interval, text, interval) SET search_path = %I, pg_temp',
        current_schema());
END
$$;

REVOKE ALL ON FUNCTION pipewatch_apply_retention(interval, text, interval) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_agent') THEN
        GRANT EXECUTE ON FUNCTION pipewatch_apply_retention(interval, text, interval) TO pipewatch_agent;
    END IF;
END
$$;
