//! Coalesced point reads (Get). sqlx runs each SQLite connection on its own
//! worker thread, so every query costs two thread switches; under load that,
//! not SQLite, is the cost of a Get. The dispatcher therefore waits for a
//! Get, then for a free read connection, then takes every Get queued by then
//! (up to `MAX_BATCH`) and answers them all with one query. Under light load
//! a batch is one Get and nothing waits; under heavy load batches grow and
//! the switches are shared. It holds a connection only while it has Gets to
//! answer, so an idle dispatcher never starves other reads.

use sqlx::QueryBuilder;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::super::rows::{self, Columns};
use crate::domain::{DbName, DocId, Document, Error, Result};

/// The most Gets answered by one query.
const MAX_BATCH: usize = 256;

pub(super) struct GetRequest {
    pub database: DbName,
    pub id: DocId,
    pub reply: oneshot::Sender<Result<Document>>,
}

/// Runs until `closed` is cancelled or every sender is gone; then answers
/// what is still queued and waits for the batches it started.
pub(super) async fn dispatch(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<GetRequest>,
    closed: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let mut running = JoinSet::new();
    tokio::select! {
        () = closed.cancelled() => {}
        () = dispatch_loop(pool, &mut rx, &mut running) => {}
    }
    // Anything still queued is answered: the store is closing.
    rx.close();
    while let Ok(request) = rx.try_recv() {
        let _ = request.reply.send(Err(Error::Unavailable(
            "the server is shutting down".into(),
        )));
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

async fn dispatch_loop(
    pool: SqlitePool,
    rx: &mut mpsc::Receiver<GetRequest>,
    running: &mut JoinSet<()>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // Work first, then a connection: while all connections are busy,
        // requests keep queueing and the next free one takes them all.
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let conn = pool.acquire().await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let requests = std::mem::take(&mut batch);
        #[allow(clippy::cast_precision_loss)] // at most MAX_BATCH
        metrics::histogram!(crate::telemetry::READ_BATCH_SIZE).record(requests.len() as f64);
        match conn {
            Ok(conn) => {
                running.spawn(answer(conn, requests));
            }
            Err(e) => {
                // Busy (timed out) or closing: every waiting Get gets the
                // same retryable answer.
                let error = Error::from(e);
                if let Error::Storage(why) = &error {
                    tracing::error!(error = %why, "cannot get a read connection");
                }
                for request in requests {
                    let _ = request.reply.send(Err(match &error {
                        Error::Busy(m) => Error::Busy(m.clone()),
                        _ => Error::Unavailable("the database cannot be read now".into()),
                    }));
                }
            }
        }
        // Reap finished batches so the set stays small.
        while running.try_join_next().is_some() {}
    }
}

async fn answer(mut conn: PoolConnection<Sqlite>, requests: Vec<GetRequest>) {
    match read(&mut conn, &requests).await {
        Ok(results) => {
            for (request, result) in requests.into_iter().zip(results) {
                let _ = request.reply.send(result);
            }
        }
        Err(e) => {
            let message = e.to_string();
            tracing::error!(error = %message, "batched read failed");
            for request in requests {
                let _ = request
                    .reply
                    .send(Err(Error::Storage(message.clone().into())));
            }
        }
    }
}

/// One query for the whole batch; one result per request, in order.
async fn read(
    conn: &mut PoolConnection<Sqlite>,
    requests: &[GetRequest],
) -> Result<Vec<Result<Document>>> {
    let mut query = QueryBuilder::<Sqlite>::new("WITH req (n, name, id) AS (");
    if requests.len() == 1 {
        // The common light-load case: a fixed text, so a cached statement.
        query.push("SELECT 0, ");
        query.push_bind(requests[0].database.as_str());
        query.push(", ");
        query.push_bind(requests[0].id.as_str());
    } else {
        query.push("VALUES ");
        let mut rows = query.separated(", ");
        for (n, request) in requests.iter().enumerate() {
            rows.push("(")
                .push_bind_unseparated(i64::try_from(n).unwrap_or(i64::MAX))
                .push_unseparated(", ")
                .push_bind_unseparated(request.database.as_str())
                .push_unseparated(", ")
                .push_bind_unseparated(request.id.as_str())
                .push_unseparated(")");
        }
    }
    query.push(
        ") SELECT req.n, db.id AS db_id, d.rev, d.deleted, d.body, d.seq FROM req \
         LEFT JOIN databases db ON db.name = req.name \
         LEFT JOIN docs d ON d.db_id = db.id AND d.id = req.id",
    );
    let rows = query
        .build()
        .persistent(requests.len() == 1)
        .fetch_all(&mut **conn)
        .await?;
    let mut results: Vec<Option<Result<Document>>> = (0..requests.len()).map(|_| None).collect();
    for row in rows {
        let n = row.int("n")?;
        let Some(request) = usize::try_from(n).ok().and_then(|n| requests.get(n)) else {
            continue;
        };
        let result = rows::lookup(&request.database, &request.id, &row)?
            .unwrap_or_else(|| Err(Error::DatabaseNotFound(request.database.to_string())));
        if let Some(slot) = results.get_mut(usize::try_from(n).unwrap_or(usize::MAX)) {
            *slot = Some(result);
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Storage("a batched read lost a row".into()))))
        .collect())
}
