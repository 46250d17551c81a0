-- 0007: the agent's bookkeeping: file checkpoints and the fleet's agents.
-- (pipewatch_schema_migrations is created by the migration runner itself.)

CREATE TABLE pipewatch_checkpoints (
    host        text NOT NULL,
    daemon      text NOT NULL,
    fingerprint text NOT NULL,           -- checksum of the file's first line
    path        text NOT NULL,           -- last path the file was seen at
    position    bigint NOT NULL,         -- byte offset after the last committed line
    tail_hash   text,                    -- checksum of the bytes just before position
    sticky      jsonb NOT NULL DEFAULT '{}', -- rule values in force at position
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, daemon, fingerprint)
);

CREATE TABLE pipewatch_agents (
    agent_id            text PRIMARY KEY, -- host/daemon1,daemon2
    host                text NOT NULL,
    daemons             text[] NOT NULL,
    version             text,
    started_at          timestamptz,
    last_commit_at      timestamptz,
    last_batch_id       uuid,
    records_shipped     bigint NOT NULL DEFAULT 0,
    records_quarantined bigint NOT NULL DEFAULT 0,
    details             jsonb NOT NULL DEFAULT '{}'
);
