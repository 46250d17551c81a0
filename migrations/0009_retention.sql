-- 0009: fleet-wide retention applied by the agents ([retention] in the config).
--
-- pipewatch_apply_retention(p_days, p_host) runs cleanup_old_logs at most once per
-- p_min_interval across the whole fleet: an advisory lock lets one caller in at a time and
-- pipewatch_retention remembers the last run. It is SECURITY DEFINER so that agents running as
-- pipewatch_agent (which may not DELETE) can apply the retention an administrator configured;
-- it deletes nothing younger than one day.

CREATE TABLE IF NOT EXISTS pipewatch_retention (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_run_at timestamptz,
    last_days   integer,
    last_rows   bigint,
    last_host   text
);

CREATE OR REPLACE FUNCTION pipewatch_apply_retention(
    p_days         integer,
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
    IF p_days IS NULL OR p_days < 1 THEN
        RAISE EXCEPTION 'pipewatch: retention must keep at least 1 day, got %', p_days;
    END IF;
    -- One caller at a time; the others return at once (NULL: not their turn).
    IF NOT pg_try_advisory_xact_lock(hashtext('pipewatch_apply_retention')) THEN
        RETURN NULL;
    END IF;
    INSERT INTO pipewatch_retention (id) VALUES (true) ON CONFLICT (id) DO NOTHING;
    SELECT last_run_at INTO v_last FROM pipewatch_retention WHERE id;
    IF v_last IS NOT NULL AND v_last > now() - p_min_interval THEN
        RETURN NULL;
    END IF;
    v_rows := cleanup_old_logs(p_days);
    UPDATE pipewatch_retention
       SET last_run_at = now(), last_days = p_days, last_rows = v_rows, last_host = p_host
     WHERE id;
    RETURN v_rows;
END
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION pipewatch_apply_retention(integer, text, interval) SET search_path = %I, pg_temp',
        current_schema());
END
$$;

REVOKE ALL ON FUNCTION pipewatch_apply_retention(integer, text, interval) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_agent') THEN
        GRANT EXECUTE ON FUNCTION pipewatch_apply_retention(integer, text, interval) TO pipewatch_agent;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_reader') THEN
        GRANT SELECT ON pipewatch_retention TO pipewatch_reader;
    END IF;
END
$$;
