//! TLS to PostgreSQL: the `--db` URL takes libpq's `sslmode` and
//! `sslrootcert`. Against a throwaway cluster with `ssl = on` and a CA made
//! here: verify-full with the right CA serves; a wrong CA, or `require`
//! against a server without TLS, exits non-zero within 15 s naming TLS and
//! the certificate.

use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use sqlx::Connection;

use crate::helpers::*;
use crate::pg::{OwnCluster, ServerTls};

/// A CA, and a server certificate for 127.0.0.1 and localhost signed by it.
fn ca_and_server() -> (String, ServerTls) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        ServerTls {
            cert_pem: server.pem(),
            key_pem: server_key.serialize_pem(),
        },
    )
}

/// Starts agsync on `url` and returns its exit within 20 s, with stderr;
/// None if it is still running (serving).
fn run_until_exit(url: &str) -> (Option<std::process::ExitStatus>, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agsync"))
        .args(["--listen", "127.0.0.1:0", "--db", url])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read_to_string(&log).unwrap(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgresql_verifies_the_server() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        eprintln!(
            "TLS test skipped: it needs a cluster of its own (AGSYNC_TEST_POSTGRES_URL is set)"
        );
        return;
    }
    let (ca_pem, server_tls) = ca_and_server();
    let cluster =
        OwnCluster::start_with_tls(Some(&server_tls)).unwrap_or_else(|why| crate::pg::skip(&why));
    let mut admin = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    sqlx::Executor::execute(&mut admin, "CREATE DATABASE agsync")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let (wrong_ca_pem, _) = ca_and_server();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, &wrong_ca_pem).unwrap();
    let with = |mode: &str, root: &std::path::Path| {
        format!(
            "{}?sslmode={mode}&sslrootcert={}",
            cluster.url("agsync"),
            root.display()
        )
    };

    // verify-full with the right CA: the node serves, over TLS.
    let url = with("verify-full", &ca);
    let node = TestServer::start_with(move |c| c.db = url.into()).await;
    let mut c = node.client.clone();
    create_db(&mut c, "db").await;
    put(&mut c, "db", "x", "", json!({})).await.unwrap();
    let encrypted: bool = sqlx::query_scalar(
        "SELECT bool_and(ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
         WHERE a.datname = 'agsync'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(encrypted, "a node's connection is not encrypted");

    // A wrong CA: a non-zero exit within 15 s naming TLS and the certificate.
    let (status, stderr, took) = run_until_exit(&with("verify-full", &wrong_ca));
    let status = status.expect("agsync exits when the certificate does not verify");
    assert!(!status.success());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(stderr.contains("TLS"), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains("password="), "{stderr}");
}

#[tokio::test]
async fn tls_required_against_a_server_without_it_is_refused() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        eprintln!(
            "TLS test skipped: it needs a cluster of its own (AGSYNC_TEST_POSTGRES_URL is set)"
        );
        return;
    }
    let cluster = OwnCluster::start().unwrap_or_else(|why| crate::pg::skip(&why));
    let url = format!("{}?sslmode=require", cluster.url("postgres"));
    let (status, stderr, took) = run_until_exit(&url);
    let status = status.expect("agsync exits when the server has no TLS");
    assert!(!status.success());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(stderr.contains("TLS"), "{stderr}");
}
