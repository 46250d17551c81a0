-- 0004: the progress aggregation trigger.
--
-- After a node of pipeline_progress is inserted or updated, its parent is recomputed from
-- all of the parent's children:
--   * progress_percent = the mean of the children's percents (a NULL percent counts as 0);
--   * status = failed if any child failed; completed when all completed; cancelled when all
--     are completed or cancelled and at least one was cancelled; running once any child has
--     started (running, completed, failed or cancelled); pending otherwise;
--   * updated_at = the greatest child updated_at; started_at = the earliest child start
--     unless the parent already has one; completed_at = the latest child completion when
--     the parent is completed, NULL otherwise;
--   * items_done / items_total are not aggregated.
-- A missing parent row is created (node_id = parent_node_id, name = node_id, level one
-- above the child's). Writing the parent fires this trigger again for the grandparent, so
-- the change walks up to the root. A parent is only written when something changed; a
-- cycle (or absurd depth) stops at a trigger depth of 32.
--
-- The parent row is locked before its children are read so that concurrent updates of
-- siblings serialize and the last writer sees every committed child.

CREATE OR REPLACE FUNCTION update_parent_progress() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_percent   numeric;
    v_total     bigint;
    v_failed    bigint;
    v_completed bigint;
    v_cancelled bigint;
    v_started   bigint;
    v_updated   timestamptz;
    v_first     timestamptz;
    v_last      timestamptz;
    v_status    text;
    v_level     text;
BEGIN
    IF NEW.parent_node_id IS NULL OR NEW.parent_node_id = NEW.node_id THEN
        RETURN NULL;
    END IF;
    IF pg_trigger_depth() > 32 THEN
        RAISE WARNING 'pipewatch: progress aggregation stopped at node % of experiment % (cycle or tree deeper than 32 levels)',
            NEW.node_id, NEW.experiment_id;
        RETURN NULL;
    END IF;

    PERFORM 1 FROM pipeline_progress
     WHERE experiment_id = NEW.experiment_id AND node_id = NEW.parent_node_id
       FOR UPDATE;

    SELECT avg(coalesce(c.progress_percent, 0)),
           count(*),
           count(*) FILTER (WHERE c.status = 'failed'),
           count(*) FILTER (WHERE c.status = 'completed'),
           count(*) FILTER (WHERE c.status = 'cancelled'),
           count(*) FILTER (WHERE c.status <> 'pending'),
           max(c.updated_at),
           min(c.started_at),
           max(c.completed_at)
      INTO v_percent, v_total, v_failed, v_completed, v_cancelled, v_started,
           v_updated, v_first, v_last
      FROM pipeline_progress c
     WHERE c.experiment_id = NEW.experiment_id
       AND c.parent_node_id = NEW.parent_node_id
       AND c.node_id <> NEW.parent_node_id;

    IF v_total = 0 THEN
        RETURN NULL;
    END IF;

    v_status := CASE
        WHEN v_failed > 0 THEN 'failed'
        WHEN v_completed = v_total THEN 'completed'
        WHEN v_cancelled > 0 AND v_completed + v_cancelled = v_total THEN 'cancelled'
        WHEN v_started > 0 THEN 'running'
        ELSE 'pending'
    END;
    v_percent := round(v_percent, 2);
    v_level := CASE NEW.level
        WHEN 'substep' THEN 'step'
        WHEN 'step' THEN 'phase'
        WHEN 'phase' THEN 'pipeline'
    END;

    INSERT INTO pipeline_progress AS p
           (experiment_id, node_id, level, name, status, progress_percent,
            started_at, completed_at, updated_at)
    VALUES (NEW.experiment_id, NEW.parent_node_id, v_level, NEW.parent_node_id, v_status,
            v_percent, v_first,
            CASE WHEN v_status IN ('completed', 'failed', 'cancelled') THEN v_last END,
            v_updated)
    ON CONFLICT (experiment_id, node_id) DO UPDATE
       SET progress_percent = EXCLUDED.progress_percent,
           status = EXCLUDED.status,
           started_at = coalesce(p.started_at, EXCLUDED.started_at),
           completed_at = CASE WHEN EXCLUDED.status IN ('completed', 'failed', 'cancelled')
                               THEN coalesce(EXCLUDED.completed_at, p.completed_at) END,
           updated_at = greatest(p.updated_at, EXCLUDED.updated_at)
     WHERE (p.progress_percent, p.status, p.updated_at, p.started_at, p.completed_at)
           IS DISTINCT FROM
           (EXCLUDED.progress_percent, EXCLUDED.status,
            greatest(p.updated_at, EXCLUDED.updated_at),
            coalesce(p.started_at, EXCLUDED.started_at),
            CASE WHEN EXCLUDED.status IN ('completed', 'failed', 'cancelled')
                 THEN coalesce(EXCLUDED.completed_at, p.completed_at) END);
    RETURN NULL;
END
$$;

CREATE TRIGGER pipeline_progress_update_parent
    AFTER INSERT OR UPDATE ON pipeline_progress
    FOR EACH ROW EXECUTE FUNCTION update_parent_progress();
