-- 0008: the roles pipewatch_agent (writes) and pipewatch_reader (dashboards, operators).
--
-- Roles are created only when the migrating user may create roles; otherwise a NOTICE says
-- so and an administrator can create them later and re-run the grants below by hand. Grants
-- are given whenever the roles exist. Privileges are checked on the partitioned parent
-- tables, which is how both roles reach the data, so new partitions need no grants.

DO $$
DECLARE
    v_can boolean;
    v_role text;
BEGIN
    SELECT rolsuper OR rolcreaterole INTO v_can FROM pg_roles WHERE rolname = current_user;
    FOREACH v_role IN ARRAY ARRAY['pipewatch_agent', 'pipewatch_reader'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role);
        IF NOT coalesce(v_can, false) THEN
            RAISE NOTICE 'pipewatch: role % not created: % may not create roles', v_role, current_user;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            -- Another database of the same cluster created it at the same moment.
            NULL;
        END;
    END LOOP;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_agent') THEN
        GRANT SELECT ON experiments TO pipewatch_agent;
        GRANT INSERT ON pipeline_logs, pipeline_events, pipeline_metrics TO pipewatch_agent;
        GRANT SELECT, INSERT, UPDATE ON pipeline_progress TO pipewatch_agent;
        GRANT SELECT, INSERT, UPDATE ON pipewatch_checkpoints, pipewatch_agents TO pipewatch_agent;
        GRANT SELECT ON pipewatch_schema_migrations TO pipewatch_agent;
        GRANT USAGE ON SEQUENCE pipeline_logs_id_seq, pipeline_events_id_seq,
                                pipeline_metrics_id_seq, pipeline_progress_id_seq
              TO pipewatch_agent;
        GRANT EXECUTE ON FUNCTION pipewatch_ensure_partitions(timestamptz, timestamptz)
              TO pipewatch_agent;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_reader') THEN
        GRANT SELECT ON experiments, pipeline_logs, pipeline_events, pipeline_metrics,
                        pipeline_progress, pipewatch_checkpoints, pipewatch_agents,
                        pipewatch_schema_migrations,
                        recent_experiment_errors, experiment_progress_summary,
                        active_pipeline_monitoring
              TO pipewatch_reader;
        GRANT EXECUTE ON FUNCTION get_progress_tree(uuid),
                                  get_experiment_logs(uuid, text, text, integer, timestamptz, text),
                                  get_error_summary(uuid, timestamptz),
                                  pipewatch_level_rank(text)
              TO pipewatch_reader;
    END IF;
END
$$;
