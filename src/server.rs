//! Wiring: opens the store and the hub, serves the gRPC services
//! (SyncService behind `api::guard`, health, reflection) and gRPC-Web on
//! one listener, and `/metrics` when asked, then shuts down in order: stop
//! accepting and end every Subscribe stream, let in-flight requests finish
//! (bounded), join the server's tasks, then close the store (commit queued
//! writes, checkpoint the WAL). With `api`, the only code that sees tonic;
//! it handles no request itself.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::api::Service;
use crate::api::guard::{Budgets, Guard, methods_of};
use crate::auth::{Auth, Authenticator};
use crate::config::Config;
use crate::domain::{Error, Result};
use crate::hub::Hub;
use crate::pb::sync_service_server::SyncServiceServer;
use crate::store::Store;

/// How often idle HTTP/2 connections are pinged, and how long a ping may go
/// unanswered before the connection is dropped: dead clients are noticed.
/// TCP keepalive probes use the same times (three unanswered probes).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP/2 connection flow-control window (see `run`).
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Serves on `listener` until `shutdown` completes, then shuts down cleanly.
/// Returns an error, after shutting down as cleanly as it can, if the gRPC
/// server failed or an essential task of the store died (the process should
/// then exit non-zero so an orchestrator restarts it).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the listening address: {e}")))?;
    let auth = Arc::new(Authenticator::new(
        load_auth(&config, local_addr)?,
        config.auth.clone(),
    ));
    let tls = load_tls(&config)?;

    // The hub starts empty; the store publishes to it (`Publish`): on
    // SQLite `deliver` after each commit of the writer thread, on
    // PostgreSQL the node's tailer what it reads from the event log.
    let hub = Hub::new(0, config.subscriber_limits());
    let publisher: crate::store::Publisher = hub.clone();
    let store = Arc::new(Store::open(config.store_options(), publisher).await?);
    hub.advance_to(store.last_seq().await?);
    let stop = CancellationToken::new();
    // An early return below still stops the tasks spawned before it.
    let _stop_on_return = stop.clone().drop_guard();
    let service = Service::new(
        store.clone(),
        auth.clone(),
        hub.clone(),
        stop.clone(),
        &config,
    );
    let sync = SyncServiceServer::new(service)
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(usize::MAX);
    let sync = Guard::new(
        sync,
        auth.clone(),
        methods_of(crate::pb::FILE_DESCRIPTOR_SET, SYNC_SERVICE),
        Budgets {
            in_flight: config.max_in_flight,
            large_request_bytes: config.max_large_request_bytes,
            max_request_bytes: config.max_request_bytes,
        },
    );

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SyncServiceServer<Service>>()
        .await;
    health_reporter
        .set_service_status(WRITES_HEALTH, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(startup_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(startup_error)?;

    let reloader = tokio::spawn(reload_auth_on_sighup(auth.clone(), stop.clone()));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let sources = (store.clone(), hub.clone(), auth.clone());
            Some(serve_metrics(addr, &config, sources, stop.clone()).await?)
        }
        None => None,
    };
    tracing::info!(
        address = %local_addr,
        db = %config.db_for_logs(),
        durability = ?config.durability,
        tls = tls.is_some(),
        auth = config.auth.is_some(),
        cors_allow_origin = ?config.cors_allow_origin,
        version = env!("CARGO_PKG_VERSION"),
        "agsync listening"
    );

    // Stops the server on the shutdown signal, or when the store can no
    // longer serve; health turns NOT_SERVING first either way.
    let watcher = {
        let (stop, store, health) = (stop.clone(), store.clone(), health_reporter.clone());
        let mut reachable = store.reachable();
        let mut writable = store.writable();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => {
                        tracing::info!("shutting down: no new connections, finishing in-flight requests");
                        break;
                    }
                    () = store.failed() => {
                        tracing::error!("the store can no longer serve; shutting down so the process can be restarted");
                        break;
                    }
                    () = stop.cancelled() => break,
                    // The database went away or came back (PostgreSQL): a
                    // load balancer should send calls elsewhere meanwhile.
                    // The disk filled or freed (or another process locked
                    // the file): reads go on, so only `agsync.writes` says so.
                    Ok(()) = writable.changed() => {
                        let status = if *writable.borrow_and_update() {
                            tonic_health::ServingStatus::Serving
                        } else {
                            tonic_health::ServingStatus::NotServing
                        };
                        health.set_service_status(WRITES_HEALTH, status).await;
                    }
                    Ok(()) = reachable.changed() => {
                        if *reachable.borrow_and_update() {
                            tracing::info!("the database is reachable again: SERVING");
                            set_health(&health, true).await;
                        } else {
                            tracing::warn!("the database is unreachable: NOT_SERVING until it is back");
                            set_health(&health, false).await;
                        }
                    }
                }
            }
            set_health(&health, false).await;
            stop.cancel();
        })
    };

    // gRPC-Web (HTTP/1.1 too) for browsers on the same port; see `api::web`.
    let origins = crate::api::web::Origins::from_flags(&config.cors_allow_origin);
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(crate::api::web::OriginGateLayer::new(origins.clone()))
        .layer(tower::util::option_layer(origins.cors()))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(crate::api::web::TrailersFrameLayer)
        .layer(crate::api::calls::GrpcLayer::new(
            &[
                crate::pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            config.slow_request_ms,
            config.streams_per_connection(),
        ))
        // h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM) when small
        // DATA frames not yet read by their calls exceed half the
        // connection window: with hyper's 1 MiB, about 2,000 calls opened
        // at once on one connection (a gateway reconnecting its users'
        // streams). 4 MiB takes about 9,000; calls read their message
        // promptly, so the window is not memory held for long.
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(config.streams_per_connection()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(sync);
    // No Nagle delay: small responses go out at once. TCP keepalive notices
    // dead peers on HTTP/1.1 (gRPC-Web) connections, which have no HTTP/2
    // pings.
    let tcp = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE_INTERVAL))
        .with_keepalive_interval(Some(KEEPALIVE_TIMEOUT))
        .with_keepalive_retries(Some(3));
    let mut serve: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            crate::api::tls::incoming(tcp, tls, stop.clone()),
            stop.clone().cancelled_owned(),
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(tcp, stop.clone().cancelled_owned())),
    };
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
    // However serving ended, every task is stopped and joined before the
    // store closes.
    stop.cancel();
    let _ = watcher.await;
    let _ = reloader.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    store.close().await;
    let store_failed = store.has_failed();
    tracing::info!("agsync stopped");
    match served {
        Err(e) => Err(Error::Fatal(format!("the gRPC server failed: {e}"))),
        Ok(()) if store_failed => Err(Error::Fatal(
            "the store could no longer write (see the errors above); restart the server once the cause is fixed".into(),
        )),
        Ok(()) => Ok(()),
    }
}

/// The service name in the descriptor, as the gate looks its methods up.
const SYNC_SERVICE: &str = "agsync.v1.SyncService";

/// Reloads the `--auth` file on every SIGHUP until `stop`; a file that does
/// not load keeps the previous configuration. The signal handler is
/// installed when this is called, not when the future first runs: a SIGHUP
/// sent once the server is listening must never kill the process.
fn reload_auth_on_sighup(
    auth: Arc<Authenticator>,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangups = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: the auth file will not be reloaded");
            })
            .ok()
    };
    async move {
        #[cfg(unix)]
        {
            let Some(mut hangups) = hangups else {
                return;
            };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    received = hangups.recv() => if received.is_none() { return },
                }
                match auth.reload() {
                    Ok(()) => tracing::info!("SIGHUP: auth configuration reloaded"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: the auth file did not load; keeping the previous configuration"
                    ),
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = auth;
            stop.cancelled().await;
        }
    }
}

/// Binds `--metrics-listen` (under the same loopback rule as the API) and
/// serves `/metrics` until `stop`; gauges of state are read at each scrape.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    config: &Config,
    (store, hub, auth): (Arc<Store>, Arc<Hub>, Arc<Authenticator>),
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    // With --auth, scrapers need a token with the metrics grant.
    if !addr.ip().is_loopback() && config.auth.is_none() && !config.insecure_open {
        return Err(Error::Config(format!(
            "refusing to serve metrics on {addr} without authentication: they show what the server does and for whom (methods, principals' failures, subscribers); pass --auth FILE (scrapers then need a token with the metrics grant), listen on a loopback address, or pass --insecure-open"
        )));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the metrics address: {e}")))?;
    let handle = crate::telemetry::install();
    tracing::info!(address = %bound, "metrics listening at /metrics");
    let collect = move || {
        let (store, hub) = (store.clone(), hub.clone());
        async move {
            // A busy or unreachable database must not hold the scrape: the
            // store's gauges then keep their last values.
            let _ = tokio::time::timeout(Duration::from_secs(2), store.observe()).await;
            #[allow(clippy::cast_precision_loss)] // counts and seqs well below 2^52
            {
                metrics::gauge!(crate::telemetry::SUBSCRIBERS).set(hub.subscriber_count() as f64);
                metrics::gauge!(crate::telemetry::HEAD_SEQ).set(hub.head() as f64);
            }
        }
    };
    Ok(tokio::spawn(crate::telemetry::serve(
        listener, handle, auth, collect, stop,
    )))
}

fn startup_error(e: tonic_reflection::server::Error) -> Error {
    Error::Config(format!("cannot build the reflection service: {e}"))
}

/// The `--auth` file, or the open mode: allowed on loopback addresses, and
/// elsewhere only with `--insecure-open`.
fn load_auth(config: &Config, addr: std::net::SocketAddr) -> Result<Auth> {
    if let Some(path) = &config.auth {
        return Auth::load(path).map_err(|e| Error::Config(e.to_string()));
    }
    if !addr.ip().is_loopback() && !config.insecure_open {
        return Err(Error::Config(format!(
            "refusing to serve {addr} without authentication: pass --auth FILE (see the README's Security section), listen on a loopback address, or pass --insecure-open"
        )));
    }
    tracing::warn!(
        address = %addr,
        "no --auth: anyone who can reach this address may read, write and delete everything"
    );
    Ok(Auth::open())
}

fn load_tls(config: &Config) -> Result<Option<Arc<crate::api::tls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    crate::api::tls::server_config(cert, key).map(Some)
}

/// The health entry that says whether writes commit: NOT_SERVING while the
/// disk is full or the store's file is locked by another process (reads,
/// and so `""` and `agsync.v1.SyncService`, stay SERVING).
pub const WRITES_HEALTH: &str = "agsync.writes";

/// Sets the health of agsync's service and of the server as a whole (the
/// empty service name, which load balancers and Kubernetes probes check by
/// default) together.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    if serving {
        health.set_serving::<SyncServiceServer<Service>>().await;
    } else {
        health.set_not_serving::<SyncServiceServer<Service>>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_mode_only_on_loopback_unless_insecure_open() {
        let mut config = Config::for_path("unused.db");
        let public: std::net::SocketAddr = "192.0.2.10:50051".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:50051".parse().unwrap();
        assert!(load_auth(&config, loopback).unwrap().is_open());
        let err = load_auth(&config, public).unwrap_err().to_string();
        assert!(
            err.contains("refusing to serve 192.0.2.10:50051 without authentication"),
            "{err}"
        );
        config.insecure_open = true;
        assert!(load_auth(&config, public).unwrap().is_open());
        config.auth = Some("/nonexistent/auth.toml".into());
        let err = load_auth(&config, public).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/auth.toml"), "{err}");
    }
}
