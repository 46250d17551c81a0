-- 0003: daily partitions, created ahead of time by `migrate` and on demand by the agent.
--
-- pipewatch_ensure_partitions(p_from, p_to) creates the missing daily partitions (UTC days)
-- of pipeline_logs, pipeline_events and pipeline_metrics for that range. It is SECURITY
-- DEFINER with a pinned search_path so that the agent, which has no DDL rights, may call it.
-- Rows of a new day that already landed in the DEFAULT partition are moved into the new
-- partition in the same transaction instead of making the creation fail.
--
-- The range is capped: at most 366 days ending at p_to, and nothing later than 31 days from
-- now (odd far-future timestamps stay in the DEFAULT partition). Call it in a short
-- transaction of its own: it holds an advisory lock and, while moving rows, a lock on the
-- DEFAULT partitions until commit.

CREATE OR REPLACE FUNCTION pipewatch_ensure_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_first   date;
    v_last    date;
    v_day     date;
    v_table   text;
    v_part    text;
    v_lo      timestamptz;
    v_hi      timestamptz;
    v_created integer := 0;
    v_locked  boolean := false;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
        RETURN 0;
    END IF;
    v_last := least((p_to AT TIME ZONE 'UTC')::date, ((now() + interval '31 days') AT TIME ZONE 'UTC')::date);
    v_first := greatest((p_from AT TIME ZONE 'UTC')::date, v_last - 365);
    v_day := v_first;
    WHILE v_day <= v_last LOOP
        FOREACH v_table IN ARRAY ARRAY['pipeline_logs', 'pipeline_events', 'pipeline_metrics'] LOOP
            v_part := v_table || '_p' || to_char(v_day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass(v_part) IS NOT NULL;
            IF NOT v_locked THEN
                -- Serialize creators, then look again: another caller may have just made it.
                PERFORM pg_advisory_xact_lock(hashtext('pipewatch_ensure_partitions'));
                v_locked := true;
                CONTINUE WHEN to_regclass(v_part) IS NOT NULL;
            END IF;
            v_lo := v_day::timestamp AT TIME ZONE 'UTC';
            v_hi := (v_day + 1)::timestamp AT TIME ZONE 'UTC';
            -- Build the partition detached, move the default partition's rows of that day
            -- into it, then attach it (a lighter lock on the parent than PARTITION OF).
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           v_part, v_table);
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %L AND ts < %L)',
                           v_part, v_part || '_range', v_lo, v_hi);
            EXECUTE format('WITH moved AS (DELETE FROM %I WHERE ts >= %L AND ts < %L RETURNING *) '
                           'INSERT INTO %I SELECT * FROM moved',
                           v_table || '_default', v_lo, v_hi, v_part);
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           v_table, v_part, v_lo, v_hi);
            -- The range constraint only spared ATTACH a scan; the partition bound replaces it.
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', v_part, v_part || '_range');
            v_created := v_created + 1;
        END LOOP;
        v_day := v_day + 1;
    END LOOP;
    RETURN v_created;
END
$$;

-- Pin the search_path to the schema the migration runs in (never the caller's); pg_catalog
-- is still searched first, and new partitions are created in that schema.
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION pipewatch_ensure_partitions(timestamptz, timestamptz) SET search_path = %I, pg_temp',
        current_schema());
END
$$;

REVOKE ALL ON FUNCTION pipewatch_ensure_partitions(timestamptz, timestamptz) FROM PUBLIC;
