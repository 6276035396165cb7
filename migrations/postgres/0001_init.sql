-- The PostgreSQL schema: the same tables and meaning as migrations/sqlite
-- (see ARCHITECTURE.md), for several agsync nodes sharing one database.
-- Migrations are append-only: never edit one that has landed.

-- Databases and their counters, maintained by the writers.
CREATE TABLE databases (
    id           BIGINT  PRIMARY KEY,          -- never reused ('last_db_id')
    name         TEXT    NOT NULL UNIQUE,
    sync_key     TEXT    NOT NULL,
    doc_count    BIGINT  NOT NULL DEFAULT 0,   -- live documents
    update_seq   BIGINT  NOT NULL DEFAULT 0,   -- highest seq of a change
    created_seq  BIGINT  NOT NULL DEFAULT 0    -- head seq at creation
);

-- The current revision of every document, tombstones included.
CREATE TABLE docs (
    db_id    BIGINT  NOT NULL REFERENCES databases (id),
    id       TEXT    NOT NULL,
    rev      TEXT    NOT NULL,                -- "N-<32 hex>"
    deleted  BOOLEAN NOT NULL,
    body     TEXT    NOT NULL,                -- canonical JSON; '{}' for tombstones
    seq      BIGINT  NOT NULL,                -- seq of the write that made rev
    PRIMARY KEY (db_id, id)
);
-- The changes feed: each document once, at its latest seq.
CREATE UNIQUE INDEX docs_by_seq ON docs (db_id, seq);

-- The durable notification log, and the source every node's subscribers
-- are fed from (a node tails it in seq order).
CREATE TABLE events (
    seq         BIGINT  PRIMARY KEY,
    sync_key    TEXT    NOT NULL,
    database    TEXT    NOT NULL DEFAULT '',  -- '' for Notify
    doc_id      TEXT    NOT NULL DEFAULT '',  -- '' for Notify and DeleteDatabase
    rev         TEXT    NOT NULL DEFAULT '',
    deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    aliases     TEXT    NOT NULL DEFAULT '[]', -- JSON array; [] means everyone
    attributes  TEXT    NOT NULL DEFAULT '{}'  -- JSON object of strings
);
CREATE INDEX events_by_key ON events (sync_key, seq);

-- Named counters. Every write transaction locks 'last_seq' (SELECT ... FOR
-- UPDATE) before it reads anything else and holds it until it commits: seqs
-- are handed out in commit order, so once any node sees seq N, every smaller
-- seq is already visible.
CREATE TABLE counters (
    name   TEXT    PRIMARY KEY,
    value  BIGINT  NOT NULL
);
INSERT INTO counters (name, value) VALUES
    ('last_seq', 0), ('pruned_through', 0), ('last_db_id', 0);
