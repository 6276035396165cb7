//! A node's writer on PostgreSQL: the shared batching loop
//! (`batch::serve`) with one transaction per batch. The transaction first
//! reads and locks the counter rows, `last_seq` among them (`FOR UPDATE`),
//! which every node's writer does, and only then reads databases and
//! documents: all write transactions of all nodes are serialized by that
//! lock, so each sees every earlier commit, and the seqs it assigns are
//! larger than any committed before and smaller than any committed after
//! (see ARCHITECTURE.md, "A commit-ordered seq").
//!
//! Replies wait until the node's tailer has published the batch's events
//! (at most `PUBLISH_WAIT`, if the tailer lags or PostgreSQL went away
//! meanwhile), so a client that hears back from a write also finds it on
//! this node's streams.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool};
use tokio::sync::{Notify, watch};

use super::super::batch::{
    self, Answer, Committed, Current, DocRow, Engine, Queued, RequestExpiry, RequestRow, Retention,
    State, StoredRequest, Tail, Tx, aliases_json, attributes_json,
};
use super::super::{rows, to_i64, to_u64};
use super::Link;
use crate::domain::{DatabaseInfo, DocId, Document, Error, Event, RequestId, Result};

/// How long replies wait for the tailer before they are sent anyway (the
/// write is committed; its notification follows when the tailer catches up).
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

pub(super) struct Writer {
    pub pool: PgPool,
    pub retention: Retention,
    /// Wakes this node's tailer after a commit.
    pub wake_local: Arc<Notify>,
    /// Wakes the notifier, which hints the other nodes.
    pub wake_others: Arc<Notify>,
    /// The highest seq this node's tailer has published.
    pub published: watch::Receiver<u64>,
    pub link: Link,
    pub expiry: RequestExpiry,
    /// Down while PostgreSQL refuses writes for a full disk (53100), up
    /// after the next commit. Unreachability is `link`'s to report.
    pub writable: watch::Sender<bool>,
}

impl Writer {
    /// Runs one batch in a transaction on `conn`, pushing one answer per op
    /// to `answers` (even when it fails). On error the caller closes the
    /// connection, which ends the transaction.
    fn transact<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        ops: Vec<batch::Op>,
        events: &'a mut Vec<Event>,
        answers: &'a mut Vec<Answer>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        // Boxed as `Send` here, where the lifetimes are concrete: the
        // compiler cannot prove it through the spawned writer loop.
        Box::pin(async move {
            let begun = async {
                // No arguments: the simple query protocol.
                sqlx::Executor::execute(&mut *conn, "BEGIN").await?;
                let mut state = lock(conn, &ops, self.retention).await?;
                self.expiry.stamp(&mut state);
                Ok(state)
            };
            let mut state = match begun.await {
                Ok(state) => state,
                Err(e) => {
                    answers.extend(
                        ops.into_iter()
                            .map(|op| op.failed(Error::Storage("the batch failed".into()))),
                    );
                    return Err(e);
                }
            };
            batch::apply(conn, &mut state, ops, events, answers).await?;
            self.retention = state.retention;
            Ok(())
        })
    }
}

/// Takes the global write lock and reads what the batch starts from: the
/// counters and the databases its ops name.
async fn lock(conn: &mut PgConnection, ops: &[batch::Op], retention: Retention) -> Result<State> {
    let counters = sqlx::query("SELECT name, value FROM counters ORDER BY name FOR UPDATE")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(rows::counter)
        .collect::<Result<Vec<_>>>()?;
    let counter = |name: &str| {
        counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| Error::Storage(format!("counter {name} is missing").into()))
    };
    let mut names: Vec<String> = ops
        .iter()
        .filter_map(batch::Op::database)
        .map(ToString::to_string)
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut databases = HashMap::new();
    if !names.is_empty() {
        let rows = sqlx::query("SELECT id, name, sync_key FROM databases WHERE name = ANY($1)")
            .bind(&names)
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let (name, db) = rows::db_row(&row)?;
            databases.insert(name, db);
        }
    }
    Ok(State {
        last_seq: to_u64(counter("last_seq")?),
        last_db_id: counter("last_db_id")?,
        retention: Retention {
            keep: retention.keep,
            pruned_through: to_u64(counter("pruned_through")?),
        },
        databases,
        now_secs: 0,
        expire_requests_before: None,
    })
}

impl Engine for Writer {
    async fn commit(&mut self, queued: Vec<Queued>) -> Committed {
        let (ops, permits) = batch::unzip(queued);
        let requests = ops.len();
        let mut events = Vec::new();
        let mut answers = Vec::with_capacity(requests);
        let started = std::time::Instant::now();
        // Whether this batch reached PostgreSQL at all (if not, nothing of
        // it can have been committed).
        let attempted = self.link.check().is_ok();
        let link = self.link.clone();
        let mut ops = Some(ops);
        let outcome = link
            .guard(async {
                // Nothing is sent until a connection is in hand, so this
                // wait may end early when PostgreSQL is seen gone.
                let mut conn = link.acquire(&self.pool).await?;
                let ops = ops.take().unwrap_or_default();
                let result = self
                    .transact(&mut conn, ops, &mut events, &mut answers)
                    .await;
                if result.is_err() {
                    // Its transaction is unfinished or its state unknown:
                    // closing it rolls back; it is never handed on.
                    let _ = conn.detach().close_hard().await;
                }
                result
            })
            .await;
        // Ops that never reached `transact` (no connection) are answered too.
        answers.extend(
            ops.into_iter()
                .flatten()
                .map(|op| op.failed(Error::Storage("the batch failed".into()))),
        );
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            tracing::warn!(?took, requests, "a batch took long to commit");
        }
        match &outcome {
            Ok(()) => batch::set_writable(&self.writable, true),
            Err(Error::StorageFull(_)) => batch::set_writable(&self.writable, false),
            Err(_) => {}
        }
        match outcome {
            Ok(()) => {
                let Some(last) = events.last().map(|e| e.seq) else {
                    answers.into_iter().for_each(Answer::send);
                    return Committed::Yes;
                };
                self.wake_local.notify_one();
                self.wake_others.notify_one();
                let mut published = self.published.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(PUBLISH_WAIT, published.wait_for(|seq| *seq >= last))
                            .await;
                    answers.into_iter().for_each(Answer::send);
                    drop(permits);
                });
                Committed::Yes
            }
            Err(e) => {
                let unreachable = matches!(e, Error::Unavailable(_) | Error::Busy(_));
                if unreachable {
                    tracing::debug!(error = %e, "batch failed: PostgreSQL is unreachable");
                } else {
                    tracing::error!(error = %e, "batch failed; it is rolled back");
                }
                let failed = batch::failing_all(answers, || match &e {
                    Error::Unavailable(m) if attempted => Error::Unavailable(format!(
                        "{m}; nothing of this request was applied, or it was committed just as the connection broke: read before retrying a create"
                    )),
                    Error::Unavailable(m) => Error::Unavailable(m.clone()),
                    Error::Busy(m) => Error::Busy(m.clone()),
                    Error::StorageFull(m) => Error::StorageFull(m.clone()),
                    _ => Error::Storage(
                        "the transaction failed to commit; nothing of this request was applied"
                            .into(),
                    ),
                });
                failed.into_iter().for_each(Answer::send);
                Committed::failed_with(&e)
            }
        }
    }

    fn batch_bytes(&self) -> usize {
        // Bounds a transaction's size and the memory its statements hold.
        16 * 1024 * 1024
    }

    fn idle_after(&self) -> Option<Duration> {
        None
    }

    async fn idle(&mut self) -> bool {
        true
    }

    fn max_failed_batches(&self) -> Option<u32> {
        // PostgreSQL may come back: keep answering UNAVAILABLE until it does.
        None
    }

    async fn close(self) {}
}

/// `columns` of the rows of `docs` of those of `ids` that exist, in one
/// query, each mapped by `map`.
async fn docs_by_id<T>(
    conn: &mut PgConnection,
    columns: &str,
    db_id: i64,
    ids: &[&DocId],
    map: impl Fn(&sqlx::postgres::PgRow) -> Result<T>,
) -> Result<Vec<T>> {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let sql = format!("SELECT {columns} FROM docs WHERE db_id = $1 AND id = ANY($2)");
    let found = sqlx::query(&sql)
        // Planned for its arguments each time (once per batch): a generic
        // plan cached while a new database's table was empty kept scanning
        // it whole as it grew (create-64 fell from 3.6k to 2.1k writes/s
        // within 12 s).
        .persistent(false)
        .bind(db_id)
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
    found.iter().map(map).collect()
}

impl Tx for PgConnection {
    async fn doc_states(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<(DocId, Current)>> {
        docs_by_id(self, "id, rev, deleted, seq", db_id, ids, |row| {
            rows::doc_state(rows::doc_id(row)?, row)
        })
        .await
    }

    async fn documents(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<Document>> {
        docs_by_id(self, "id, rev, body, seq", db_id, ids, |row| {
            rows::document(rows::doc_id(row)?, row)
        })
        .await
    }

    /// One statement for the whole batch: arrays unnested into rows.
    async fn put_docs(&mut self, rows: &[DocRow]) -> Result<()> {
        sqlx::query(
            "INSERT INTO docs (db_id, id, rev, deleted, body, seq) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::boolean[], $5::text[], $6::bigint[]) \
             ON CONFLICT (db_id, id) DO UPDATE SET rev = excluded.rev, \
             deleted = excluded.deleted, body = excluded.body, seq = excluded.seq",
        )
        .bind(rows.iter().map(|r| r.db_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.id.to_string()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.rev.to_string()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.body.canonical_json()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| to_i64(r.seq)).collect::<Vec<_>>())
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases, attributes) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::boolean[], $7::text[], $8::text[])",
        )
        .bind(events.iter().map(|e| to_i64(e.seq)).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.sync_key.to_string()).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.database.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.id.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.rev.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.deleted).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| aliases_json(&e.aliases).into_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| attributes_json(&e.attributes).into_owned())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn insert_database(&mut self, id: i64, info: &DatabaseInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO databases (id, name, sync_key, created_seq) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(info.name.as_str())
        .bind(info.sync_key.as_str())
        .bind(to_i64(info.created_seq))
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn delete_database(&mut self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM docs WHERE db_id = $1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        sqlx::query("DELETE FROM requests WHERE db_id = $1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        sqlx::query("DELETE FROM databases WHERE id = $1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn request(
        &mut self,
        db_id: i64,
        principal: &str,
        request_id: &RequestId,
    ) -> Result<Option<StoredRequest>> {
        let found = sqlx::query(
            "SELECT fingerprint, reply FROM requests \
             WHERE db_id = $1 AND principal = $2 AND request_id = $3",
        )
        .bind(db_id)
        .bind(principal)
        .bind(request_id.as_str())
        .fetch_optional(&mut *self)
        .await?;
        found.as_ref().map(rows::request).transpose()
    }

    /// One statement for every request_id of the batch: arrays unnested
    /// into rows.
    async fn put_requests(&mut self, requests: &[RequestRow]) -> Result<()> {
        let column = |f: fn(&RequestRow) -> String| requests.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO requests (db_id, principal, request_id, fingerprint, reply, created_at) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])",
        )
        .bind(requests.iter().map(|r| r.db_id).collect::<Vec<_>>())
        .bind(column(|r| r.principal.clone()))
        .bind(column(|r| r.request_id.as_str().to_owned()))
        .bind(requests.iter().map(|r| r.fingerprint.to_vec()).collect::<Vec<_>>())
        .bind(column(|r| r.reply.clone()))
        .bind(requests.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    /// Counters, pruning and the commit in one round trip (simple query
    /// protocol). Every value is an integer the writer computed, so writing
    /// them into the SQL text is safe.
    async fn finish(&mut self, tail: Tail) -> Result<()> {
        let mut sql = String::new();
        if !tail.databases.is_empty() {
            let list = |f: fn(&batch::DbCounters) -> i64| {
                tail.databases
                    .iter()
                    .map(|t| f(t).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let _ = writeln!(
                sql,
                "UPDATE databases d SET doc_count = d.doc_count + u.delta, update_seq = u.seq \
                 FROM UNNEST('{{{}}}'::bigint[], '{{{}}}'::bigint[], '{{{}}}'::bigint[]) AS u(id, delta, seq) \
                 WHERE d.id = u.id;",
                list(|c| c.db_id),
                list(|c| c.delta),
                list(|c| to_i64(c.update_seq)),
            );
        }
        if let Some(id) = tail.last_db_id {
            let _ = writeln!(
                sql,
                "UPDATE counters SET value = {id} WHERE name = 'last_db_id';"
            );
        }
        if let Some(seq) = tail.last_seq {
            let _ = writeln!(
                sql,
                "UPDATE counters SET value = {} WHERE name = 'last_seq';",
                to_i64(seq)
            );
        }
        if let Some(through) = tail.prune_through {
            let through = to_i64(through);
            let _ = writeln!(
                sql,
                "DELETE FROM events WHERE seq <= {through};\n\
                 UPDATE counters SET value = {through} WHERE name = 'pruned_through';"
            );
        }
        if let Some(before) = tail.expire_requests_before {
            let _ = writeln!(
                sql,
                "DELETE FROM requests WHERE ctid IN \
                 (SELECT ctid FROM requests WHERE created_at < {before} LIMIT {});",
                batch::PRUNE_CHUNK
            );
        }
        sql.push_str("COMMIT;");
        // No arguments: the simple query protocol, which runs several
        // statements in one round trip.
        sqlx::Executor::execute(&mut *self, sql.as_str()).await?;
        Ok(())
    }
}
