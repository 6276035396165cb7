-- Database instances. A database deleted and created again under the same
-- name is a new instance: it gets a seq of its own ('created_seq') and an id
-- never used before ('last_db_id'), so nothing of the old instance (counters,
-- cached state) can leak into the new one.
ALTER TABLE databases ADD COLUMN created_seq INTEGER NOT NULL DEFAULT 0;
INSERT INTO counters (name, value)
    VALUES ('last_db_id', (SELECT COALESCE(MAX(id), 0) FROM databases));
-- A DeleteDatabase is logged as an event with `database` set, an empty
-- `doc_id` and `deleted` = 1 (no new column: the encoding is unambiguous,
-- since every document event has a non-empty doc_id).
