//! The hostile workload: one server under every kind of heavy client at once
//! (near-limit BulkPuts, paging Changes with bodies, thousands of replaying
//! subscribers) while a few well-behaved clients measure the latency that
//! everyone else gets. It checks that subscribers miss nothing, that no
//! Changes page is over the default 4 MiB receive limit, and the server's
//! peak RSS; it never raises the pagers' receive limit to make a page fit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agsync::pb::sync_service_client::SyncServiceClient;
use agsync::pb::{self, subscribe_response::Event};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::WorkloadArgs;
use crate::workloads::{
    Client, Outcome, Owner, Report, Sampler, Totals, back_off, clients, connections,
    create_database, drive, in_chunks, is_noop, is_rejection, micros, outcome, percentile_ms,
    preload, preload_bodies, rss_kb, stream_channels, update_once,
};

/// Large documents, paged by the pagers and replayed by nobody.
const DOCS_DB: &str = "hostile-docs";
/// Where the bulk writers put their new documents.
const BULK_DB: &str = "hostile-bulk";
/// The well-behaved clients' small documents.
const GOOD_DB: &str = "hostile-good";
/// Bytes of text in one large document (its JSON is slightly bigger).
const DOC_BYTES: usize = 100 * 1024;
/// Documents per setup BulkPut: about 4 MiB, well under the request limit.
const SETUP_BATCH: usize = 40;
/// Documents per hostile BulkPut: 15.9 MB (15.2 MiB) encoded, just under the
/// request limit (checked before the run).
const BULK_BATCH: usize = 155;
/// The server's default request limit (`--max-request-bytes`).
const REQUEST_LIMIT: usize = 16 * 1024 * 1024;
/// How often the server's RSS is read.
const RSS_PERIOD: Duration = Duration::from_millis(100);
/// How long after the measured phase the subscribers may take to finish.
const SUBSCRIBER_GRACE: Duration = Duration::from_secs(120);

/// The sync key of event group `k`.
fn key_name(k: usize) -> String {
    format!("hostile.k{k}")
}

/// How many of `events` (event i goes to key i % keys) key `k` gets.
fn events_of_key(events: usize, keys: usize, k: usize) -> u64 {
    (events / keys + usize::from(k < events % keys)) as u64
}

/// The untimed setup, then the bulk writers, pagers and well-behaved clients
/// for `duration` while the subscribers replay (for at most
/// `SUBSCRIBER_GRACE` more) and the server's RSS is sampled.
pub(crate) async fn run(
    addr: SocketAddr,
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    if args.max_rss_mb.is_some() && pid.is_none() {
        return Err("--max-rss-mb needs --server-pid to read the server's RSS".into());
    }
    let request_bytes = bulk_request(0, 0).encoded_len();
    if request_bytes >= REQUEST_LIMIT {
        return Err(format!(
            "a hostile BulkPut is {request_bytes} bytes, not under the 16 MiB request limit"
        ));
    }
    let noop = setup(&all, args).await?;
    let good = good_clients(addr, args.good_clients.max(1)).await?;
    let sub_channels =
        stream_channels(addr, &[], args.subscribers(), args.streams_per_connection).await?;
    let rss_start = rss_kb(pid);
    let start = Instant::now();
    let rss = Sampler::spawn(RSS_PERIOD, duration + SUBSCRIBER_GRACE * 2, move || {
        rss_kb(pid)
    });
    let subscribers = spawn_subscribers(&sub_channels, args, start, duration + SUBSCRIBER_GRACE);
    let bulk_log = Arc::new(ErrorLog::default());
    let pager_stats = Arc::new(PagerStats::default());
    let (bulk, paged, (good, good_elapsed)) = tokio::join!(
        bulk_writers(channels, args.bulk_clients, duration, bulk_log.clone()),
        pagers(channels, args.pager_clients, duration, pager_stats.clone()),
        drive(good, duration, good_once),
    );
    let mut replays = Vec::with_capacity(subscribers.len());
    for s in subscribers {
        replays.push(s.await.map_err(|e| e.to_string())?);
    }
    let rss = rss.finish().await;
    let mut r = report_good(args, good, good_elapsed);
    r.rss_start_kb = rss_start;
    report_bulk(&mut r, bulk, &bulk_log, request_bytes);
    report_pages(&mut r, paged, &pager_stats);
    report_subscribers(&mut r, args, &replays, noop);
    report_rss(&mut r, args, pid, &rss);
    Ok(r)
}

/// Creates the three databases, fills hostile-docs with `--docs` large
/// documents and logs `--events` Notify events over `--keys` keys; returns
/// whether the server is the no-op one.
async fn setup(all: &[Client], args: &WorkloadArgs) -> Result<bool, String> {
    let mut admin = all[0].clone();
    for (db, key) in [
        (DOCS_DB, "hostile.docs"),
        (BULK_DB, "hostile.bulk"),
        (GOOD_DB, "hostile.good"),
    ] {
        create_database(&mut admin, db, key).await?;
    }
    let noop = is_noop(&mut admin).await?;
    preload_bodies(all, DOCS_DB, args.docs, SETUP_BATCH, big_body).await?;
    let keys = args.keys.max(1);
    in_chunks(all, args.events(), 100, move |mut c, range| async move {
        for i in range {
            c.notify(pb::NotifyRequest {
                sync_key: key_name(i % keys),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("setup Notify: {s}"))?;
        }
        Ok(())
    })
    .await?;
    Ok(noop)
}

/// A string-heavy document of about `DOC_BYTES` of JSON that varies with
/// `n`: a title, three long texts and a few numbers.
fn big_body(n: u64) -> prost_types::Struct {
    use prost_types::value::Kind;
    let v = |k: Kind| prost_types::Value { kind: Some(k) };
    let text = |field: &str| {
        let line = format!("{n:012} {field}: the quick brown fox jumps over the lazy dog. ");
        let mut s = line.repeat(DOC_BYTES / 3 / line.len() + 1);
        s.truncate(DOC_BYTES / 3);
        v(Kind::StringValue(s))
    };
    prost_types::Struct {
        fields: [
            ("title".to_owned(), v(Kind::StringValue(format!("doc {n}")))),
            ("summary".to_owned(), text("summary")),
            ("body".to_owned(), text("body")),
            ("notes".to_owned(), text("notes")),
            ("n".to_owned(), v(Kind::NumberValue(n as f64))),
            (
                "score".to_owned(),
                v(Kind::NumberValue((n % 1000) as f64 / 10.0)),
            ),
            ("year".to_owned(), v(Kind::NumberValue(1969.0))),
        ]
        .into(),
    }
}

/// Bulk writer `k`'s `n`th BulkPut: `BULK_BATCH` new large documents.
fn bulk_request(k: usize, n: u64) -> pb::BulkPutRequest {
    let docs = (0..BULK_BATCH)
        .map(|i| pb::BulkPutItem {
            id: format!("h{k}-{n}-{i}"),
            body: Some(big_body(n * BULK_BATCH as u64 + i as u64)),
            ..Default::default()
        })
        .collect();
    pb::BulkPutRequest {
        database: BULK_DB.into(),
        docs,
        ..Default::default()
    }
}

/// The first few distinct error messages of a group, for the report.
#[derive(Default)]
struct ErrorLog(std::sync::Mutex<Vec<String>>);

impl ErrorLog {
    fn record(&self, message: String) {
        if let Ok(mut first) = self.0.lock()
            && first.len() < 3
            && !first.contains(&message)
        {
            first.push(message);
        }
    }

    fn first(&self) -> String {
        self.0.lock().map(|v| v.join("; ")).unwrap_or_default()
    }
}

/// `count` clients looping BulkPuts of new documents, backing off when the
/// server sheds them; ops are documents written.
async fn bulk_writers(
    channels: &[Channel],
    count: usize,
    duration: Duration,
    log: Arc<ErrorLog>,
) -> (Totals, Duration) {
    let states: Vec<(Client, usize, u64)> = clients(channels, count)
        .into_iter()
        .enumerate()
        .map(|(k, c)| (c, k, 0x2545_f491_4f6c_dd1d ^ (k as u64 + 1)))
        .collect();
    drive(states, duration, move |(mut c, k, mut seed), n| {
        let log = log.clone();
        async move {
            let out = match c.bulk_put(bulk_request(k, n)).await {
                Ok(resp) => bulk_outcome(resp.into_inner(), &log),
                Err(s) if is_rejection(&s) => {
                    back_off(&mut seed).await;
                    Outcome::Rejected
                }
                Err(s) => {
                    log.record(format!("BulkPut: {s}"));
                    back_off(&mut seed).await;
                    Outcome::Error
                }
            };
            ((c, k, seed), out)
        }
    })
    .await
}

/// A BulkPut of new ids is an error if any of its documents failed.
fn bulk_outcome(resp: pb::BulkPutResponse, log: &ErrorLog) -> Outcome {
    match resp.results.iter().find(|r| !r.error.is_empty()) {
        Some(bad) => {
            log.record(format!(
                "BulkPut of {}: {} {}",
                bad.id, bad.error, bad.reason
            ));
            Outcome::Error
        }
        None => Outcome::Ok(resp.results.len() as u64),
    }
}

#[derive(Default)]
struct PagerStats {
    pages: AtomicU64,
    /// Responses refused by the client for being over its 4 MiB limit.
    oversize: AtomicU64,
    log: ErrorLog,
}

/// `count` clients with tonic's default 4 MiB receive limit paging Changes
/// with bodies through hostile-docs, over and over; ops are documents.
async fn pagers(
    channels: &[Channel],
    count: usize,
    duration: Duration,
    stats: Arc<PagerStats>,
) -> (Totals, Duration) {
    let states: Vec<(Client, u64, u64)> = (0..count)
        .map(|k| {
            let c = SyncServiceClient::new(channels[k % channels.len()].clone());
            (c, 0, 0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1))
        })
        .collect();
    drive(states, duration, move |(mut c, since, mut seed), _| {
        let stats = stats.clone();
        async move {
            let (since, out) = page(&mut c, since, &mut seed, &stats).await;
            ((c, since, seed), out)
        }
    })
    .await
}

/// Reads the page after `since`; returns where the next one starts (0 again
/// after an empty page) and what it came to.
async fn page(c: &mut Client, since: u64, seed: &mut u64, stats: &PagerStats) -> (u64, Outcome) {
    let request = pb::ChangesRequest {
        database: DOCS_DB.into(),
        since,
        limit: 0,
        include_docs: true,
        ..Default::default()
    };
    match c.changes(request).await {
        Ok(resp) => {
            let resp = resp.into_inner();
            stats.pages.fetch_add(1, Ordering::Relaxed);
            let next = if resp.changes.is_empty() {
                0
            } else {
                resp.last_seq
            };
            (next, Outcome::Ok(resp.changes.len() as u64))
        }
        Err(s) => {
            let out = if is_rejection(&s) {
                Outcome::Rejected
            } else {
                // tonic refuses a message over the receive limit with
                // OUT_OF_RANGE "decoded message length too large".
                if s.code() == Code::OutOfRange && s.message().contains("too large") {
                    stats.oversize.fetch_add(1, Ordering::Relaxed);
                }
                stats.log.record(format!("Changes since {since}: {s}"));
                Outcome::Error
            };
            back_off(seed).await;
            (since, out)
        }
    }
}

/// `n` well-behaved clients, each on its own connection with one small
/// document of its own in hostile-good.
async fn good_clients(addr: SocketAddr, n: usize) -> Result<Vec<Owner>, String> {
    let all = clients(&connections(addr, n).await?, n);
    let revs = preload(&all, GOOD_DB, n).await?;
    Ok(all
        .into_iter()
        .zip(revs)
        .enumerate()
        .map(|(k, (c, rev))| (c, vec![(format!("p{k}"), rev)]))
        .collect())
}

/// A well-behaved client's turn: a Put of its document, then a Get of it.
async fn good_once((mut c, mut docs): Owner, n: u64) -> (Owner, Outcome) {
    let out = if n.is_multiple_of(2) {
        update_once(&mut c, GOOD_DB, &mut docs, n).await
    } else {
        let request = pb::GetRequest {
            database: GOOD_DB.into(),
            id: docs[0].0.clone(),
            ..Default::default()
        };
        outcome(c.get(request).await, 1)
    };
    ((c, docs), out)
}

/// What one subscriber's replay came to.
#[derive(Default)]
struct Replayed {
    got: u64,
    expected: u64,
    resumes: u64,
    took: Option<Duration>,
    failure: Option<String>,
}

/// Why a subscription ended before its `subscribed` event.
enum Stop {
    /// The server shed it (UNAVAILABLE, RESOURCE_EXHAUSTED): resume.
    Shed,
    Fail(String),
}

fn stop(s: &tonic::Status, what: &str) -> Stop {
    if is_rejection(s) {
        Stop::Shed
    } else {
        Stop::Fail(format!("{what}: {s}"))
    }
}

/// One task per subscriber, each on one of the keys (round-robin), spread
/// over `channels`; each must be done within `bound` of `start`.
fn spawn_subscribers(
    channels: &[Channel],
    args: &WorkloadArgs,
    start: Instant,
    bound: Duration,
) -> Vec<tokio::task::JoinHandle<Replayed>> {
    let (keys, events) = (args.keys.max(1), args.events());
    clients(channels, args.subscribers())
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let k = i % keys;
            let replay = Replay {
                key: key_name(k),
                expected: events_of_key(events, keys, k),
                start,
                deadline: start + bound,
                seed: 0x6a09_e667_f3bc_c909 ^ (i as u64 + 1),
            };
            tokio::spawn(replay.run(c))
        })
        .collect()
}

/// One subscriber's task: replay `key` from since=0 up to its `subscribed`.
struct Replay {
    key: String,
    expected: u64,
    start: Instant,
    deadline: Instant,
    seed: u64,
}

impl Replay {
    /// Replays until `subscribed`, resuming from the last seq received
    /// whenever the server sheds the stream (the contract), until the
    /// deadline.
    async fn run(mut self, mut c: Client) -> Replayed {
        let mut r = Replayed {
            expected: self.expected,
            ..Default::default()
        };
        let mut last = 0;
        let outcome = tokio::time::timeout_at(self.deadline.into(), async {
            loop {
                match self.once(&mut c, &mut last, &mut r.got).await {
                    Ok(()) => return Ok(()),
                    Err(Stop::Shed) => {
                        r.resumes += 1;
                        back_off(&mut self.seed).await;
                    }
                    Err(Stop::Fail(why)) => return Err(why),
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => r.took = Some(self.start.elapsed()),
            Ok(Err(why)) => r.failure = Some(format!("{}: {why}", self.key)),
            Err(_) => {
                r.failure = Some(format!(
                    "{}: {} of {} events when time ran out",
                    self.key, r.got, r.expected
                ));
            }
        }
        r
    }

    /// One subscription from `last`: every event must be new and in order,
    /// and all `expected` must have arrived when `subscribed` comes.
    async fn once(&self, c: &mut Client, last: &mut u64, got: &mut u64) -> Result<(), Stop> {
        let request = pb::SubscribeRequest {
            sync_keys: vec![self.key.clone()],
            since: Some(*last),
            ..Default::default()
        };
        let mut stream = c
            .subscribe(request)
            .await
            .map_err(|s| stop(&s, "Subscribe"))?
            .into_inner();
        loop {
            let message = stream.message().await.map_err(|s| stop(&s, "stream"))?;
            match message.and_then(|m| m.event) {
                Some(Event::Notification(n)) => self.check(&n, last, got)?,
                Some(Event::Subscribed(_)) if *got == self.expected => return Ok(()),
                Some(Event::Subscribed(_)) => {
                    return Err(Stop::Fail(format!(
                        "subscribed after {got} of {} events",
                        self.expected
                    )));
                }
                Some(Event::Progress(_)) => {}
                None => return Err(Stop::Fail("the stream ended before subscribed".into())),
            }
        }
    }

    fn check(&self, n: &pb::Notification, last: &mut u64, got: &mut u64) -> Result<(), Stop> {
        if n.sync_key != self.key {
            return Err(Stop::Fail(format!(
                "seq {} is of key {}",
                n.seq, n.sync_key
            )));
        }
        if n.seq <= *last {
            return Err(Stop::Fail(format!(
                "seq {} after seq {last}: repeated or out of order",
                n.seq
            )));
        }
        *last = n.seq;
        *got += 1;
        if *got > self.expected {
            return Err(Stop::Fail(format!(
                "more than the {} events written",
                self.expected
            )));
        }
        Ok(())
    }
}

/// The report's headline: the well-behaved clients' latency.
fn report_good(args: &WorkloadArgs, good: Totals, elapsed: Duration) -> Report {
    let (errors, conflicts) = (good.errors, good.conflicts);
    let mut r = good.into_report(args, elapsed);
    r.clients = args.good_clients.max(1);
    r.notes.push(format!(
        "well-behaved: {} clients Put+Get: {} ops, p50 {:.2} p99 {:.2} max {:.2} ms; {errors} errors, {conflicts} conflicts",
        r.clients, r.ops, r.p50_ms, r.p99_ms, r.max_ms
    ));
    if errors > 0 {
        r.failed
            .push(format!("well-behaved clients got {errors} errors"));
    }
    if let Some(limit) = args.good_p99_ms
        && r.p99_ms > limit
    {
        r.failed.push(format!(
            "well-behaved p99 {:.2} ms is over --good-p99-ms {limit}",
            r.p99_ms
        ));
    }
    r
}

fn report_bulk(r: &mut Report, (bulk, elapsed): (Totals, Duration), log: &ErrorLog, bytes: usize) {
    let secs = elapsed.as_secs_f64();
    let docs_per_s = bulk.ops as f64 / secs;
    let calls = bulk.latencies_us.len();
    r.errors += bulk.errors;
    r.insert_extra([
        ("bulk_docs", bulk.ops.into()),
        ("bulk_docs_per_s", docs_per_s.round().into()),
        ("bulk_calls", calls.into()),
        ("bulk_rejected", bulk.rejected.into()),
        ("bulk_errors", bulk.errors.into()),
        ("bulk_request_bytes", bytes.into()),
    ]);
    r.notes.push(format!(
        "bulk: {calls} BulkPuts of {BULK_BATCH} docs ({:.1} MiB each): {docs_per_s:.0} docs/s ({:.1} MiB/s), {} rejected, {} errors",
        bytes as f64 / 1048576.0,
        docs_per_s * DOC_BYTES as f64 / 1048576.0,
        bulk.rejected,
        bulk.errors
    ));
    if bulk.errors > 0 {
        r.failed.push(format!(
            "bulk writers got {} errors: {}",
            bulk.errors,
            log.first()
        ));
    }
}

fn report_pages(r: &mut Report, (paged, elapsed): (Totals, Duration), stats: &PagerStats) {
    let pages = stats.pages.load(Ordering::Relaxed);
    let oversize = stats.oversize.load(Ordering::Relaxed);
    let pages_per_s = pages as f64 / elapsed.as_secs_f64();
    r.errors += paged.errors;
    r.insert_extra([
        ("pages", pages.into()),
        ("pages_per_s", pages_per_s.round().into()),
        ("paged_docs", paged.ops.into()),
        ("pages_oversize", oversize.into()),
        ("pager_rejected", paged.rejected.into()),
        ("pager_errors", paged.errors.into()),
    ]);
    r.notes.push(format!(
        "pagers: {pages_per_s:.1} pages/s, {} docs paged, {oversize} pages over 4 MiB, {} rejected, {} errors",
        paged.ops, paged.rejected, paged.errors
    ));
    if paged.errors > 0 {
        r.failed.push(format!(
            "pagers got {} errors ({oversize} pages over the default 4 MiB receive limit): {}",
            paged.errors,
            stats.log.first()
        ));
    }
}

fn report_subscribers(r: &mut Report, args: &WorkloadArgs, replays: &[Replayed], noop: bool) {
    let delivered: u64 = replays.iter().map(|s| s.got).sum();
    let expected: u64 = replays.iter().map(|s| s.expected).sum();
    let resumes: u64 = replays.iter().map(|s| s.resumes).sum();
    let mut took: Vec<u32> = replays.iter().filter_map(|s| s.took.map(micros)).collect();
    took.sort_unstable();
    let secs = |p: f64| (percentile_ms(&took, p) / 10.0).round() / 100.0;
    r.insert_extra([
        ("subscribers", replays.len().into()),
        ("subscribers_completed", took.len().into()),
        ("notifications_delivered", delivered.into()),
        ("notifications_expected", expected.into()),
        ("subscriber_resumes", resumes.into()),
        ("subscriber_done_p50_s", secs(0.5).into()),
        ("subscriber_done_p99_s", secs(0.99).into()),
        ("subscriber_done_max_s", secs(1.0).into()),
    ]);
    if noop {
        r.notes
            .push("no-op server replays nothing: subscriber checks skipped".into());
        return;
    }
    r.notes.push(format!(
        "subscribers: {}/{} replayed {} events on {} keys: {delivered}/{expected} notifications, {resumes} resumes, done in p50 {} p99 {} max {} s",
        took.len(),
        replays.len(),
        args.events(),
        args.keys.max(1),
        secs(0.5),
        secs(0.99),
        secs(1.0)
    ));
    let failures: Vec<&str> = replays
        .iter()
        .filter_map(|s| s.failure.as_deref())
        .collect();
    if !failures.is_empty() {
        r.errors += failures.len() as u64;
        let first: Vec<&str> = failures.iter().take(3).copied().collect();
        r.failed.push(format!(
            "{} of {} subscribers failed: {}",
            failures.len(),
            replays.len(),
            first.join("; ")
        ));
    }
}

fn report_rss(r: &mut Report, args: &WorkloadArgs, pid: Option<u32>, samples: &[u64]) {
    if pid.is_none() {
        r.notes
            .push("no --server-pid: the server's RSS was not sampled".into());
        return;
    }
    let peak = samples.iter().copied().max().unwrap_or(0);
    r.insert_extra([
        ("peak_rss_kb", peak.into()),
        ("rss_samples", samples.len().into()),
    ]);
    r.notes.push(format!(
        "server RSS peak {:.1} MB ({} samples every {} ms)",
        peak as f64 / 1024.0,
        samples.len(),
        RSS_PERIOD.as_millis()
    ));
    if let Some(limit) = args.max_rss_mb
        && peak > limit * 1024
    {
        r.failed.push(format!(
            "server RSS peaked at {:.1} MB, over --max-rss-mb {limit}",
            peak as f64 / 1024.0
        ));
    }
}
