//! Coalesced point reads (Get), for both backends. The dispatcher waits for
//! a Get, then for a free read connection, then takes every Get queued by
//! then (up to `MAX_BATCH`) and answers them all with one query. Under
//! light load a batch is one Get and nothing waits; under heavy load
//! batches grow and the cost of a query is shared:
//! - SQLite: sqlx runs each connection on its own worker thread, so every
//!   query costs two thread switches; under load that, not SQLite, is the
//!   cost of a Get.
//! - PostgreSQL: every query is a round trip and a statement execution in
//!   a backend process.
//!
//! It holds a connection only while it has Gets to answer, so an idle
//! dispatcher never starves other reads. A batch is one statement, so one
//! snapshot: every Get in it sees every write acknowledged before it was
//! queued.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::rows::{self, Columns};
use crate::domain::{DbName, DocId, Document, Error, Result};

/// The most Gets answered by one query.
pub(super) const MAX_BATCH: usize = 256;

pub(super) struct GetRequest {
    pub database: DbName,
    pub id: DocId,
    pub reply: oneshot::Sender<Result<Document>>,
}

/// What a backend gives the dispatcher: connections, and one query for a
/// batch of Gets.
pub(super) trait PointReads: Clone + Send + Sync + 'static {
    type Conn: Send + 'static;

    /// A read connection (busy or closing: the error every Get waiting
    /// gets).
    fn acquire(&self) -> impl Future<Output = Result<Self::Conn>> + Send;

    /// One result per request, in order.
    fn read(
        conn: &mut Self::Conn,
        requests: &[GetRequest],
    ) -> impl Future<Output = Result<Vec<Result<Document>>>> + Send;
}

/// Queues a Get for `dispatch` and waits for its answer.
pub(super) async fn get(
    gets: &mpsc::Sender<GetRequest>,
    database: &DbName,
    id: &DocId,
) -> Result<Document> {
    let (reply, rx) = oneshot::channel();
    let request = GetRequest {
        database: database.clone(),
        id: id.clone(),
        reply,
    };
    let closing = || Error::Unavailable("the server is shutting down".into());
    gets.send(request).await.map_err(|_| closing())?;
    rx.await.map_err(|_| closing())?
}

/// Runs until `closed` is cancelled or every sender is gone; then answers
/// what is still queued and waits for the batches it started.
pub(super) async fn dispatch<B: PointReads>(
    backend: B,
    mut rx: mpsc::Receiver<GetRequest>,
    closed: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let mut running = JoinSet::new();
    tokio::select! {
        () = closed.cancelled() => {}
        () = dispatch_loop(backend, &mut rx, &mut running) => {}
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

async fn dispatch_loop<B: PointReads>(
    backend: B,
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
        let conn = backend.acquire().await;
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
                running.spawn(answer::<B>(conn, requests));
            }
            Err(error) => {
                // Busy (timed out), unreachable or closing: every waiting
                // Get gets the same retryable answer.
                if let Error::Storage(why) = &error {
                    tracing::error!(error = %why, "cannot get a read connection");
                }
                for request in requests {
                    let _ = request.reply.send(Err(match &error {
                        Error::Busy(m) => Error::Busy(m.clone()),
                        Error::Unavailable(m) => Error::Unavailable(m.clone()),
                        _ => Error::Unavailable("the database cannot be read now".into()),
                    }));
                }
            }
        }
        // Reap finished batches so the set stays small.
        while running.try_join_next().is_some() {}
    }
}

async fn answer<B: PointReads>(mut conn: B::Conn, requests: Vec<GetRequest>) {
    match B::read(&mut conn, &requests).await {
        Ok(results) => {
            for (request, result) in requests.into_iter().zip(results) {
                let _ = request.reply.send(result);
            }
        }
        Err(e) => {
            let failed = || match &e {
                Error::Unavailable(m) => Error::Unavailable(m.clone()),
                Error::Busy(m) => Error::Busy(m.clone()),
                e => Error::Storage(e.to_string().into()),
            };
            if !matches!(e, Error::Unavailable(_) | Error::Busy(_)) {
                tracing::error!(error = %e, "batched read failed");
            }
            for request in requests {
                let _ = request.reply.send(Err(failed()));
            }
        }
    }
}

/// Pairs the rows of a batch's query (each with the column `n`, the
/// request's index) with the requests: one result per request, in order.
pub(super) fn results<R: Columns>(
    requests: &[GetRequest],
    found: &[R],
) -> Result<Vec<Result<Document>>> {
    let mut results: Vec<Option<Result<Document>>> = (0..requests.len()).map(|_| None).collect();
    for row in found {
        let n = row.int("n")?;
        let Some(request) = usize::try_from(n).ok().and_then(|n| requests.get(n)) else {
            continue;
        };
        let result = rows::lookup(&request.database, &request.id, row)?
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
