//! etcd as a peer: starts Debian's `etcd-server` (the `etcd` binary) on
//! loopback with a fresh data dir at its default durability (an fsync of
//! its WAL on every commit), and runs the workloads against it with the
//! closest semantics etcd's v3 API has:
//!
//! - create: a Put of a new key;
//! - update: a Txn that Puts if the key's `mod_revision` is the last one the
//!   client saw, else Ranges it (the current revision, same round trip);
//! - get: a Range (linearizable, etcd's default);
//! - contended: the update Txn on 10 shared keys;
//! - bulk: a Txn of `--batch` Puts of new keys (etcd allows 128 by default);
//! - fanout: `--subscribers` Watch streams on one key, a writer Putting it;
//! - replay: one Watch over a prefix from the first revision.
//!
//! The values are the same ~120-byte JSON documents the agsync runs store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::workloads::{
    Outcome, Report, Totals, connections, drive, micros, rss_kb, stream_channels, xorshift,
};
use crate::{Workload, WorkloadArgs};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::{
    self as epb, compare, kv_client::KvClient, request_op, response_op, watch_client::WatchClient,
    watch_request,
};

type Kv = KvClient<Channel>;
/// A client and the (key, last mod_revision) of the keys it alone updates.
type Owner = (Kv, Vec<(Vec<u8>, i64)>);
/// A Watch stream and the sender that keeps its request side open.
type Watcher = (
    mpsc::Sender<epb::WatchRequest>,
    tonic::Streaming<epb::WatchResponse>,
);

/// A running etcd, killed on drop (call `stop` to also wait for it).
pub struct Etcd {
    process: tokio::process::Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl Etcd {
    /// Starts `etcd` with its data in `dir/etcd` on two free loopback ports
    /// and waits until it answers a Range. Its log goes to `dir/etcd.log`,
    /// quoted when it exits or does not answer within 60 s. `max_txn_ops` is
    /// raised from etcd's 128 when a bulk Txn needs more.
    pub async fn start(dir: &Path, max_txn_ops: usize) -> Result<Etcd, String> {
        let [client, peer] = crate::free_ports::<2>()?;
        let data = dir.join("etcd");
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let (c, p) = (format!("http://{client}"), format!("http://{peer}"));
        let mut process = tokio::process::Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("bench={p}")])
            .args(["--initial-cluster-state", "new"])
            // Errors only (start-up failures included): warnings are logged
            // per slow request, which would cost etcd under load.
            .args(["--logger", "zap", "--log-level", "error"])
            .arg(format!("--max-txn-ops={}", max_txn_ops.max(128)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start etcd: {e}; install Debian's etcd-server \
                     (apt-get install etcd-server) or put `etcd` on PATH"
                )
            })?;
        let pid = process.id().ok_or("etcd has no pid")?;
        let tail = || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = process.try_wait() {
                return Err(format!(
                    "etcd exited ({status}) before answering:\n{}",
                    tail()
                ));
            }
            let ready = within(async {
                let ch = connections(client, 1).await?.pop().ok_or("no channel")?;
                KvClient::new(ch)
                    .range(range(b"ready".to_vec()))
                    .await
                    .map_err(|s| s.to_string())
            })
            .await;
            if ready.is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = process.kill().await;
                return Err(format!("etcd did not answer within 60 s:\n{}", tail()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Etcd {
            process,
            addr: client,
            pid,
        })
    }

    /// Kills etcd (SIGKILL to its pid) and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.process.kill().await;
    }
}

/// The workloads etcd has a counterpart for.
pub const WORKLOADS: &str = "create, update, get, contended, bulk, fanout and replay";

/// Whether etcd has a counterpart for `workload`.
pub fn runs(workload: Workload) -> bool {
    matches!(
        workload,
        Workload::Create
            | Workload::Update
            | Workload::Get
            | Workload::Contended
            | Workload::Bulk
            | Workload::Fanout
            | Workload::Replay
    )
}

/// How long one setup call may take before the bench gives up on etcd.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a setup call with `CALL_TIMEOUT`, so a stuck etcd cannot hang the
/// bench (the measured calls are bounded by `drive`).
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| format!("an etcd call took over {} s", CALL_TIMEOUT.as_secs()))?
}

/// The JSON bytes of the document the agsync runs store as document `n`.
fn value(n: u64) -> Vec<u8> {
    serde_json::json!({
        "model": "Mustang",
        "year": 1969,
        "n": n,
        "pad": "x".repeat(64),
    })
    .to_string()
    .into_bytes()
}

fn range(key: Vec<u8>) -> epb::RangeRequest {
    epb::RangeRequest {
        key,
        ..Default::default()
    }
}

fn put(key: Vec<u8>, n: u64) -> epb::PutRequest {
    epb::PutRequest {
        key,
        value: value(n),
        ..Default::default()
    }
}

/// Put `key` if its mod_revision is still `rev`, else Range it: etcd's
/// compare-and-swap, which returns the current revision in the same call.
fn cas(key: Vec<u8>, rev: i64, n: u64) -> epb::TxnRequest {
    epb::TxnRequest {
        compare: vec![epb::Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
            ..Default::default()
        }],
        success: vec![epb::RequestOp {
            request: Some(request_op::Request::RequestPut(put(key.clone(), n))),
        }],
        failure: vec![epb::RequestOp {
            request: Some(request_op::Request::RequestRange(range(key))),
        }],
    }
}

/// Runs `cas` on `rev`: Ok(true) and the new revision when it won,
/// Ok(false) and the current revision when another writer got there first.
async fn cas_once(c: &mut Kv, key: Vec<u8>, rev: &mut i64, n: u64) -> Outcome {
    let Ok(resp) = c.txn(cas(key, *rev, n)).await else {
        return Outcome::Error;
    };
    let resp = resp.into_inner();
    if resp.succeeded {
        *rev = resp.header.map_or(0, |h| h.revision);
        return Outcome::Ok(1);
    }
    let current = resp.responses.into_iter().find_map(|r| match r.response {
        Some(response_op::Response::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.mod_revision),
        _ => None,
    });
    match current {
        Some(cur) => {
            *rev = cur;
            Outcome::Conflict
        }
        None => Outcome::Error,
    }
}

/// Puts keys `{prefix}0..{prefix}{n-1}`, `chunk` to a call (one Put, or a
/// Txn of `chunk` Puts) with 64 calls in flight; returns each key's
/// mod_revision. The workloads load with one Put per key, as an
/// application writes: keys written by 100-Put Txns share one revision, and
/// etcd 3.4 served Ranges of them several times slower in a quick test
/// (BENCHMARKS.md), which would flatter agsync.
async fn preload(kvs: &[Kv], prefix: &str, n: usize, chunk: usize) -> Result<Vec<i64>, String> {
    let chunk = chunk.max(1);
    let calls = (0..n.div_ceil(chunk)).map(|k| {
        let mut c = kvs[k % kvs.len()].clone();
        let range = k * chunk..((k + 1) * chunk).min(n);
        let mut puts: Vec<epb::PutRequest> = range
            .clone()
            .map(|i| put(format!("{prefix}{i}").into_bytes(), i as u64))
            .collect();
        async move {
            let header = if puts.len() == 1 {
                let one = puts.pop().unwrap_or_default();
                c.put(one).await.map(|r| r.into_inner().header)
            } else {
                let success = puts
                    .into_iter()
                    .map(|p| epb::RequestOp {
                        request: Some(request_op::Request::RequestPut(p)),
                    })
                    .collect();
                c.txn(epb::TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().header)
            };
            let header = header.map_err(|s| format!("etcd preload: {s}"))?;
            Ok::<_, String>((range, header.map_or(0, |h| h.revision)))
        }
    });
    let calls = calls.map(within);
    let mut revs = vec![0; n];
    let mut done = futures_util::stream::iter(calls).buffer_unordered(64);
    while let Some(r) = done.next().await {
        let (range, rev) = r?;
        revs[range].fill(rev);
    }
    Ok(revs)
}

/// Runs the workload against the etcd at `addr` (pid `pid`, for its RSS).
pub async fn run(addr: SocketAddr, pid: u32, args: &WorkloadArgs) -> Result<Report, String> {
    let channels = connections(addr, args.connections).await?;
    let kvs: Vec<Kv> = (0..args.clients.max(1))
        .map(|i| {
            KvClient::new(channels[i % channels.len()].clone())
                .max_decoding_message_size(usize::MAX)
        })
        .collect();
    let duration = Duration::from_secs_f64(args.duration_secs);
    let pid = Some(pid);
    let rss = rss_kb(pid);
    let mut report = match args.workload {
        Workload::Create => {
            let states: Vec<(Kv, usize)> =
                kvs.into_iter().enumerate().map(|(k, c)| (c, k)).collect();
            let (totals, elapsed) = drive(states, duration, |(mut c, k), n| async move {
                let r = c.put(put(format!("c{k}-{n}").into_bytes(), n)).await;
                ((c, k), ok_or_error(r.is_ok(), 1))
            })
            .await;
            totals.into_report(args, elapsed)
        }
        Workload::Update => {
            let (n_docs, owned) = crate::workloads::own_layout(kvs.len(), args.docs);
            let revs = preload(&kvs, "p", n_docs, 1).await?;
            let rss = rss_kb(pid);
            let states: Vec<Owner> = kvs
                .into_iter()
                .zip(owned)
                .map(|(c, own)| {
                    let own = own
                        .into_iter()
                        .map(|i| (format!("p{i}").into_bytes(), revs[i]))
                        .collect();
                    (c, own)
                })
                .collect();
            let (totals, elapsed) = drive(states, duration, |(mut c, mut own), n| async move {
                let j = n as usize % own.len();
                let key = own[j].0.clone();
                let out = cas_once(&mut c, key, &mut own[j].1, n).await;
                ((c, own), out)
            })
            .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            r.extra.insert("docs".into(), n_docs.into());
            r
        }
        Workload::Get => {
            preload(&kvs, "p", args.docs, 1).await?;
            let rss = rss_kb(pid);
            let n_docs = args.docs.max(1) as u64;
            let states: Vec<(Kv, u64)> = kvs
                .into_iter()
                .enumerate()
                .map(|(k, c)| (c, 0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1)))
                .collect();
            let (totals, elapsed) =
                drive(states, duration, move |(mut c, mut seed), _| async move {
                    let key = format!("p{}", xorshift(&mut seed) % n_docs).into_bytes();
                    let found = match c.range(range(key)).await {
                        Ok(r) => r.into_inner().kvs.len() == 1,
                        Err(_) => false,
                    };
                    ((c, seed), ok_or_error(found, 1))
                })
                .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            r
        }
        Workload::Contended => {
            const HOT: usize = 10;
            let revs = preload(&kvs, "p", HOT, 1).await?;
            let rss = rss_kb(pid);
            let states: Vec<(Kv, Vec<i64>, usize)> = kvs
                .into_iter()
                .enumerate()
                .map(|(k, c)| (c, revs.clone(), k % HOT))
                .collect();
            let (totals, elapsed) =
                drive(states, duration, |(mut c, mut revs, mut j), n| async move {
                    let out = cas_once(&mut c, format!("p{j}").into_bytes(), &mut revs[j], n).await;
                    if out == Outcome::Ok(1) {
                        j = (j + 1) % HOT;
                    }
                    ((c, revs, j), out)
                })
                .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            crate::workloads::contended_notes(&mut r, elapsed);
            r
        }
        Workload::Bulk => {
            let batch = args.batch.max(1);
            let states: Vec<(Kv, usize)> =
                kvs.into_iter().enumerate().map(|(k, c)| (c, k)).collect();
            let (totals, elapsed) = drive(states, duration, move |(mut c, k), n| async move {
                let success = (0..batch)
                    .map(|i| epb::RequestOp {
                        request: Some(request_op::Request::RequestPut(put(
                            format!("b{k}-{n}-{i}").into_bytes(),
                            n,
                        ))),
                    })
                    .collect();
                let r = c
                    .txn(epb::TxnRequest {
                        success,
                        ..Default::default()
                    })
                    .await;
                ((c, k), ok_or_error(r.is_ok(), batch as u64))
            })
            .await;
            let mut r = totals.into_report(args, elapsed);
            r.notes
                .push(format!("ops are keys; latency is per Txn of {batch} Puts"));
            r
        }
        Workload::Fanout => fanout(addr, args, pid, &channels, kvs, duration).await?,
        Workload::Replay => replay(args, pid, &channels, &kvs).await?,
        _ => {
            return Err(format!(
                "etcd has no counterpart for {}: it runs {WORKLOADS}",
                args.workload_name()
            ));
        }
    };
    report.workload = args.workload_name();
    if report.rss_start_kb == 0 {
        report.rss_start_kb = rss;
    }
    report.rss_end_kb = rss_kb(pid);
    Ok(report)
}

fn ok_or_error(ok: bool, n: u64) -> Outcome {
    if ok { Outcome::Ok(n) } else { Outcome::Error }
}

/// Opens a Watch stream on `channel` watching `key` (to `range_end`, from
/// `start_revision`), and waits for its `created` response. The request
/// sender is returned too: dropping it would close the stream's send side.
async fn watch(
    channel: Channel,
    key: &[u8],
    range_end: &[u8],
    start_revision: i64,
) -> Result<Watcher, String> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(epb::WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            epb::WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                start_revision,
                ..Default::default()
            },
        )),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut stream = WatchClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("etcd Watch: {s}"))?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
        Ok(Ok(Some(r))) if r.created => Ok((tx, stream)),
        other => Err(format!("etcd Watch was not created: {other:?}")),
    }
}

/// `--subscribers` Watch streams on one key (at most 250 per connection, as
/// for agsync), one writer Putting it every `--interval-ms`: latency from
/// just before the Put to each watcher's receipt of its event.
async fn fanout(
    addr: SocketAddr,
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    kvs: Vec<Kv>,
    duration: Duration,
) -> Result<Report, String> {
    const KEY: &[u8] = b"bench.key";
    let subscribers = args.subscribers();
    let idle_rss = rss_kb(pid);
    let all = stream_channels(addr, channels, subscribers, args.streams_per_connection).await?;
    let opening = Instant::now();
    let listening = args.listening();
    let open = |key: &'static [u8], from: usize, count: usize| {
        use futures_util::{StreamExt, TryStreamExt};
        let all = &all;
        futures_util::stream::iter(from..from + count)
            .map(move |i| within(watch(all[i % all.len()].clone(), key, b"", 0)))
            .buffer_unordered(crate::workloads::OPENING_AT_ONCE)
            .try_collect::<Vec<_>>()
    };
    let streams = open(KEY, 0, listening).await?;
    // The rest watch a key nobody writes; held open until the end.
    let _idle = open(b"bench.idle", listening, subscribers - listening).await?;
    let open_secs = opening.elapsed().as_secs_f64();
    let subscribed_rss = rss_kb(pid);
    let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(30);
    let (last_tx, last_rx) = tokio::sync::watch::channel(i64::MAX);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(tx, mut stream)| {
            let mut last_rx = last_rx.clone();
            tokio::spawn(async move {
                let _keep_open = tx;
                let mut got: Vec<(i64, Instant)> = Vec::new();
                let mut seen = 0;
                loop {
                    if seen >= *last_rx.borrow() {
                        return got;
                    }
                    tokio::select! {
                        msg = tokio::time::timeout_at(deadline, stream.message()) => match msg {
                            Ok(Ok(Some(r))) => {
                                let at = Instant::now();
                                for e in r.events {
                                    let rev = e.kv.map_or(0, |kv| kv.mod_revision);
                                    seen = seen.max(rev);
                                    got.push((rev, at));
                                }
                            }
                            _ => return got,
                        },
                        changed = last_rx.changed() => if changed.is_err() { return got },
                    }
                }
            })
        })
        .collect();
    let mut writer = kvs[0].clone();
    let start = Instant::now();
    let mut sent: HashMap<i64, Instant> = HashMap::new();
    let (mut n, mut errors) = (0u64, 0u64);
    while start.elapsed() < duration {
        let t = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, writer.put(put(KEY.to_vec(), n))).await {
            Ok(Ok(r)) => {
                let rev = r.into_inner().header.map_or(0, |h| h.revision);
                sent.insert(rev, t);
            }
            Ok(Err(_)) | Err(_) => errors += 1,
        }
        n += 1;
        tokio::time::sleep_until((t + Duration::from_millis(args.interval_ms)).into()).await;
    }
    let _ = last_tx.send(sent.keys().copied().max().unwrap_or(0));
    let mut latencies = Vec::new();
    for r in readers {
        for (rev, at) in r.await.map_err(|e| e.to_string())? {
            if let Some(t0) = sent.get(&rev) {
                latencies.push(micros(at.duration_since(*t0)));
            }
        }
    }
    let delivered = latencies.len() as u64;
    let expected = sent.len() as u64 * listening as u64;
    let mut r = Totals {
        latencies_us: latencies,
        ops: delivered,
        errors,
        ..Default::default()
    }
    .into_report(args, duration);
    r.clients = subscribers;
    r.rss_start_kb = idle_rss;
    r.insert_extra([
        ("delivered", serde_json::Value::from(delivered)),
        ("expected", expected.into()),
    ]);
    crate::workloads::fanout_notes(&mut r, subscribers, open_secs, idle_rss, subscribed_rss);
    crate::workloads::listening_note(&mut r, listening, subscribers);
    crate::workloads::fanout_delivery(&mut r, "etcd fanout", delivered, expected);
    Ok(r)
}

/// Puts `--events` keys under "r/", then one Watch over the prefix from the
/// first of their revisions reads them all back.
async fn replay(
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    kvs: &[Kv],
) -> Result<Report, String> {
    let expected = args.events();
    // One Put per key: each event has a revision of its own, as each agsync
    // event has its own seq (a Txn's Puts would share one).
    let revs = preload(kvs, "r/", expected, 1).await?;
    let first = revs.iter().copied().min().unwrap_or(1);
    let rss = rss_kb(pid);
    let start = Instant::now();
    let (_tx, mut stream) = within(watch(channels[0].clone(), b"r/", b"r0", first)).await?;
    let (mut got, mut last, mut in_order) = (0usize, 0, true);
    while got < expected {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(r))) => {
                for e in r.events {
                    let rev = e.kv.map_or(0, |kv| kv.mod_revision);
                    in_order &= rev >= last;
                    last = rev;
                    got += 1;
                }
            }
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    let mut r = Totals {
        ops: got as u64,
        ..Default::default()
    }
    .into_report(args, elapsed);
    r.clients = 1;
    r.rss_start_kb = rss;
    r.insert_extra([
        ("events", serde_json::Value::from(expected)),
        ("replayed", got.into()),
    ]);
    if got != expected || !in_order {
        r.failed.push(format!(
            "etcd replayed {got} of {expected} events (in order: {in_order})"
        ));
    }
    Ok(r)
}
