//! Wiring: opens the store, serves the gRPC services (SyncService, health,
//! reflection) on a listener, and shuts down in order: stop accepting,
//! let in-flight requests finish (bounded), then close the store (commit
//! queued writes, checkpoint the WAL).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::Service;
use crate::config::Config;
use crate::domain::Result;
use crate::hub::Hub;
use crate::pb::sync_service_server::SyncServiceServer;
use crate::store::Store;

/// How often idle HTTP/2 connections are pinged, and how long a ping may go
/// unanswered before the connection is dropped: dead clients are noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves on `listener` until `shutdown` completes, then shuts down cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // The hub starts empty; the writer publishes to it after each commit.
    let hub = Hub::new(0);
    let publisher: crate::store::Publisher = {
        let hub = hub.clone();
        Arc::new(move |events| hub.publish(events))
    };
    let store = Arc::new(Store::open(config.store_options(), publisher).await?);
    hub.advance_to(store.last_seq().await?);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let service = Service::new(store.clone(), hub, stop.clone(), tasks.clone(), &config);
    let sync = SyncServiceServer::new(service)
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(usize::MAX);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SyncServiceServer<Service>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(startup_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(startup_error)?;

    let local = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(address = %local, db = %config.db.display(), durability = ?config.durability, "agsync listening");

    let stopping = stop.clone();
    let health_on_stop = health_reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        health_on_stop
            .set_not_serving::<SyncServiceServer<Service>>()
            .await;
        stopping.cancel();
    });

    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(sync)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::pin!(serve);
    let served = tokio::select! {
        r = &mut serve => r,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(config.shutdown_timeout_secs).await;
        } => {
            tracing::warn!("in-flight requests did not finish in time; closing anyway");
            Ok(())
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "the gRPC server failed");
    }
    // Subscription tasks end on `stop`; wait for them before closing the store.
    tasks.close();
    if tokio::time::timeout(config.shutdown_timeout_secs, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("subscription tasks did not end in time");
    }
    store.close().await;
    tracing::info!("agsync stopped");
    Ok(())
}

fn startup_error(e: tonic_reflection::server::Error) -> crate::domain::Error {
    crate::domain::Error::Storage(format!("cannot build the reflection service: {e}").into())
}
