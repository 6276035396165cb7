-- Idempotent writes (AIP-155 request_id): the first response of every Put,
-- Delete and BulkPut that carried a request_id and succeeded, written in the
-- same transaction as the write, so a retry after any crash finds it.
-- Keyed by the database instance (ids are never reused) and the caller's
-- principal ('' without --auth). `fingerprint` is a SHA-256 of the request
-- without its request_id (a reuse with another request is refused);
-- `reply` is the response, as JSON. Pruned by age (`created_at`, unix
-- seconds) past --request-id-retention-secs, and with the database.
CREATE TABLE requests (
    db_id INTEGER NOT NULL,
    principal TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    reply TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (db_id, principal, request_id)
) WITHOUT ROWID;
CREATE INDEX requests_by_age ON requests (created_at);
