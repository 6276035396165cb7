//! Test harness: a real server on an ephemeral loopback port with a temp
//! SQLite file (or, in the PostgreSQL run, a fresh PostgreSQL database, see
//! `pg.rs`), driven through the generated tonic client. `TestServer` runs
//! the server in-process (fast, restartable on the same file); `ProcessServer`
//! runs the real binary so a test can SIGKILL it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agsync::config::Config;
use agsync::pb::sync_service_client::SyncServiceClient;
use agsync::pb::{self, PutRequest};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Client = SyncServiceClient<Channel>;

pub struct TestServer {
    pub addr: SocketAddr,
    pub client: Client,
    config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<agsync::domain::Result<()>>>,
    // Dropped last: the database file lives here.
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_path(dir.path().join("agsync.db"));
        configure(&mut config);
        if crate::POSTGRES
            && let Some(path) = config.db.sqlite_path()
        {
            config.db = crate::pg::url_for(path).await.into();
        }
        let (addr, shutdown, task) = spawn(config.clone()).await;
        TestServer {
            addr,
            client: connect(addr).await,
            config,
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Graceful shutdown, waiting for the server (and its store) to close.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops within 30 s")
                .expect("server task panicked")
                .expect("server run failed");
        }
    }

    /// Stops the server and starts a new one on the same database file.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (addr, shutdown, task) = spawn(self.config.clone()).await;
        self.addr = addr;
        self.client = connect(addr).await;
        self.shutdown = Some(shutdown);
        self.task = Some(task);
    }

    pub async fn channel(&self) -> Channel {
        channel(self.addr).await
    }

    /// The server's database file.
    pub fn db_path(&self) -> std::path::PathBuf {
        self.config
            .db
            .sqlite_path()
            .expect("a SQLite server")
            .to_path_buf()
    }

    /// Asks the server to shut down, without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn spawn(
    config: Config,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<agsync::domain::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agsync::server::run(config, listener, async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to server")
}

pub async fn connect(addr: SocketAddr) -> Client {
    SyncServiceClient::new(channel(addr).await)
}

/// The real binary, so a test can kill it with SIGKILL.
pub struct ProcessServer {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, with `--metrics-listen`.
    pub metrics_addr: Option<SocketAddr>,
    child: tokio::process::Child,
    /// The newest lines the server logged (see `logged`).
    log: Arc<ServerLog>,
}

/// The newest `ServerLog::KEEP` lines of a server's stderr, and a wake-up
/// for each new one.
#[derive(Default)]
struct ServerLog {
    lines: std::sync::Mutex<std::collections::VecDeque<String>>,
    added: tokio::sync::Notify,
}

impl ServerLog {
    const KEEP: usize = 10_000;

    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap();
        if lines.len() == Self::KEEP {
            lines.pop_front();
        }
        lines.push_back(line);
        drop(lines);
        self.added.notify_waiters();
    }

    /// How many lines so far contain `needle`.
    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl ProcessServer {
    pub async fn start(db: &Path) -> ProcessServer {
        Self::start_with(db, &[], None).await
    }

    /// With extra flags, and optionally a file-size limit (RLIMIT_FSIZE, with
    /// SIGXFSZ ignored so a write past it fails with EFBIG): a disk that
    /// fills up, which works even as root.
    pub async fn start_with(
        db: &Path,
        args: &[&str],
        max_file_bytes: Option<u64>,
    ) -> ProcessServer {
        let db = if crate::POSTGRES {
            std::path::PathBuf::from(crate::pg::url_for(db).await)
        } else {
            db.to_path_buf()
        };
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_agsync"));
        command
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(limit) = max_file_bytes {
            // SAFETY: between fork and exec only async-signal-safe calls
            // (signal, setrlimit) run, touching no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("spawn agsync");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let address = |line: &str| {
            let rest = line.split("address=").nth(1).expect("an address");
            let addr = rest.split_whitespace().next().expect("address value");
            addr.parse::<SocketAddr>().expect("socket address")
        };
        let (addr, metrics_addr) = tokio::time::timeout(Duration::from_secs(30), async {
            let mut metrics_addr = None;
            while let Some(line) = lines.next_line().await.expect("read stderr") {
                if line.contains("metrics listening") {
                    metrics_addr = Some(address(&line));
                } else if line.contains("agsync listening") {
                    return (address(&line), metrics_addr);
                }
            }
            panic!("agsync exited before listening");
        })
        .await
        .expect("agsync starts within 30 s");
        // Keep draining stderr so the child never blocks on a full pipe.
        let log = Arc::new(ServerLog::default());
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.push(line);
            }
        });
        ProcessServer {
            addr,
            metrics_addr,
            child,
            log,
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill agsync");
    }

    /// Sends a signal ("TERM", "HUP"...) with kill(1).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("pid");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Runs `action` (a signal, say), then waits (10 s at most) until the
    /// server logs one more line containing `needle` than it had before.
    pub async fn logs_after(&self, needle: &str, action: impl FnOnce()) {
        let before = self.log.count(needle);
        action();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let added = self.log.added.notified();
                if self.log.count(needle) > before {
                    return;
                }
                added.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the server did not log {needle:?} within 10 s"));
    }

    /// Waits for the process to exit by itself, at most `within`.
    pub async fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("agsync exits in time")
            .expect("wait")
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(30)).await
    }
}

/// A `google.protobuf.Struct` from a JSON object literal.
pub fn body(v: Value) -> prost_types::Struct {
    let Value::Object(map) = v else {
        panic!("body must be a JSON object")
    };
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, value(v))).collect(),
    }
}

fn value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().expect("number")),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(body(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `google.protobuf.Struct` back as JSON.
pub fn json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect(),
    )
}

fn json_value(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind.as_ref().expect("kind") {
        Kind::NullValue(_) => Value::Null,
        Kind::BoolValue(b) => Value::Bool(*b),
        // Integral numbers come back as integers, as the server stores them.
        Kind::NumberValue(n) if n.fract() == 0.0 && n.abs() < 9e15 => serde_json::json!(*n as i64),
        Kind::NumberValue(n) => serde_json::json!(n),
        Kind::StringValue(s) => Value::String(s.clone()),
        Kind::ListValue(l) => Value::Array(l.values.iter().map(json_value).collect()),
        Kind::StructValue(s) => json(s),
    }
}

pub async fn create_db(client: &mut Client, name: &str) -> pb::Database {
    client
        .create_database(pb::CreateDatabaseRequest {
            name: name.into(),
            sync_key: String::new(),
        })
        .await
        .expect("create database")
        .into_inner()
        .database
        .expect("database")
}

pub async fn put(
    client: &mut Client,
    db: &str,
    id: &str,
    rev: &str,
    b: Value,
) -> Result<pb::PutResponse, Status> {
    client
        .put(PutRequest {
            request_id: String::new(),
            database: db.into(),
            id: id.into(),
            rev: rev.into(),
            body: Some(body(b)),
            notify_aliases: vec![],
        })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn get(client: &mut Client, db: &str, id: &str) -> Result<pb::Document, Status> {
    client
        .get(pb::GetRequest {
            database: db.into(),
            id: id.into(),
        })
        .await
        .map(|r| r.into_inner().document.expect("document"))
}

/// Asserts the result failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not contain {needle:?}",
                s.message()
            );
        }
    }
}

/// The rich details of a conflict: the ErrorInfo and the current document.
pub struct ConflictDetails {
    pub info: tonic_types::ErrorInfo,
    pub current: Option<pb::Document>,
}

pub fn conflict_details(status: &Status) -> ConflictDetails {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), Code::Aborted, "{}", status.message());
    let info = status
        .get_details_error_info()
        .expect("an ErrorInfo in the details");
    let rich = tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status");
    let current = rich
        .details
        .iter()
        .find(|any| any.type_url == "type.googleapis.com/agsync.v1.Document")
        .map(|any| pb::Document::decode(any.value.as_slice()).expect("Document"));
    ConflictDetails { info, current }
}

pub fn generation(rev: &str) -> u64 {
    rev.split('-').next().unwrap().parse().unwrap()
}

pub type Events = tonic::Streaming<pb::SubscribeResponse>;

/// Opens a Subscribe stream.
pub async fn subscribe(
    client: &mut Client,
    keys: &[&str],
    since: Option<u64>,
    alias: &str,
) -> Result<Events, Status> {
    client
        .subscribe(pb::SubscribeRequest {
            sync_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            since,
            alias: alias.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next event of a stream, waiting at most 10 s.
pub async fn next_event(stream: &mut Events) -> pb::subscribe_response::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream not ended")
        .event
        .expect("event set")
}

/// The next event, which must be a notification.
pub async fn next_notification(stream: &mut Events) -> pb::Notification {
    match next_event(stream).await {
        pb::subscribe_response::Event::Notification(n) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// The next event, which must be `subscribed`; returns its head_seq.
pub async fn next_subscribed(stream: &mut Events) -> u64 {
    match next_event(stream).await {
        pb::subscribe_response::Event::Subscribed(s) => s.head_seq,
        other => panic!("expected subscribed, got {other:?}"),
    }
}

pub async fn notify(
    client: &mut Client,
    key: &str,
    aliases: &[&str],
    attrs: &[(&str, &str)],
) -> u64 {
    client
        .notify(pb::NotifyRequest {
            sync_key: key.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .await
        .expect("notify")
        .into_inner()
        .seq
}

/// A request carrying `authorization: Bearer <token>` (or the raw value given).
pub fn with_token<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii metadata"));
    }
    request
}

/// Ends a test that checks SQLite's own files or limits when the suite runs
/// against PostgreSQL.
#[macro_export]
macro_rules! sqlite_only {
    () => {
        if $crate::POSTGRES {
            return;
        }
    };
}

/// A self-signed certificate for "localhost", written as `cert.pem` and
/// `key.pem` into `dir`, for a server's `--tls-cert` and `--tls-key`.
pub fn self_signed_tls(
    dir: &Path,
) -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert, cert_path, key_path)
}

/// Every change of `database`, from the start, paged with `last_seq` until
/// an empty page.
pub async fn all_changes(client: &Client, database: &str) -> Vec<pb::Change> {
    changes_after(client, database, 0, false).await
}

/// Every change of `database` after `since` (with bodies if
/// `include_docs`), paged with `last_seq` until an empty page.
pub async fn changes_after(
    client: &Client,
    database: &str,
    mut since: u64,
    include_docs: bool,
) -> Vec<pb::Change> {
    let mut all = Vec::new();
    loop {
        let page = client
            .clone()
            .changes(pb::ChangesRequest {
                database: database.into(),
                since,
                limit: 10_000,
                include_docs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.changes.is_empty() {
            return all;
        }
        all.extend(page.changes);
        since = page.last_seq;
    }
}

/// The seq of every change of `database` (see `all_changes`).
pub async fn all_change_seqs(client: &Client, database: &str) -> Vec<u64> {
    all_changes(client, database)
        .await
        .iter()
        .map(|c| c.seq)
        .collect()
}
