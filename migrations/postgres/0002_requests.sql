-- Idempotent writes (AIP-155 request_id): see migrations/sqlite/0004.
CREATE TABLE requests (
    db_id BIGINT NOT NULL,
    principal TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    reply TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (db_id, principal, request_id)
);
CREATE INDEX requests_by_age ON requests (created_at);
