//! A node that falls behind the event log's retention never skips events
//! silently. Two nodes on one PostgreSQL with `--retain-events 50`: while B
//! cannot read the log (SIGSTOPped, or cut off from PostgreSQL), A writes
//! 500 documents, so the events B never published are pruned. Afterwards
//! B's live subscriber has either every event in seq order or an
//! OUT_OF_RANGE naming the oldest kept seq (here it must be the latter: the
//! events are gone), later Subscribes from lost positions are refused the
//! same way, Changes is complete, and B serves live events again by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agsync::pb::{BulkPutItem, BulkPutRequest, ChangesRequest};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

const RETAIN: &str = "50";

/// 50 BulkPuts of 10 on `client`; the acknowledged seqs, in order.
async fn write_500(client: &mut Client, database: &str) -> Vec<u64> {
    let mut acked = Vec::with_capacity(500);
    for k in 0..50 {
        let docs = (0..10)
            .map(|i| BulkPutItem {
                id: format!("bulk{k}-{i}"),
                body: Some(body(json!({"k": k, "i": i}))),
                ..Default::default()
            })
            .collect();
        let results = client
            .bulk_put(BulkPutRequest {
                database: database.into(),
                docs,
                ..Default::default()
            })
            .await
            .expect("bulk put")
            .into_inner()
            .results;
        for r in results {
            assert!(r.error.is_empty(), "{r:?}");
            acked.push(r.seq);
        }
    }
    acked
}

/// What `stream` delivers until it ends: the notifications' seqs, and the
/// status it ended with. Fails if it stays open and silent for 10 s.
async fn until_end(stream: &mut Events) -> (Vec<u64>, tonic::Status) {
    let mut seqs = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(item))) => {
                if let Some(agsync::pb::subscribe_response::Event::Notification(n)) = item.event {
                    seqs.push(n.seq);
                }
            }
            Ok(Err(status)) => return (seqs, status),
            Ok(Ok(None)) => panic!("the stream ended without a status after {seqs:?}"),
            Err(_) => panic!(
                "the stream stayed open and silent after {} notifications (last {:?}): a silent gap",
                seqs.len(),
                seqs.last()
            ),
        }
    }
}

/// The oldest kept seq an OUT_OF_RANGE names, checked against its message.
fn oldest_seq(status: &tonic::Status) -> u64 {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("OUT_OF_RANGE carries ErrorInfo");
    assert_eq!(info.reason, "SINCE_TOO_OLD", "{info:?}");
    let oldest: u64 = info.metadata["oldest_seq"].parse().unwrap();
    assert!(
        status
            .message()
            .contains(&format!("the oldest event kept is seq {oldest}")),
        "{}",
        status.message()
    );
    oldest
}

/// After B missed `acked`'s pruned part: its subscriber `live` (which had
/// delivered `heard`) ends with OUT_OF_RANGE, a Subscribe from `heard`'s
/// last seq is refused alike, one from the oldest kept seq replays the rest
/// exactly, Changes on B lists every write, and a new write on A reaches a
/// new live subscriber on B.
async fn check_b_after_the_hole(
    ca: &mut Client,
    cb: &mut Client,
    key: &str,
    mut live: Events,
    heard: &[u64],
    acked: &[u64],
) {
    let last = *acked.last().unwrap();
    let (delivered, status) = until_end(&mut live).await;
    // No event after the hole: the stream ends where the subscriber can
    // resync from, instead of jumping over the pruned events.
    assert_eq!(
        delivered,
        Vec::<u64>::new(),
        "B's live subscriber got events after a hole"
    );
    let oldest = oldest_seq(&status);
    assert!(
        oldest > heard.last().unwrap() + 1 && oldest <= last,
        "oldest {oldest}, heard up to {:?}, last {last}",
        heard.last()
    );

    // A Subscribe on B from the last seq heard: refused the same way.
    let refused = subscribe(cb, &[key], Some(*heard.last().unwrap()), "").await;
    let Err(status) = refused else {
        panic!("a Subscribe from a pruned position was accepted");
    };
    assert_eq!(oldest_seq(&status), oldest);

    // From the oldest kept position: exactly the rest, in order.
    let mut resumed = subscribe(cb, &[key], Some(oldest - 1), "").await.unwrap();
    let mut rest = Vec::new();
    while rest.last() != Some(&last) {
        if let agsync::pb::subscribe_response::Event::Notification(n) =
            next_event(&mut resumed).await
        {
            rest.push(n.seq);
        }
    }
    assert_eq!(rest, (oldest..=last).collect::<Vec<_>>());

    // Changes on B is not limited by the retention: every write is there.
    let page = cb
        .changes(ChangesRequest {
            database: "db".into(),
            since: 0,
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs: Vec<u64> = page.changes.iter().map(|c| c.seq).collect();
    seqs.sort_unstable();
    let mut expected: Vec<u64> = heard.iter().chain(acked).copied().collect();
    expected.sort_unstable();
    assert_eq!(seqs, expected);

    // B recovered by itself: live delivery works again, on the resumed
    // stream and on a new one.
    let mut fresh = subscribe(cb, &[key], None, "").await.unwrap();
    let head = next_subscribed(&mut fresh).await;
    assert!(head >= last, "head {head} < {last}");
    let after = put(ca, "db", "after", "", json!({})).await.unwrap();
    assert_eq!(next_notification(&mut fresh).await.seq, after.seq);
    loop {
        if let agsync::pb::subscribe_response::Event::Notification(n) =
            next_event(&mut resumed).await
        {
            assert_eq!(n.seq, after.seq);
            break;
        }
    }
}

/// Five writes on A heard live by a subscriber on B; returns the stream and
/// the seqs heard.
async fn subscriber_on_b(ca: &mut Client, cb: &mut Client) -> (String, Events, Vec<u64>) {
    let db = create_db(ca, "db").await;
    let mut live = subscribe(cb, &[&db.sync_key], None, "").await.unwrap();
    next_subscribed(&mut live).await;
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(
            put(ca, "db", &format!("first{i}"), "", json!({}))
                .await
                .unwrap()
                .seq,
        );
    }
    let mut heard = Vec::new();
    while heard.len() < 5 {
        heard.push(next_notification(&mut live).await.seq);
    }
    assert_eq!(heard, written);
    (db.sync_key, live, heard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_the_retention_tells_its_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let flags = [
        "--retain-events",
        RETAIN,
        "--pg-poll-interval-ms",
        "50",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let a = ProcessServer::start_with(&path, &flags, None).await;
    let b = ProcessServer::start_with(&path, &flags, None).await;
    let (mut ca, mut cb) = (connect(a.addr).await, connect(b.addr).await);
    let (key, live, heard) = subscriber_on_b(&mut ca, &mut cb).await;

    b.signal("STOP");
    let acked = write_500(&mut ca, "db").await;
    b.signal("CONT");

    check_b_after_the_hole(&mut ca, &mut cb, &key, live, &heard, &acked).await;
    let page = crate::scrape::scrape(&b).await;
    assert_eq!(page.value("agsync_log_gaps_total", &[]), 1.0);
    let page = crate::scrape::scrape(&a).await;
    assert_eq!(page.value("agsync_log_gaps_total", &[]), 0.0);
}

/// B reaches PostgreSQL through a proxy that the test cuts (every open
/// connection closed, new ones refused) for longer than the retention
/// window lasts under A's writes: a partition of B alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgresql_past_the_retention_tells_its_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let url = crate::pg::url_for(&path).await;
    let target: SocketAddr = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the URL")
        .parse()
        .expect("a socket address");
    let proxy = Proxy::start(target).await;
    let via_proxy = url.replacen(&target.to_string(), &proxy.addr.to_string(), 1);
    let node = |db: String| {
        TestServer::start_with(move |c| {
            c.db = db.into();
            c.retain_events = 50;
            c.pg_poll_interval_ms = Duration::from_millis(50);
        })
    };
    let a = node(url).await;
    let b = node(via_proxy).await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let (key, live, heard) = subscriber_on_b(&mut ca, &mut cb).await;

    proxy.cut(true);
    let acked = write_500(&mut ca, "db").await;
    // B noticed: a call that needs PostgreSQL fails with UNAVAILABLE.
    let down = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match get(&mut cb, "db", "first0").await {
                Err(s) if s.code() == Code::Unavailable => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert!(down.is_ok(), "B still answered while cut off");
    proxy.cut(false);

    check_b_after_the_hole(&mut ca, &mut cb, &key, live, &heard, &acked).await;
}

/// A TCP proxy to `target` that can be cut: while cut, open connections are
/// closed and new ones are closed at once.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(watch::Sender::new(false));
        let accept = {
            let cut = cut.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if *cut.borrow() {
                        continue; // dropped: closed at once
                    }
                    let mut cut_rx = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_rx.wait_for(|cut| *cut) => {}
                        }
                    });
                }
            })
        };
        Proxy { addr, cut, accept }
    }

    fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
