-- 0001: the experiments table, created only where it does not exist yet.
--
-- The real database already has `experiments`; this file leaves an existing table alone.
-- No pipeline_* table references it with a foreign key: records are never rejected because
-- their experiment row is missing, and the views join it where it exists.

CREATE TABLE IF NOT EXISTS experiments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
