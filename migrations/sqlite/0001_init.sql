-- Initial schema. Migrations are append-only: never edit one that has landed.

-- Databases and their counters, maintained by the single writer.
CREATE TABLE databases (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    sync_key    TEXT    NOT NULL,
    doc_count   INTEGER NOT NULL DEFAULT 0,  -- live documents
    update_seq  INTEGER NOT NULL DEFAULT 0   -- highest seq of a change
);

-- The current revision of every document, tombstones included.
CREATE TABLE docs (
    db_id    INTEGER NOT NULL REFERENCES databases (id),
    id       TEXT    NOT NULL,
    rev      TEXT    NOT NULL,                -- "N-<32 hex>"
    deleted  INTEGER NOT NULL,                -- 0 or 1
    body     TEXT    NOT NULL,                -- canonical JSON; '{}' for tombstones
    seq      INTEGER NOT NULL,                -- seq of the write that made rev
    PRIMARY KEY (db_id, id)
);
-- The changes feed: each document once, at its latest seq.
CREATE UNIQUE INDEX docs_by_seq ON docs (db_id, seq);

-- The durable notification log: one row per change (document write or
-- Notify), for replay to subscribers that resume from a seq.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY,
    sync_key    TEXT    NOT NULL,
    database    TEXT    NOT NULL DEFAULT '',  -- '' for Notify
    doc_id      TEXT    NOT NULL DEFAULT '',
    rev         TEXT    NOT NULL DEFAULT '',
    deleted     INTEGER NOT NULL DEFAULT 0,
    aliases     TEXT    NOT NULL DEFAULT '[]', -- JSON array; [] means everyone
    attributes  TEXT    NOT NULL DEFAULT '{}'  -- JSON object of strings
);
CREATE INDEX events_by_key ON events (sync_key, seq);

-- Named counters. 'last_seq' is the global seq: it never goes back, even
-- when old events are pruned or a database is deleted.
CREATE TABLE counters (
    name   TEXT    PRIMARY KEY,
    value  INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('last_seq', 0);
