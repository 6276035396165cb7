//! The no-op server: the same proto, every RPC answers at once without
//! touching storage, Subscribe sends `subscribed` and then every Put as a
//! notification, through a tokio broadcast channel (the least a tonic
//! server can do to fan out). Measures the ceiling of any tonic server on
//! this machine, fan-out included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use agsync::pb::sync_service_server::{SyncService, SyncServiceServer};
use agsync::pb::{self, subscribe_response::Event};
use tonic::{Request, Response, Status};

pub struct Noop {
    seq: AtomicU64,
    /// Each database's sync key, for Put's notifications.
    keys: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Every Put's notification, to every open Subscribe stream.
    fanout: tokio::sync::broadcast::Sender<pb::SubscribeResponse>,
}

impl Default for Noop {
    fn default() -> Self {
        Noop {
            seq: AtomicU64::new(0),
            keys: std::sync::Mutex::default(),
            fanout: tokio::sync::broadcast::Sender::new(FANOUT_BUFFER),
        }
    }
}

/// Notifications a subscriber may fall behind by before it skips some.
const FANOUT_BUFFER: usize = 4096;

const REV: &str = "1-00000000000000000000000000000000";
/// agsync's default `--max-request-bytes`.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

impl Noop {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[tonic::async_trait]
impl SyncService for Noop {
    async fn create_database(
        &self,
        r: Request<pb::CreateDatabaseRequest>,
    ) -> Result<Response<pb::CreateDatabaseResponse>, Status> {
        let r = r.into_inner();
        let sync_key = if r.sync_key.is_empty() {
            r.name.clone()
        } else {
            r.sync_key
        };
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(r.name.clone(), sync_key.clone());
        Ok(Response::new(pb::CreateDatabaseResponse {
            database: Some(pb::Database {
                sync_key,
                name: r.name,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
    async fn delete_database(
        &self,
        _: Request<pb::DeleteDatabaseRequest>,
    ) -> Result<Response<pb::DeleteDatabaseResponse>, Status> {
        Ok(Response::new(pb::DeleteDatabaseResponse::default()))
    }
    async fn list_databases(
        &self,
        _: Request<pb::ListDatabasesRequest>,
    ) -> Result<Response<pb::ListDatabasesResponse>, Status> {
        Ok(Response::new(pb::ListDatabasesResponse::default()))
    }
    async fn new_id(
        &self,
        _: Request<pb::NewIdRequest>,
    ) -> Result<Response<pb::NewIdResponse>, Status> {
        Ok(Response::new(pb::NewIdResponse {
            ids: vec!["0".repeat(32)],
            ..Default::default()
        }))
    }
    async fn put(&self, r: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = r.into_inner();
        let seq = self.next_seq();
        if self.fanout.receiver_count() > 0 {
            let sync_key = self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&r.database)
                .cloned()
                .unwrap_or_else(|| r.database.clone());
            let _ = self.fanout.send(pb::SubscribeResponse {
                event: Some(Event::Notification(pb::Notification {
                    sync_key,
                    seq,
                    database: r.database,
                    id: r.id.clone(),
                    rev: REV.into(),
                    ..Default::default()
                })),
            });
        }
        Ok(Response::new(pb::PutResponse {
            id: r.id,
            rev: REV.into(),
            seq,
        }))
    }
    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(pb::GetResponse {
            document: Some(pb::Document {
                id: r.into_inner().id,
                rev: REV.into(),
                body: Some(prost_types::Struct::default()),
                seq: 1,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
    async fn delete(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        Ok(Response::new(pb::DeleteResponse {
            id: r.into_inner().id,
            rev: REV.into(),
            seq: self.next_seq(),
            ..Default::default()
        }))
    }
    async fn bulk_put(
        &self,
        r: Request<pb::BulkPutRequest>,
    ) -> Result<Response<pb::BulkPutResponse>, Status> {
        let results = r
            .into_inner()
            .docs
            .into_iter()
            .map(|d| pb::BulkPutResult {
                id: d.id,
                rev: REV.into(),
                seq: self.next_seq(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::BulkPutResponse {
            results,
            ..Default::default()
        }))
    }
    async fn changes(
        &self,
        r: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        Ok(Response::new(pb::ChangesResponse {
            last_seq: r.into_inner().since,
            ..Default::default()
        }))
    }
    async fn notify(
        &self,
        _: Request<pb::NotifyRequest>,
    ) -> Result<Response<pb::NotifyResponse>, Status> {
        Ok(Response::new(pb::NotifyResponse {
            seq: self.next_seq(),
            ..Default::default()
        }))
    }

    type SubscribeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>,
    >;

    async fn subscribe(
        &self,
        r: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let keys = r.into_inner().sync_keys;
        let rx = self.fanout.subscribe();
        let subscribed = pb::SubscribeResponse {
            event: Some(Event::Subscribed(pb::Subscribed {
                head_seq: self.seq.load(Ordering::Relaxed),
            })),
        };
        // `subscribed`, then each notification of its keys; a lagging
        // subscriber skips what it missed (the bench then reports it
        // undelivered).
        let stream = futures_util::stream::unfold(
            (Some(subscribed), rx, keys),
            |(first, mut rx, keys)| async move {
                if let Some(first) = first {
                    return Some((Ok(first), (None, rx, keys)));
                }
                loop {
                    match rx.recv().await {
                        Ok(message) => {
                            let ours = match &message.event {
                                Some(Event::Notification(n)) => keys.contains(&n.sync_key),
                                _ => true,
                            };
                            if ours {
                                return Some((Ok(message), (None, rx, keys)));
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    type SnapshotStream = tokio_stream::Once<Result<pb::SnapshotResponse, Status>>;

    /// One complete, empty message at the current seq.
    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Ok(Response::new(tokio_stream::once(Ok(
            pb::SnapshotResponse {
                snapshot_seq: self.seq.load(Ordering::Relaxed),
                complete: true,
                ..Default::default()
            },
        ))))
    }
}

pub async fn serve(listen: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("no-op server listening address={local}");
    tonic::transport::Server::builder()
        .add_service(
            // The same message limits as agsync's defaults (server.rs), so
            // near-limit requests are a fair comparison.
            SyncServiceServer::new(Noop::default())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await
        .map_err(|e| e.to_string())
}
