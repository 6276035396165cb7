//! A cluster nemesis test: three agsync nodes (the real binary) on one
//! PostgreSQL of their own, for `AGSYNC_NEMESIS_SECS` (30 by default),
//! while a nemesis kills a random node with SIGKILL and starts it again,
//! pauses one with SIGSTOP and resumes it, and crashes and restarts
//! PostgreSQL (`pg_ctl stop -m immediate`), in an order drawn from a seed.
//!
//! Meanwhile clients read and compare-and-set a few documents through
//! random nodes (each write with a request_id, retried on another node
//! until it gets a definite answer or 10 s pass), and subscribers that
//! move between nodes resume from the last seq they saw. At the end:
//! - each document's history is linearizable (`linearizable::check`);
//! - every node gives the same Get of each document and the same Changes;
//! - every node replays the same event log from seq 0, and it holds every
//!   acknowledged write at the seq it was acknowledged with;
//! - every subscriber's whole history equals that log: no gap, no
//!   duplicate, nothing out of order;
//! - no call failed with a status other than a retryable one.
//!
//! The seed is printed; `AGSYNC_NEMESIS_SEED=<seed>` replays the same
//! schedule (the same faults in the same order, and the same choices by
//! each client; the timing is the machine's). The long form:
//! `AGSYNC_NEMESIS_SECS=300 cargo test --test api_postgres nemesis -- --nocapture`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use agsync::pb::sync_service_client::SyncServiceClient;
use agsync::pb::{self, PutRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::watch;
use tonic::Code;

use crate::helpers::*;
use crate::linearizable::{self, Kind};

const NODES: usize = 3;
const DOCS: usize = 3;
const CLIENTS: usize = 6;
const SUBSCRIBERS: usize = 3;
const DB: &str = "nemesis";
/// A call without an answer by then counts as failed (a paused node).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// A write retried this long without a definite answer is indeterminate.
const GIVE_UP: Duration = Duration::from_secs(10);
/// A subscriber whose stream stays silent this long moves to another node.
const SILENCE: Duration = Duration::from_secs(3);

fn doc_id(doc: usize) -> String {
    format!("doc{doc}")
}

/// The nodes' clients, by node: a restarted node has a new port.
#[derive(Clone)]
struct Nodes(Arc<RwLock<Vec<Client>>>);

impl Nodes {
    fn client(&self, node: usize) -> Client {
        self.0.read().unwrap()[node].clone()
    }

    fn set(&self, node: usize, server: &ProcessServer) {
        self.0.write().unwrap()[node] = lazy_client(server);
    }
}

/// A client that connects on first use, and gives up connecting after
/// 500 ms: a node being restarted must not hold a call for long.
fn lazy_client(server: &ProcessServer) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    SyncServiceClient::new(channel)
}

/// Statuses a client may meet while nodes and PostgreSQL fail, and retry:
/// the node or PostgreSQL unreachable, or the connection cut mid-call.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown
    )
}

/// The value stored in a document body (`{"w": value}`).
fn value_of(doc: &pb::Document) -> String {
    json(doc.body.as_ref().expect("a body"))["w"]
        .as_str()
        .expect("a value")
        .to_owned()
}

/// What a client observed, on one document, between `call` and `ret`.
#[derive(Clone, Debug)]
enum Seen {
    Read {
        saw: String,
    },
    Written {
        expected: String,
        new: String,
        seq: u64,
    },
    Conflict {
        expected: String,
        saw: Option<String>,
    },
    Indeterminate {
        expected: String,
        new: String,
    },
}

#[derive(Clone, Debug)]
struct Record {
    doc: usize,
    call: Instant,
    ret: Option<Instant>,
    seen: Seen,
}

/// Everything the run observed.
#[derive(Default)]
struct Observed {
    records: Vec<Record>,
    /// Each revision seen, with the value it holds: one value per revision.
    revs: HashMap<String, String>,
    /// Calls that failed with a status a client should not meet.
    unexpected: Vec<String>,
    retried: usize,
}

impl Observed {
    fn rev(&mut self, rev: &str, value: &str) {
        if let Some(before) = self.revs.insert(rev.to_owned(), value.to_owned())
            && before != value
        {
            self.unexpected
                .push(format!("revision {rev} holds {before:?} and {value:?}"));
        }
    }
}

/// One client: reads (40%) and compare-and-sets (60%) random documents
/// through random nodes until `until`, with the revision it last saw.
async fn client(
    me: usize,
    nodes: Nodes,
    seed: u64,
    until: Instant,
    mut known: Vec<(String, String)>,
    observed: Arc<Mutex<Observed>>,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1000 + me as u64));
    let mut n = 0;
    while Instant::now() < until {
        let doc = rng.random_range(0..DOCS);
        if rng.random_bool(0.4) {
            let mut c = nodes.client(rng.random_range(0..NODES));
            let call = Instant::now();
            let answer = tokio::time::timeout(CALL_TIMEOUT, get(&mut c, DB, &doc_id(doc))).await;
            let ret = Instant::now();
            let mut observed = observed.lock().unwrap();
            match answer {
                Ok(Ok(found)) => {
                    let saw = value_of(&found);
                    observed.rev(&found.rev, &saw);
                    known[doc] = (found.rev, saw.clone());
                    observed.records.push(Record {
                        doc,
                        call,
                        ret: Some(ret),
                        seen: Seen::Read { saw },
                    });
                }
                Ok(Err(s)) if retryable(s.code()) => observed.retried += 1,
                Ok(Err(s)) => observed.unexpected.push(format!("Get: {s:?}")),
                Err(_) => observed.retried += 1,
            }
        } else {
            n += 1;
            let new = format!("c{me}-{n}");
            let (rev, expected) = known[doc].clone();
            let request = PutRequest {
                request_id: new.clone(),
                database: DB.into(),
                id: doc_id(doc),
                rev: rev.clone(),
                body: Some(body(json!({"w": new}))),
                notify_aliases: vec![],
            };
            let call = Instant::now();
            let seen = loop {
                let mut c = nodes.client(rng.random_range(0..NODES));
                let answer = tokio::time::timeout(CALL_TIMEOUT, c.put(request.clone())).await;
                match answer {
                    Ok(Ok(written)) => {
                        let written = written.into_inner();
                        let mut observed = observed.lock().unwrap();
                        observed.rev(&written.rev, &new);
                        if generation(&written.rev) != generation(&rev) + 1 {
                            observed
                                .unexpected
                                .push(format!("{new}: rev {} written over {rev}", written.rev));
                        }
                        known[doc] = (written.rev, new.clone());
                        break Seen::Written {
                            expected,
                            new,
                            seq: written.seq,
                        };
                    }
                    Ok(Err(s)) if s.code() == Code::Aborted => {
                        // The conflict carries the current document: the
                        // next attempt builds on it, as a real client does.
                        let saw = conflict_details(&s).current.map(|current| {
                            let value = value_of(&current);
                            observed.lock().unwrap().rev(&current.rev, &value);
                            known[doc] = (current.rev, value.clone());
                            value
                        });
                        break Seen::Conflict { expected, saw };
                    }
                    Ok(Err(s)) if !retryable(s.code()) => {
                        observed
                            .lock()
                            .unwrap()
                            .unexpected
                            .push(format!("Put {new}: {s:?}"));
                        break Seen::Indeterminate { expected, new };
                    }
                    Ok(Err(_)) | Err(_) => observed.lock().unwrap().retried += 1,
                }
                if call.elapsed() > GIVE_UP {
                    break Seen::Indeterminate { expected, new };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let ret = (!matches!(seen, Seen::Indeterminate { .. })).then(Instant::now);
            observed.lock().unwrap().records.push(Record {
                doc,
                call,
                ret,
                seen,
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
}

/// One subscriber: subscribes through a random node from the last seq it
/// saw, stays 0.5–3 s (less if the stream fails or stays silent for
/// `SILENCE`), then moves to another node; until it has seen `last`.
/// Returns its whole history, (seq, document id) in delivery order, and
/// how many streams it opened.
async fn subscriber(
    me: usize,
    nodes: Nodes,
    seed: u64,
    key: String,
    mut last: watch::Receiver<Option<u64>>,
    observed: Arc<Mutex<Observed>>,
) -> (Vec<(u64, String)>, usize) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(2000 + me as u64));
    let (mut history, mut opened, mut since) = (Vec::<(u64, String)>::new(), 0, 0);
    let done = |since: u64, last: &watch::Receiver<Option<u64>>| {
        last.borrow().is_some_and(|last| since >= last)
    };
    while !done(since, &last) {
        let mut c = nodes.client(rng.random_range(0..NODES));
        let stay = Duration::from_millis(rng.random_range(500..3000));
        let stream =
            tokio::time::timeout(CALL_TIMEOUT, subscribe(&mut c, &[&key], Some(since), "")).await;
        let mut stream = match stream {
            Ok(Ok(stream)) => stream,
            Ok(Err(s)) if !retryable(s.code()) => {
                observed
                    .lock()
                    .unwrap()
                    .unexpected
                    .push(format!("Subscribe since {since}: {s:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        opened += 1;
        let leave = Instant::now() + stay;
        while Instant::now() < leave && !done(since, &last) {
            let next = tokio::select! {
                next = tokio::time::timeout(SILENCE, stream.message()) => next,
                // Re-check `done` when the last seq becomes known.
                _ = last.changed() => continue,
            };
            match next {
                Ok(Ok(Some(item))) => {
                    if let Some(pb::subscribe_response::Event::Notification(n)) = item.event {
                        since = n.seq;
                        history.push((n.seq, n.id));
                    }
                }
                Ok(Err(s)) if !retryable(s.code()) => {
                    observed
                        .lock()
                        .unwrap()
                        .unexpected
                        .push(format!("stream from {since}: {s:?}"));
                    break;
                }
                // Ended, cut off, or silent: move on.
                _ => break,
            }
        }
    }
    (history, opened)
}

/// A fault the nemesis injects.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillNode,
    PauseNode,
    CrashPostgres,
}

/// Injects faults one after another until `until`: each of the three
/// kinds first, in a random order, then random ones; 0.5–2 s apart. Every
/// node and PostgreSQL are up again when it returns. Returns what it did,
/// with the time since `start`.
async fn nemesis(
    seed: u64,
    start: Instant,
    until: Instant,
    cluster: Arc<crate::pg::OwnCluster>,
    url: String,
    servers: &mut [Option<ProcessServer>],
    nodes: &Nodes,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = vec![Fault::KillNode, Fault::PauseNode, Fault::CrashPostgres];
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.random_range(0..=i));
    }
    plan.reverse();
    let mut log = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        if Instant::now() >= until {
            break;
        }
        let fault = plan.pop().unwrap_or(match rng.random_range(0..3) {
            0 => Fault::KillNode,
            1 => Fault::PauseNode,
            _ => Fault::CrashPostgres,
        });
        let node = rng.random_range(0..NODES);
        let down = Duration::from_millis(rng.random_range(100..2000));
        let at = start.elapsed().as_secs_f64();
        log.push(match fault {
            Fault::CrashPostgres => format!("{at:6.2}s {fault:?}, down for {down:?}"),
            _ => format!("{at:6.2}s {fault:?} node {node}, for {down:?}"),
        });
        match fault {
            Fault::KillNode => {
                servers[node].take().unwrap().kill().await;
                tokio::time::sleep(down).await;
                let server = start_node(&url).await;
                nodes.set(node, &server);
                servers[node] = Some(server);
            }
            Fault::PauseNode => {
                let server = servers[node].as_ref().unwrap();
                server.signal("STOP");
                tokio::time::sleep(down).await;
                server.signal("CONT");
            }
            Fault::CrashPostgres => {
                let crashing = cluster.clone();
                tokio::task::spawn_blocking(move || crashing.crash())
                    .await
                    .unwrap();
                tokio::time::sleep(down).await;
                let starting = cluster.clone();
                tokio::task::spawn_blocking(move || starting.start_again())
                    .await
                    .unwrap();
            }
        }
    }
    log
}

async fn start_node(url: &str) -> ProcessServer {
    ProcessServer::start_with(Path::new(url), &["--pg-poll-interval-ms", "50"], None).await
}

/// The event log as `node` replays it from seq 0: (seq, document id), up
/// to the head it reports live from.
async fn replay(nodes: &Nodes, node: usize, key: &str) -> Vec<(u64, String)> {
    let mut c = nodes.client(node);
    let mut stream = subscribe(&mut c, &[key], Some(0), "").await.unwrap();
    let mut log = Vec::new();
    loop {
        match next_event(&mut stream).await {
            pb::subscribe_response::Event::Notification(n) => log.push((n.seq, n.id)),
            pb::subscribe_response::Event::Subscribed(_) => return log,
            pb::subscribe_response::Event::Progress(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_a_nemesis_stay_linearizable_and_gap_free() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        // That server is not ours to crash.
        return;
    }
    let seed = std::env::var("AGSYNC_NEMESIS_SEED")
        .ok()
        .map(|s| s.parse().expect("AGSYNC_NEMESIS_SEED is a number"))
        .unwrap_or_else(rand::random::<u64>);
    let secs: u64 = std::env::var("AGSYNC_NEMESIS_SECS")
        .ok()
        .map(|s| s.parse().expect("AGSYNC_NEMESIS_SECS is a number"))
        .unwrap_or(30);
    eprintln!("nemesis: seed {seed}, {secs} s (rerun with AGSYNC_NEMESIS_SEED={seed})");

    let cluster =
        Arc::new(crate::pg::OwnCluster::start().unwrap_or_else(|why| crate::pg::skip(&why)));
    cluster.admin(&["CREATE DATABASE agsync"]).await;
    let url = cluster.url("agsync");
    let mut servers = Vec::new();
    for _ in 0..NODES {
        servers.push(Some(start_node(&url).await));
    }
    let nodes = Nodes(Arc::new(RwLock::new(
        servers.iter().flatten().map(lazy_client).collect(),
    )));

    let mut c = nodes.client(0);
    let key = create_db(&mut c, DB).await.sync_key;
    let mut initial = Vec::new();
    for doc in 0..DOCS {
        let value = format!("init{doc}");
        let written = put(&mut c, DB, &doc_id(doc), "", json!({"w": value}))
            .await
            .unwrap();
        initial.push((written.rev, value));
    }
    let observed = Arc::new(Mutex::new(Observed::default()));
    for (rev, value) in &initial {
        observed.lock().unwrap().rev(rev, value);
    }

    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let (last_tx, last_rx) = watch::channel(None);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|me| {
            tokio::spawn(client(
                me,
                nodes.clone(),
                seed,
                until,
                initial.clone(),
                observed.clone(),
            ))
        })
        .collect();
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|me| {
            tokio::spawn(subscriber(
                me,
                nodes.clone(),
                seed,
                key.clone(),
                last_rx.clone(),
                observed.clone(),
            ))
        })
        .collect();
    let faults = nemesis(
        seed,
        start,
        until,
        cluster.clone(),
        url.clone(),
        &mut servers,
        &nodes,
    )
    .await;
    for task in clients {
        task.await.unwrap();
    }
    eprintln!("nemesis: faults\n  {}", faults.join("\n  "));

    // Quiet now: every node answers the same, and its answers end each
    // document's history (as reads after everything else).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut finals: Vec<Vec<(String, String)>> = Vec::new();
    for node in 0..NODES {
        let mut c = nodes.client(node);
        let mut docs = Vec::new();
        for doc in 0..DOCS {
            let call = Instant::now();
            let found = get(&mut c, DB, &doc_id(doc)).await.unwrap();
            let saw = value_of(&found);
            let mut observed = observed.lock().unwrap();
            observed.rev(&found.rev, &saw);
            observed.records.push(Record {
                doc,
                call,
                ret: Some(Instant::now()),
                seen: Seen::Read { saw: saw.clone() },
            });
            docs.push((found.rev, saw));
        }
        finals.push(docs);
    }
    for (node, docs) in finals.iter().enumerate() {
        assert_eq!(docs, &finals[0], "node {node}'s Get differs from node 0's");
    }
    let changes: Vec<Vec<(String, String, u64, bool)>> = {
        let mut all = Vec::new();
        for node in 0..NODES {
            let page = all_changes(&nodes.client(node), DB).await;
            all.push(
                page.into_iter()
                    .map(|c| (c.id, c.rev, c.seq, c.deleted))
                    .collect(),
            );
        }
        all
    };
    for (node, list) in changes.iter().enumerate() {
        assert_eq!(
            list, &changes[0],
            "node {node}'s Changes differs from node 0's"
        );
    }
    for (doc, (rev, _)) in finals[0].iter().enumerate() {
        let listed = changes[0].iter().find(|c| c.0 == doc_id(doc));
        assert_eq!(listed.map(|c| &c.1), Some(rev), "Changes and Get disagree");
    }

    // The reference log: what every node replays from seq 0.
    let reference = replay(&nodes, 0, &key).await;
    for node in 1..NODES {
        assert_eq!(
            replay(&nodes, node, &key).await,
            reference,
            "node {node} replays another log than node 0"
        );
    }
    assert!(
        reference.windows(2).all(|w| w[0].0 < w[1].0),
        "the log's seqs are not increasing"
    );
    // Every subscriber heard exactly the log.
    let last = reference.last().expect("a non-empty log").0;
    last_tx.send(Some(last)).unwrap();
    let mut opened = 0;
    for (me, task) in subscribers.into_iter().enumerate() {
        let (history, streams) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("subscriber {me} did not reach seq {last}"))
            .unwrap();
        opened += streams;
        if history != reference {
            let first = history
                .iter()
                .zip(&reference)
                .position(|(h, r)| h != r)
                .unwrap_or(history.len().min(reference.len()));
            panic!(
                "seed {seed}: subscriber {me}'s history differs from the log at position {first}: \
                 heard {:?}, the log has {:?} ({} heard, {} logged)",
                history.get(first),
                reference.get(first),
                history.len(),
                reference.len()
            );
        }
    }

    let logged: HashMap<u64, &str> = reference.iter().map(|(s, id)| (*s, id.as_str())).collect();
    let observed = Arc::try_unwrap(observed)
        .ok()
        .expect("every client and subscriber is done")
        .into_inner()
        .unwrap();
    for r in &observed.records {
        if let Seen::Written { seq, new, .. } = &r.seen {
            assert_eq!(
                logged.get(seq).copied(),
                Some(doc_id(r.doc).as_str()),
                "write {new}, acknowledged at seq {seq}, is not in the log"
            );
        }
    }

    // Linearizability, one document at a time.
    let mut counts = HashMap::<&str, usize>::new();
    for (doc, (_, initial_value)) in initial.iter().enumerate() {
        let mut values: HashMap<String, linearizable::Value> = HashMap::new();
        let mut id = |v: &str| {
            let next = values.len() as linearizable::Value;
            *values.entry(v.to_owned()).or_insert(next)
        };
        let initial_value = id(initial_value);
        let ops: Vec<linearizable::Op> = observed
            .records
            .iter()
            .filter(|r| r.doc == doc)
            .map(|r| {
                let kind = match &r.seen {
                    Seen::Read { saw } => Kind::Read { saw: id(saw) },
                    Seen::Written { expected, new, .. } => Kind::Written {
                        expected: id(expected),
                        new: id(new),
                    },
                    Seen::Conflict { expected, saw } => Kind::Conflict {
                        expected: id(expected),
                        saw: saw.as_deref().map(&mut id),
                    },
                    Seen::Indeterminate { expected, new } => Kind::Indeterminate {
                        expected: id(expected),
                        new: id(new),
                    },
                };
                let nanos = |t: Instant| t.duration_since(start).as_nanos() as u64;
                linearizable::Op {
                    call: nanos(r.call.max(start)),
                    ret: r.ret.map(|t| nanos(t.max(start))),
                    kind,
                }
            })
            .collect();
        for r in observed.records.iter().filter(|r| r.doc == doc) {
            let name = match r.seen {
                Seen::Read { .. } => "read",
                Seen::Written { .. } => "written",
                Seen::Conflict { .. } => "conflict",
                Seen::Indeterminate { .. } => "indeterminate",
            };
            *counts.entry(name).or_default() += 1;
        }
        if let Err(e) = linearizable::check(initial_value, &ops) {
            let names: HashMap<linearizable::Value, &str> =
                values.iter().map(|(k, v)| (*v, k.as_str())).collect();
            let show = |op: &linearizable::Op| {
                let name = |v: &linearizable::Value| names[v];
                let what = match op.kind {
                    Kind::Read { saw } => format!("read {}", name(&saw)),
                    Kind::Written { expected, new } => {
                        format!("wrote {} over {}", name(&new), name(&expected))
                    }
                    Kind::Conflict { expected, saw } => format!(
                        "conflict expecting {}, current {:?}",
                        name(&expected),
                        saw.as_ref().map(name)
                    ),
                    Kind::Indeterminate { expected, new } => {
                        format!("maybe wrote {} over {}", name(&new), name(&expected))
                    }
                };
                let ms = |t: u64| t as f64 / 1e6;
                format!(
                    "{what} ({:.3}–{} ms)",
                    ms(op.call),
                    op.ret.map_or("?".into(), |t| format!("{:.3}", ms(t)))
                )
            };
            let tail: Vec<String> = e.deepest_prefix.iter().rev().take(10).map(show).collect();
            panic!(
                "seed {seed}: {} is not linearizable: no order places {}; the longest order found ends with (newest first) {tail:#?}",
                doc_id(doc),
                show(&e.stuck_at)
            );
        }
    }
    eprintln!(
        "nemesis: {} faults; operations {counts:?}; {} calls retried; {} log entries; {opened} subscriber streams",
        faults.len(),
        observed.retried,
        reference.len()
    );
    assert!(
        observed.unexpected.is_empty(),
        "seed {seed}: unexpected answers: {:#?}",
        observed.unexpected
    );
    assert!(
        counts.get("written").copied().unwrap_or(0) >= 10,
        "too few writes succeeded to check anything: {counts:?}"
    );
}
