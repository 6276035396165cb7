//! The short workloads, and the helpers every workload driver shares
//! (connections, clients, `drive`, `Report`, preloading, subscriber
//! readers). Each workload sets up what it needs (untimed), then runs its
//! clients until the deadline, recording every operation's latency. `run`
//! dispatches to them; the long ones (`hostile`, `walsoak`) and the etcd
//! peer import from here, never the other way round.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agsync::pb::sync_service_client::SyncServiceClient;
use agsync::pb::{self, subscribe_response::Event};
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::Channel;

use crate::WorkloadArgs;

pub(crate) type Client = SyncServiceClient<Channel>;

/// The result of one run against one server.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub server: String,
    pub workload: String,
    pub run: usize,
    pub clients: usize,
    /// Successful operations (documents for bulk, events for replay).
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub conflicts: u64,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    /// Workload-specific figures (delivered/expected, RSS per subscriber...).
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub notes: Vec<String>,
    /// Why the run failed its own checks (delivery and order in soak,
    /// fanout, cross-node and replay; the bounds of wal-soak and hostile).
    pub failed: Vec<String>,
}

impl Report {
    pub fn json(&self) -> String {
        let mut v = serde_json::json!({
            "server": self.server,
            "workload": self.workload,
            "run": self.run,
            "clients": self.clients,
            "ops": self.ops,
            "ops_per_s": (self.ops_per_s * 10.0).round() / 10.0,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.errors,
            "conflicts": self.conflicts,
            "server_rss_start_kb": self.rss_start_kb,
            "server_rss_end_kb": self.rss_end_kb,
        });
        if let Some(obj) = v.as_object_mut() {
            obj.extend(self.extra.clone());
        }
        v.to_string()
    }

    /// Adds workload-specific figures to the JSON line.
    pub fn insert_extra<'a>(
        &mut self,
        pairs: impl IntoIterator<Item = (&'a str, serde_json::Value)>,
    ) {
        for (k, v) in pairs {
            self.extra.insert(k.to_owned(), v);
        }
    }

    /// The run with the median throughput.
    pub fn median(reports: &[&Report]) -> Report {
        Self::median_by(reports, |r| r.ops_per_s)
    }

    /// The run with the median p99 latency: for the workloads whose figure
    /// is a latency (fanout, cross-node), where throughput only says how
    /// many writes the writer got out.
    pub fn median_latency(reports: &[&Report]) -> Report {
        Self::median_by(reports, |r| r.p99_ms)
    }

    fn median_by(reports: &[&Report], key: fn(&Report) -> f64) -> Report {
        let mut sorted: Vec<&Report> = reports.to_vec();
        sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
        sorted
            .get(sorted.len() / 2)
            .map(|r| (*r).clone())
            .unwrap_or_default()
    }
}

/// What one operation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok(u64),
    Conflict,
    /// The server shed the request (UNAVAILABLE, RESOURCE_EXHAUSTED) and the
    /// client backs off and retries: only the hostile workload counts these
    /// apart from errors.
    Rejected,
    Error,
}

#[derive(Default)]
pub(crate) struct Totals {
    pub latencies_us: Vec<u32>,
    pub ops: u64,
    pub conflicts: u64,
    pub rejected: u64,
    pub errors: u64,
}

/// The `p` quantile (0..=1) of sorted microseconds, in milliseconds.
pub(crate) fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted_us[i]) / 1000.0
}

/// Microseconds for a latency vector (saturating: u32 holds 71 minutes).
pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Totals {
    fn merge(&mut self, other: Totals) {
        self.latencies_us.extend(other.latencies_us);
        self.ops += other.ops;
        self.conflicts += other.conflicts;
        self.rejected += other.rejected;
        self.errors += other.errors;
    }

    pub(crate) fn into_report(mut self, args: &WorkloadArgs, elapsed: Duration) -> Report {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| percentile_ms(&self.latencies_us, p);
        Report {
            workload: args.workload_name(),
            clients: args.clients,
            ops: self.ops,
            ops_per_s: self.ops as f64 / elapsed.as_secs_f64(),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            errors: self.errors,
            conflicts: self.conflicts,
            ..Default::default()
        }
    }
}

/// How long an operation may still run after the deadline before its client
/// gives up (counted as an error), so a stuck server cannot hang a run.
const OVERRUN: Duration = Duration::from_secs(60);

/// Runs `op` on every state concurrently until `duration` has passed.
pub(crate) async fn drive<S, F, Fut>(
    states: Vec<S>,
    duration: Duration,
    op: F,
) -> (Totals, Duration)
where
    S: Send + 'static,
    F: Fn(S, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (S, Outcome)> + Send,
{
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = states
        .into_iter()
        .map(|mut state| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut totals = Totals::default();
                let mut n = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let Ok((next, outcome)) =
                        tokio::time::timeout_at((deadline + OVERRUN).into(), op(state, n)).await
                    else {
                        totals.errors += 1;
                        break;
                    };
                    state = next;
                    n += 1;
                    totals.latencies_us.push(micros(t.elapsed()));
                    match outcome {
                        Outcome::Ok(k) => totals.ops += k,
                        Outcome::Conflict => totals.conflicts += 1,
                        Outcome::Rejected => totals.rejected += 1,
                        Outcome::Error => totals.errors += 1,
                    }
                }
                totals
            })
        })
        .collect();
    let mut all = Totals::default();
    for t in tasks {
        if let Ok(totals) = t.await {
            all.merge(totals);
        }
    }
    (all, start.elapsed())
}

pub(crate) fn rss_kb(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) async fn connections(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, String> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        out.push(channel);
    }
    Ok(out)
}

/// `n` clients spread round-robin over the channels, with no message size
/// limit either way.
pub(crate) fn clients(channels: &[Channel], n: usize) -> Vec<Client> {
    (0..n)
        .map(|i| {
            SyncServiceClient::new(channels[i % channels.len()].clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)
        })
        .collect()
}

/// A small document, about 120 bytes of JSON.
pub(crate) fn body(n: u64) -> prost_types::Struct {
    use prost_types::value::Kind;
    let v = |k: Kind| prost_types::Value { kind: Some(k) };
    prost_types::Struct {
        fields: [
            ("model".to_owned(), v(Kind::StringValue("Mustang".into()))),
            ("year".to_owned(), v(Kind::NumberValue(1969.0))),
            ("n".to_owned(), v(Kind::NumberValue(n as f64))),
            ("pad".to_owned(), v(Kind::StringValue("x".repeat(64)))),
        ]
        .into(),
    }
}

pub(crate) fn put_request(db: &str, id: String, rev: String, n: u64) -> pb::PutRequest {
    pb::PutRequest {
        database: db.into(),
        id,
        rev,
        body: Some(body(n)),
        ..Default::default()
    }
}

pub(crate) async fn create_database(c: &mut Client, name: &str, key: &str) -> Result<(), String> {
    match c
        .create_database(pb::CreateDatabaseRequest {
            name: name.into(),
            sync_key: key.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(format!("CreateDatabase: {s}")),
    }
}

/// Runs `job` on consecutive chunks of `0..n`, `chunk` indices at a time,
/// on all `clients` in parallel (each takes the next chunk when done).
pub(crate) async fn in_chunks<F, Fut>(
    clients: &[Client],
    n: usize,
    chunk: usize,
    job: F,
) -> Result<(), String>
where
    F: Fn(Client, std::ops::Range<usize>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let chunk = chunk.max(1);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in clients {
        let (c, next, job) = (c.clone(), next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), String>(());
                }
                job(c.clone(), start..(start + chunk).min(n)).await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Fills `db` with documents p0..p{n-1} in parallel BulkPuts; returns their revs.
pub(crate) async fn preload(clients: &[Client], db: &str, n: usize) -> Result<Vec<String>, String> {
    preload_bodies(clients, db, n, 1000, body).await
}

/// Fills `db` with documents p0..p{n-1}, `make(i)` being p{i}'s body, in
/// BulkPuts of `chunk` documents over up to 8 clients; returns their revs.
pub(crate) async fn preload_bodies(
    clients: &[Client],
    db: &str,
    n: usize,
    chunk: usize,
    make: fn(u64) -> prost_types::Struct,
) -> Result<Vec<String>, String> {
    let revs = Arc::new(Mutex::new(vec![String::new(); n]));
    let (r, db) = (revs.clone(), db.to_owned());
    let writers = &clients[..clients.len().min(8)];
    in_chunks(writers, n, chunk, move |mut c, range| {
        let (revs, db) = (r.clone(), db.clone());
        async move {
            let docs = range
                .clone()
                .map(|i| pb::BulkPutItem {
                    id: format!("p{i}"),
                    body: Some(make(i as u64)),
                    ..Default::default()
                })
                .collect();
            let results = c
                .bulk_put(pb::BulkPutRequest {
                    database: db,
                    docs,
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("preload BulkPut: {s}"))?
                .into_inner()
                .results;
            let mut revs = revs.lock().await;
            for (i, r) in range.zip(results) {
                if !r.error.is_empty() {
                    return Err(format!("preload p{i}: {} {}", r.error, r.reason));
                }
                revs[i] = r.rev;
            }
            Ok(())
        }
    })
    .await?;
    let revs = revs.lock().await.clone();
    Ok(revs)
}

/// Whether `c` talks to the no-op server: it lists no databases, even after
/// `run` created one.
pub(crate) async fn is_noop(c: &mut Client) -> Result<bool, String> {
    let listed = c
        .list_databases(pb::ListDatabasesRequest::default())
        .await
        .map_err(|s| format!("ListDatabases: {s}"))?;
    Ok(listed.into_inner().databases.is_empty())
}

/// Whether the server shed the request and asks to be called again later.
pub(crate) fn is_rejection(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted)
}

/// Sleeps 50-200 ms, varied by `seed`, before retrying a rejected call.
pub(crate) async fn back_off(seed: &mut u64) {
    tokio::time::sleep(Duration::from_millis(50 + xorshift(seed) % 151)).await;
}

/// Calls `sample` every `period` on its own task until `finish` (or until
/// `bound` has passed, so a forgotten sampler cannot run forever).
pub(crate) struct Sampler<T> {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<T>>,
}

impl<T: Send + 'static> Sampler<T> {
    pub(crate) fn spawn(
        period: Duration,
        bound: Duration,
        mut sample: impl FnMut() -> T + Send + 'static,
    ) -> Sampler<T> {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let end = Instant::now() + bound;
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < end {
                tokio::select! {
                    _ = tick.tick() => samples.push(sample()),
                    _ = &mut stopped => break,
                }
            }
            samples
        });
        Sampler { stop, task }
    }

    /// Stops sampling; returns the samples in time order.
    pub(crate) async fn finish(self) -> Vec<T> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

pub(crate) fn outcome<T>(r: Result<T, tonic::Status>, ok: u64) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok(ok),
        Err(s) if s.code() == Code::Aborted => Outcome::Conflict,
        Err(_) => Outcome::Error,
    }
}

/// The current rev carried in a conflict's ErrorInfo.
fn current_rev(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("current_rev").cloned())
}

/// A small fast generator for picking documents (not for secrets).
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Each client CAS-updates 16 documents of its own, carrying the last rev.
/// With `--docs`, they are spread over that many preloaded documents.
pub(crate) async fn update(
    args: &WorkloadArgs,
    pid: Option<u32>,
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    let (states, n_docs) = own_docs(all, args.docs).await?;
    let rss = rss_kb(pid);
    let (totals, elapsed) = drive(states, duration, |(mut c, mut docs), n| async move {
        let out = update_once(&mut c, "bench", &mut docs, n).await;
        ((c, docs), out)
    })
    .await;
    let mut r = totals.into_report(args, elapsed);
    r.rss_start_kb = rss;
    r.extra.insert("docs".into(), n_docs.into());
    Ok(r)
}

/// A client and the (id, last rev) of the documents it alone updates.
pub(crate) type Owner = (Client, Vec<(String, String)>);

/// Preloads `docs` documents of "bench" (at least 16 per client) and gives
/// each client 16 of its own, spread evenly; returns them and the count.
pub(crate) async fn own_docs(all: Vec<Client>, docs: usize) -> Result<(Vec<Owner>, usize), String> {
    let (n_docs, owned) = own_layout(all.len(), docs);
    let revs = preload(&all, "bench", n_docs).await?;
    let owners = all
        .into_iter()
        .zip(owned)
        .map(|(c, own)| {
            let docs = own
                .into_iter()
                .map(|i| (format!("p{i}"), revs[i].clone()))
                .collect();
            (c, docs)
        })
        .collect();
    Ok((owners, n_docs))
}

/// The documents to preload for `clients` updaters (`docs`, at least 16
/// per client) and the indices each client alone updates: 16, spread evenly
/// over them. The etcd peer updates the same layout of keys.
pub(crate) fn own_layout(clients: usize, docs: usize) -> (usize, Vec<Vec<usize>>) {
    const OWN: usize = 16;
    let clients = clients.max(1);
    let n_docs = docs.max(clients * OWN);
    let stride = n_docs / (clients * OWN);
    let owned = (0..clients)
        .map(|k| (0..OWN).map(|j| (k * OWN + j) * stride).collect())
        .collect();
    (n_docs, owned)
}

/// Puts a new document `id` into "bench".
pub(crate) async fn create_once(c: &mut Client, id: String, n: u64) -> Outcome {
    outcome(c.put(put_request("bench", id, String::new(), n)).await, 1)
}

/// CAS-updates document `n % docs.len()` of `db` with its last known rev,
/// keeping the new rev (or, on a conflict, the current one).
pub(crate) async fn update_once(
    c: &mut Client,
    db: &str,
    docs: &mut [(String, String)],
    n: u64,
) -> Outcome {
    let j = (n as usize) % docs.len();
    let (id, rev) = docs[j].clone();
    match c.put(put_request(db, id, rev, n)).await {
        Ok(resp) => {
            docs[j].1 = resp.into_inner().rev;
            Outcome::Ok(1)
        }
        Err(s) if s.code() == Code::Aborted => {
            if let Some(cur) = current_rev(&s) {
                docs[j].1 = cur;
            }
            Outcome::Conflict
        }
        Err(_) => Outcome::Error,
    }
}

/// All clients CAS-update the same 10 documents, each in a retry loop: on a
/// conflict the client takes the current rev from the error details (no
/// extra read) and retries the same document; after a success it moves on.
pub(crate) async fn contended(
    args: &WorkloadArgs,
    pid: Option<u32>,
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    const HOT: usize = 10;
    let revs = preload(&all, "bench", HOT).await?;
    // (client, known revs, the document it is working on)
    let states: Vec<(Client, Vec<String>, usize)> = all
        .into_iter()
        .enumerate()
        .map(|(k, c)| (c, revs.clone(), k % HOT))
        .collect();
    let rss = rss_kb(pid);
    let (totals, elapsed) = drive(states, duration, |(mut c, mut revs, mut j), n| async move {
        let r = c
            .put(put_request("bench", format!("p{j}"), revs[j].clone(), n))
            .await;
        let out = match r {
            Ok(resp) => {
                revs[j] = resp.into_inner().rev;
                j = (j + 1) % HOT;
                Outcome::Ok(1)
            }
            Err(s) if s.code() == Code::Aborted => {
                if let Some(cur) = current_rev(&s) {
                    revs[j] = cur;
                }
                Outcome::Conflict
            }
            Err(_) => Outcome::Error,
        };
        ((c, revs, j), out)
    })
    .await;
    let mut r = totals.into_report(args, elapsed);
    r.rss_start_kb = rss;
    contended_notes(&mut r, elapsed);
    Ok(r)
}

/// Adds the calls and conflicts per second of a contended run.
pub(crate) fn contended_notes(r: &mut Report, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    let calls = (r.ops + r.conflicts) as f64 / secs;
    r.extra.insert(
        "conflicts_per_s".into(),
        (r.conflicts as f64 / secs).round().into(),
    );
    r.extra.insert("calls_per_s".into(), calls.round().into());
    r.notes.push(format!(
        "ops are successful updates; {calls:.0} calls/s in all, {:.0} conflicts/s",
        r.conflicts as f64 / secs
    ));
}

/// How many streams the bench opens at once (each waits for its first
/// event): opening 100,000 one after another would measure round trips.
pub(crate) const OPENING_AT_ONCE: usize = 256;

/// Opens `count` subscriptions on `key` spread over the channels, up to
/// `OPENING_AT_ONCE` at a time, and waits for each one's `subscribed`.
async fn open_subscribers(
    channels: &[Channel],
    key: &str,
    count: usize,
) -> Result<Vec<tonic::Streaming<pb::SubscribeResponse>>, String> {
    use futures_util::{StreamExt, TryStreamExt};
    futures_util::stream::iter(clients(channels, count))
        .map(|mut c| async move {
            let mut s = c
                .subscribe(pb::SubscribeRequest {
                    sync_keys: vec![key.into()],
                    since: None,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("Subscribe: {e}"))?
                .into_inner();
            match tokio::time::timeout(Duration::from_secs(60), s.message()).await {
                Ok(Ok(Some(_))) => Ok(s),
                other => Err(format!("no subscribed event: {other:?}")),
            }
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .try_collect()
        .await
}

/// `--subscribers` on one key, one writer doing a Put every `--interval-ms`:
/// latency from just before the Put to each subscriber's receipt.
pub(crate) async fn fanout(
    addr: SocketAddr,
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    let idle_rss = rss_kb(pid);
    let opening = Instant::now();
    let all_channels = stream_channels(
        addr,
        channels,
        args.subscribers(),
        args.streams_per_connection,
    )
    .await?;
    let listening = args.listening();
    let streams = open_subscribers(&all_channels, "bench.key", listening).await?;
    // The rest listen to a key nobody writes; held open until the end.
    let _idle = open_subscribers(
        &all_channels[listening % all_channels.len()..],
        "bench.idle",
        args.subscribers() - listening,
    )
    .await?;
    let open_secs = opening.elapsed().as_secs_f64();
    let subscribed_rss = rss_kb(pid);
    let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(30);
    let (last_tx, receivers) = spawn_readers(streams, deadline, Vec::new, |got, seq| {
        got.push((seq, Instant::now()));
    });
    let mut writer = all[0].clone();
    let start = Instant::now();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut put_latencies = Vec::new();
    let mut n = 0u64;
    let mut errors = 0;
    while start.elapsed() < duration {
        let t = Instant::now();
        match writer
            .put(put_request("bench", format!("f{n}"), String::new(), n))
            .await
        {
            Ok(r) => {
                sent.insert(r.into_inner().seq, t);
                put_latencies.push(micros(t.elapsed()));
            }
            Err(_) => errors += 1,
        }
        n += 1;
        tokio::time::sleep_until((t + Duration::from_millis(args.interval_ms)).into()).await;
    }
    let _ = last_tx.send(sent.keys().copied().max().unwrap_or(0));
    let mut latencies = Vec::new();
    let mut delivered = 0u64;
    for r in receivers {
        for (seq, at) in r.await.map_err(|e| e.to_string())? {
            if let Some(t0) = sent.get(&seq) {
                delivered += 1;
                latencies.push(micros(at.duration_since(*t0)));
            }
        }
    }
    let expected = sent.len() as u64 * listening as u64;
    let is_noop = expected > 0 && delivered == 0;
    let totals = Totals {
        latencies_us: if is_noop { put_latencies } else { latencies },
        ops: if is_noop {
            sent.len() as u64
        } else {
            delivered
        },
        errors,
        ..Default::default()
    };
    let mut r = totals.into_report(args, duration);
    r.clients = args.subscribers();
    r.rss_start_kb = idle_rss;
    r.insert_extra([
        ("delivered", serde_json::Value::from(delivered)),
        ("expected", expected.into()),
    ]);
    fanout_notes(
        &mut r,
        args.subscribers(),
        open_secs,
        idle_rss,
        subscribed_rss,
    );
    listening_note(&mut r, listening, args.subscribers());
    if is_noop {
        r.notes
            .push("no-op server delivers nothing: latency is its Put round trip".into());
    } else {
        fanout_delivery(&mut r, "fanout", delivered, expected);
    }
    Ok(r)
}

/// Notes how many of the expected notifications a fan-out delivered, and
/// fails the run (`label` names it) unless it is all of them.
pub(crate) fn fanout_delivery(r: &mut Report, label: &str, delivered: u64, expected: u64) {
    r.notes.push(format!(
        "delivered {delivered}/{expected}; latency from before the Put to receipt"
    ));
    if delivered != expected {
        r.failed.push(format!(
            "{label} delivered {delivered} of {expected} notifications"
        ));
    }
}

/// Notes how many of the subscribers listened to the key written.
pub(crate) fn listening_note(r: &mut Report, listening: usize, subscribers: usize) {
    if listening < subscribers {
        r.notes.push(format!(
            "{listening} of the {subscribers} streams listen to the key written; the others to a key nobody writes"
        ));
        r.extra.insert("listening".into(), listening.into());
    }
}

/// Records a fan-out's server RSS idle and with its subscribers open.
pub(crate) fn fanout_notes(
    r: &mut Report,
    subscribers: usize,
    open_secs: f64,
    idle_rss: u64,
    subscribed_rss: u64,
) {
    let per_sub = subscribed_rss.saturating_sub(idle_rss) as f64 / subscribers.max(1) as f64;
    r.insert_extra([
        ("subscribers", serde_json::Value::from(subscribers)),
        ("open_secs", ((open_secs * 100.0).round() / 100.0).into()),
        ("idle_rss_kb", idle_rss.into()),
        ("subscribed_rss_kb", subscribed_rss.into()),
        (
            "rss_per_subscriber_kb",
            ((per_sub * 10.0).round() / 10.0).into(),
        ),
    ]);
    r.notes.push(format!(
        "{subscribers} streams opened in {open_secs:.1} s; RSS {:.1} MB idle, {:.1} MB with them ({per_sub:.1} KB each)",
        idle_rss as f64 / 1024.0,
        subscribed_rss as f64 / 1024.0,
    ));
}

/// Puts at a fixed `--rate` from `--clients` writers on the first node, and
/// one subscriber on the last node (the other node when there are two):
/// latency from just before each Put to the subscriber's receipt of its
/// notification. Open loop: the writes keep their schedule whatever the
/// latency, up to `--clients` in flight.
pub(crate) async fn cross_node(
    addrs: &[SocketAddr],
    args: &WorkloadArgs,
    pid: Option<u32>,
    duration: Duration,
) -> Result<Report, String> {
    let listener = connections(*addrs.last().ok_or("no server address")?, 1).await?;
    let streams = open_subscribers(&listener, "bench.key", 1).await?;
    let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(30);
    let (last_tx, receivers) = spawn_readers(streams, deadline, Vec::new, |got, seq| {
        got.push((seq, Instant::now()));
    });
    let in_flight = args.clients.max(1);
    let writers = clients(&connections(addrs[0], args.connections).await?, in_flight);
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    // (seq, just before the Put, its round trip)
    let sent = Arc::new(std::sync::Mutex::new(Vec::<(u64, Instant, u32)>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rate = args.rate.max(1);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rss = rss_kb(pid);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        ticker.tick().await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = writers[n as usize % writers.len()].clone();
        let (sent, errors) = (sent.clone(), errors.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            match c
                .put(put_request("bench", format!("x{n}"), String::new(), n))
                .await
            {
                Ok(r) => {
                    let round_trip = micros(t.elapsed());
                    sent.lock()
                        .unwrap()
                        .push((r.into_inner().seq, t, round_trip));
                }
                Err(_) => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        n += 1;
    }
    let writing = start.elapsed();
    let _all_done = permits
        .acquire_many(u32::try_from(in_flight).unwrap_or(u32::MAX))
        .await
        .map_err(|e| e.to_string())?;
    let sent: HashMap<u64, (Instant, u32)> = std::mem::take(&mut *sent.lock().unwrap())
        .into_iter()
        .map(|(seq, t, round_trip)| (seq, (t, round_trip)))
        .collect();
    let _ = last_tx.send(sent.keys().copied().max().unwrap_or(0));
    let mut latencies = Vec::new();
    for r in receivers {
        for (seq, at) in r.await.map_err(|e| e.to_string())? {
            if let Some((t0, _)) = sent.get(&seq) {
                latencies.push(micros(at.duration_since(*t0)));
            }
        }
    }
    let delivered = latencies.len() as u64;
    // The no-op server delivers nothing: its figure is the Put round trip.
    let is_noop = !sent.is_empty() && delivered == 0;
    let put_latencies = sent.values().map(|(_, round_trip)| *round_trip).collect();
    let totals = Totals {
        latencies_us: if is_noop { put_latencies } else { latencies },
        ops: if is_noop {
            sent.len() as u64
        } else {
            delivered
        },
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        ..Default::default()
    };
    let mut r = totals.into_report(args, writing);
    r.rss_start_kb = rss;
    let achieved = sent.len() as f64 / writing.as_secs_f64();
    r.insert_extra([
        ("nodes", serde_json::Value::from(addrs.len())),
        ("target_writes_per_s", rate.into()),
        ("writes_per_s", ((achieved * 10.0).round() / 10.0).into()),
        ("delivered", delivered.into()),
        ("acknowledged", (sent.len() as u64).into()),
    ]);
    r.notes.push(format!(
        "{achieved:.0} writes/s (target {rate}) on node 1, subscriber on node {}; latency from before the Put to receipt",
        addrs.len()
    ));
    if !is_noop && delivered != sent.len() as u64 {
        r.failed.push(format!(
            "cross-node delivered {delivered} of {} acknowledged writes",
            sent.len()
        ));
    }
    Ok(r)
}

/// `count` subscriptions to the bench key, at most 250 streams per
/// connection (opening more connections than `channels` if needed).
async fn subscribe_all(
    addr: SocketAddr,
    channels: &[Channel],
    count: usize,
    per_connection: usize,
) -> Result<Vec<tonic::Streaming<pb::SubscribeResponse>>, String> {
    let all = stream_channels(addr, channels, count, per_connection).await?;
    open_subscribers(&all, "bench.key", count).await
}

/// `channels` plus as many new connections as `count` streams spread
/// round-robin need to stay within `per_connection` each
/// (`--streams-per-connection`).
pub(crate) async fn stream_channels(
    addr: SocketAddr,
    channels: &[Channel],
    count: usize,
    per_connection: usize,
) -> Result<Vec<Channel>, String> {
    let want = count.div_ceil(per_connection.max(1)).max(1);
    let mut all = channels.to_vec();
    if want > all.len() {
        all.extend(connections(addr, want - all.len()).await?);
    }
    Ok(all)
}

/// One reader task per stream: each folds every notification's seq into its
/// state with `on` until it has seen the last seq (send it on the returned
/// watch once the writers are done) or `deadline` passes.
fn spawn_readers<S: Send + 'static>(
    streams: Vec<tonic::Streaming<pb::SubscribeResponse>>,
    deadline: tokio::time::Instant,
    init: impl Fn() -> S,
    on: fn(&mut S, u64),
) -> (
    tokio::sync::watch::Sender<u64>,
    Vec<tokio::task::JoinHandle<S>>,
) {
    let (last_tx, last_rx) = tokio::sync::watch::channel(u64::MAX);
    let readers = streams
        .into_iter()
        .map(|stream| {
            let last_rx = last_rx.clone();
            let mut state = init();
            tokio::spawn(async move {
                read_until_last(stream, last_rx, deadline, |seq| on(&mut state, seq)).await;
                state
            })
        })
        .collect();
    (last_tx, readers)
}

/// Reads a stream's notifications until it has seen `last` (sent on
/// `last_rx` once the writers are done) or `deadline` passes; calls `on`
/// with each notification's seq.
async fn read_until_last(
    mut stream: tonic::Streaming<pb::SubscribeResponse>,
    mut last_rx: tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    mut on: impl FnMut(u64),
) {
    let mut seen = 0u64;
    loop {
        if seen >= *last_rx.borrow() {
            return;
        }
        tokio::select! {
            msg = tokio::time::timeout_at(deadline, stream.message()) => match msg {
                Ok(Ok(Some(pb::SubscribeResponse { event: Some(Event::Notification(n)), .. }))) => {
                    seen = n.seq;
                    on(n.seq);
                }
                Ok(Ok(Some(_))) => {}
                _ => return,
            },
            changed = last_rx.changed() => if changed.is_err() { return },
        }
    }
}

/// One subscriber replays `--events` logged events from since=0.
pub(crate) async fn replay(
    args: &WorkloadArgs,
    pid: Option<u32>,
    all: Vec<Client>,
) -> Result<Report, String> {
    let mut c = all[0].clone();
    create_database(&mut c, "replay", "replay.key").await?;
    let revs = preload(&all, "replay", args.events()).await?;
    let expected = revs.len() as u64;
    let rss = rss_kb(pid);
    let start = Instant::now();
    let mut s = c
        .subscribe(pb::SubscribeRequest {
            sync_keys: vec!["replay.key".into()],
            since: Some(0),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("Subscribe: {e}"))?
        .into_inner();
    let mut got = 0u64;
    let mut last = 0;
    let mut in_order = true;
    while let Ok(Some(msg)) = s.message().await {
        match msg.event {
            Some(Event::Notification(n)) => {
                in_order &= n.seq > last;
                last = n.seq;
                got += 1;
            }
            Some(Event::Subscribed(_)) | None => break,
            Some(Event::Progress(_)) => {}
        }
    }
    let elapsed = start.elapsed();
    let mut r = Totals {
        ops: got,
        ..Default::default()
    }
    .into_report(args, elapsed);
    r.clients = 1;
    r.rss_start_kb = rss;
    r.extra.insert("events".into(), expected.into());
    r.extra.insert("replayed".into(), got.into());
    if got == 0 {
        r.notes.push("no-op server replays nothing".into());
    } else if got != expected || !in_order {
        r.failed.push(format!(
            "replayed {got} of {expected} events (in order: {in_order})"
        ));
    }
    Ok(r)
}

/// Writers and subscribers together for the whole duration. Fails on any
/// error but a conflict, or any event a subscriber did not receive in order.
pub(crate) async fn soak(
    addr: SocketAddr,
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let streams = subscribe_all(
        addr,
        channels,
        args.subscribers(),
        args.streams_per_connection,
    )
    .await?;
    let rss_start = rss_kb(pid);
    let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(60);
    // Per stream: (received, last seq, all in order).
    let (last_tx, receivers) = spawn_readers(
        streams,
        deadline,
        || (0u64, 0u64, true),
        |(got, prev, ordered), seq| {
            *ordered &= seq > *prev;
            *prev = seq;
            *got += 1;
        },
    );
    // Writers: each creates a document, then CAS-updates it 4 times.
    let states: Vec<(Client, usize, String)> = all
        .into_iter()
        .enumerate()
        .map(|(k, c)| (c, k, String::new()))
        .collect();
    let max_seq = Arc::new(AtomicU64::new(0));
    let m = max_seq.clone();
    let (totals, elapsed) = drive(states, duration, move |(mut c, k, rev), n| {
        let m = m.clone();
        async move {
            let (id, rev) = if n % 5 == 0 || rev.is_empty() {
                (format!("s{k}-{n}"), String::new())
            } else {
                (format!("s{k}-{}", n - n % 5), rev)
            };
            match c.put(put_request("bench", id, rev, n)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    m.fetch_max(r.seq, Ordering::AcqRel);
                    ((c, k, r.rev), Outcome::Ok(1))
                }
                Err(s) if s.code() == Code::Aborted => ((c, k, String::new()), Outcome::Conflict),
                Err(_) => ((c, k, String::new()), Outcome::Error),
            }
        }
    })
    .await;
    let _ = last_tx.send(max_seq.load(Ordering::Acquire));
    let (mut delivered, mut all_ordered) = (0, true);
    for r in receivers {
        let (got, _, ordered) = r.await.map_err(|e| e.to_string())?;
        delivered += got;
        all_ordered &= ordered;
    }
    let expected = totals.ops * args.subscribers() as u64;
    let rss_end = rss_kb(pid);
    let mut r = totals.into_report(args, elapsed);
    r.rss_start_kb = rss_start;
    for (k, v) in [
        ("subscribers", serde_json::Value::from(args.subscribers())),
        ("delivered", delivered.into()),
        ("expected", expected.into()),
    ] {
        r.extra.insert(k.into(), v);
    }
    r.notes.push(format!(
        "{} writers, {} subscribers: delivered {delivered}/{expected} notifications; server RSS {:.1} MB at start, {:.1} MB at end",
        args.clients,
        args.subscribers(),
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    ));
    if r.errors > 0 {
        r.failed
            .push(format!("{} errors other than conflicts", r.errors));
    }
    if delivered != expected || !all_ordered {
        r.failed.push(format!(
            "delivered {delivered} of {expected} notifications (in order: {all_ordered})"
        ));
    }
    Ok(r)
}
