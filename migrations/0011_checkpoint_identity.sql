-- 0011: file identity is the inode and the lineage written since its last truncation
-- (`fingerprint` now holds `dev:ino:gen`), checked against the content by two checksums:
-- the first bytes up to the position (head_hash) and the bytes just before it (tail_hash).
-- Rows written by earlier versions keep a first-line checksum in `fingerprint` and no
-- head_hash; the agent still recognises their files by content.
ALTER TABLE pipewatch_checkpoints ADD COLUMN IF NOT EXISTS head_hash text;
COMMENT ON COLUMN pipewatch_checkpoints.fingerprint IS
    'dev:ino:generation of the file lineage (earlier versions: checksum of the first line)';
