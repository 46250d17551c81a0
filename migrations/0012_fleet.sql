-- 0012: for fleets. (1) Partition maintenance that gives up on a lock rather than stall the
-- writers; (2) a key that keeps the way to Citus open (docs/scaling.md).
--
-- Dropping a daily partition takes ACCESS EXCLUSIVE on its parent. Asked for while anything
-- holds a lock on that parent (an operator's long report, a dump), the request waits in the
-- lock queue, and every writer that comes after it waits behind it: one slow query plus
-- retention stalled a whole fleet for as long as the query ran (measured by
-- examples/fleet.rs). `DETACH PARTITION … CONCURRENTLY` would avoid the strong lock, but
-- PostgreSQL refuses it while the parent has a DEFAULT partition, and ours have one (rows
-- with odd timestamps are never rejected); it also cannot run inside a function, and the
-- agents apply retention through one (pipewatch_apply_retention, SECURITY DEFINER).
--
-- So: short lock waits, retried, and a fallback that never needs the lock.
--
-- pipewatch_cleanup_before(p_cutoff) keeps its contract (rows with ts < p_cutoff are gone
-- when it returns; the count it returns) but now
--   1. deletes the old rows of the partitions it keeps (and of the DEFAULT ones) first,
--      which takes only ROW EXCLUSIVE and blocks no writer;
--   2. then locks the partitions lying wholly before the cut-off (lock_timeout just past
--      deadlock_timeout: nothing writes there, and autovacuum, woken by row deletes, gives
--      way to a lock that waits that long), then the parents with lock_timeout = 150 ms, and
--      drops the partitions; at most 3 tries, 0.2–0.5 s apart. A writer waits at most about
--      150 ms per parent per try (the request queued in front of it) and the drop itself
--      holds the lock for milliseconds until the commit that follows at once (callers run it
--      as a statement of its own, or as the last thing of their transaction);
--   3. when the locks cannot be had, deletes those partitions' rows instead (slow, but it
--      never blocks a writer) and says so in a NOTICE; the empty partitions go next time.
-- The rows of a dropped partition are counted before the locks are taken.
--
-- pipewatch_ensure_partitions(p_from, p_to) attaches each new partition under a 500 ms lock
-- timeout (ATTACH takes SHARE UPDATE EXCLUSIVE on the parent, which writers do not mind, but
-- ACCESS EXCLUSIVE on the DEFAULT partition, which a long report holds too). When a table is
-- busy it skips that table's remaining days (NOTICE) instead of hanging the agent that called
-- it: at most 3 × 500 ms per call. Agents create partitions 3 days ahead, so a later call
-- creates them.

CREATE OR REPLACE FUNCTION pipewatch_cleanup_before(p_cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_table   text;
    v_part    record;
    v_rows    bigint;
    v_total   bigint := 0;
    v_counted bigint := 0;
    v_drop    text[] := '{}';
    v_parents text[] := '{}';
    v_try     integer;
    v_done    boolean := false;
    v_timeout text := current_setting('lock_timeout');
    -- Just past deadlock_timeout, when autovacuum is told to give way.
    v_part_wait text := (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000 + 200)::bigint || 'ms';
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION 'pipewatch_cleanup_before: the cut-off must not be NULL'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_table IN ARRAY ARRAY['pipeline_logs', 'pipeline_events', 'pipeline_metrics'] LOOP
        FOR v_part IN
            SELECT relname, day
              FROM (SELECT c.relname::text AS relname,
                           CASE WHEN c.relname ~ ('^' || v_table || '_p[0-9]{8}$')
                                THEN to_date(right(c.relname, 8), 'YYYYMMDD') END AS day
                      FROM pg_inherits i
                      JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = v_table::regclass) p
             ORDER BY relname
        LOOP
            IF v_part.day IS NOT NULL
               AND (v_part.day + 1)::timestamp AT TIME ZONE 'UTC' <= p_cutoff THEN
                -- Wholly before the cut-off: dropped below.
                EXECUTE format('SELECT count(*) FROM %I', v_part.relname) INTO v_rows;
                v_counted := v_counted + v_rows;
                v_drop := v_drop || v_part.relname;
                IF NOT v_table = ANY (v_parents) THEN
                    v_parents := v_parents || v_table;
                END IF;
            ELSIF v_part.day IS NULL
               OR v_part.day::timestamp AT TIME ZONE 'UTC' < p_cutoff THEN
                -- The DEFAULT partition, or the day the cut-off falls in.
                EXECUTE format('DELETE FROM %I WHERE ts < %L', v_part.relname, p_cutoff);
                GET DIAGNOSTICS v_rows = ROW_COUNT;
                v_total := v_total + v_rows;
            END IF;
        END LOOP;
    END LOOP;
    IF cardinality(v_drop) = 0 THEN
        RETURN v_total;
    END IF;
    FOR v_try IN 1..3 LOOP
        BEGIN
            -- The old partitions first: waiting for them blocks no writer (nothing writes
            -- there), and waiting past deadlock_timeout makes autovacuum, which the row
            -- deletes wake up on them, give way.
            PERFORM set_config('lock_timeout', v_part_wait, true);
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE',
                           (SELECT string_agg(quote_ident(t), ', ') FROM unnest(v_drop) t));
            -- Then the parents (ONLY: not their other partitions), in the order writers take
            -- them, each wait short: writers queue behind this request while it waits.
            PERFORM set_config('lock_timeout', '150ms', true);
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE',
                           (SELECT string_agg('ONLY ' || quote_ident(t), ', ') FROM unnest(v_parents) t));
            EXECUTE format('DROP TABLE %s',
                           (SELECT string_agg(quote_ident(t), ', ') FROM unnest(v_drop) t));
            v_done := true;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF v_try < 3 THEN
                PERFORM pg_sleep(0.2 + random() * 0.3);
            END IF;
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', v_timeout, true);
    IF v_done THEN
        RETURN v_total + v_counted;
    END IF;
    RAISE NOTICE 'pipewatch: partitions % stay (their tables were busy for 3 tries); their old rows were deleted instead, the partitions go at the next cleanup',
        array_to_string(v_drop, ', ');
    FOREACH v_table IN ARRAY v_drop LOOP
        EXECUTE format('DELETE FROM %I WHERE ts < %L', v_table, p_cutoff);
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        v_total := v_total + v_rows;
    END LOOP;
    RETURN v_total;
END
$$;

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
    v_busy    text[] := '{}';
    v_timeout text := current_setting('lock_timeout');
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
            CONTINUE WHEN v_table = ANY (v_busy);
            BEGIN
                PERFORM set_config('lock_timeout', '500ms', true);
                -- Build the partition detached, move the default partition's rows of that
                -- day into it, then attach it (a lighter lock on the parent than PARTITION
                -- OF). All of it is undone if a lock cannot be had in time.
                EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                               v_part, v_table);
                EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %L AND ts < %L)',
                               v_part, v_part || '_range', v_lo, v_hi);
                EXECUTE format('WITH moved AS (DELETE FROM %I WHERE ts >= %L AND ts < %L RETURNING *) '
                               'INSERT INTO %I SELECT * FROM moved',
                               v_table || '_default', v_lo, v_hi, v_part);
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               v_table, v_part, v_lo, v_hi);
                -- The range constraint only spared ATTACH a scan; the bound replaces it.
                EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', v_part, v_part || '_range');
                v_created := v_created + 1;
            EXCEPTION WHEN lock_not_available THEN
                -- Busy (a long report on the table): no more of this table's days now.
                v_busy := v_busy || v_table;
                RAISE NOTICE 'pipewatch: partition % not created now (% was busy for 500 ms); the next call creates it',
                    v_part, v_table;
            END;
            PERFORM set_config('lock_timeout', v_timeout, true);
        END LOOP;
        v_day := v_day + 1;
    END LOOP;
    RETURN v_created;
END
$$;

-- CREATE OR REPLACE resets the function's settings: pin the search_path again (as 0003).
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION pipewatch_ensure_partitions(timestamptz, timestamptz) SET search_path = %I, pg_temp',
        current_schema());
END
$$;

-- (2) Citus needs the distribution column (experiment_id, docs/scaling.md) in every primary
-- key and unique constraint of a distributed table. pipeline_progress's other key,
-- (experiment_id, node_id), has it already; its primary key was `id` alone. `id` stays unique
-- (its sequence), and nothing looks a progress row up by `id` alone, so the key can include
-- experiment_id now at no cost beyond a wider index on a small table. (The time-partitioned
-- tables' keys (id, ts) would need experiment_id NOT NULL; that one costs, see the doc.)
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
          FROM pg_constraint
         WHERE conrelid = 'pipeline_progress'::regclass
           AND contype = 'p'
           AND conkey = ARRAY[
                 (SELECT attnum FROM pg_attribute WHERE attrelid = 'pipeline_progress'::regclass AND attname = 'experiment_id'),
                 (SELECT attnum FROM pg_attribute WHERE attrelid = 'pipeline_progress'::regclass AND attname = 'id')]::int2[]
    ) THEN
        ALTER TABLE pipeline_progress DROP CONSTRAINT IF EXISTS pipeline_progress_pkey;
        ALTER TABLE pipeline_progress ADD CONSTRAINT pipeline_progress_pkey PRIMARY KEY (experiment_id, id);
    END IF;
END
$$;
