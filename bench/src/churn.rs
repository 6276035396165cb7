//! `churn`: `--subscribers` streams on one key, all opened first (256 at a
//! time), then for the measured time each leaves and subscribes again with
//! `since` (the last seq it saw), `--rate` resubscribes per second in all,
//! while `--clients` writers Put new documents, each one every
//! `--interval-ms`. Each stream's whole history must be every acknowledged
//! write, in order, once: no gap, no duplicate. The latency is a
//! resubscribe's, from the Subscribe call to its `subscribed` event (after
//! the replay of what it missed), counted while the writers write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agsync::pb::{self, subscribe_response::Event};
use tonic::transport::Channel;

use crate::WorkloadArgs;
use crate::workloads::{
    Client, Report, Totals, clients, micros, put_request, rss_kb, stream_channels, xorshift,
};

/// What one subscriber saw: its history, and each resubscribe's latency.
#[derive(Default)]
struct Seen {
    history: Vec<u64>,
    latencies_us: Vec<u32>,
    errors: u64,
}

pub(crate) async fn run(
    addr: SocketAddr,
    args: &WorkloadArgs,
    pid: Option<u32>,
    all: Vec<Client>,
    duration: Duration,
) -> Result<Report, String> {
    let subscribers = args.subscribers();
    let channels: Vec<Channel> =
        stream_channels(addr, &[], subscribers, args.streams_per_connection).await?;
    // Each stream stays subscribers/rate seconds on average (±50%).
    let stay = Duration::from_secs_f64(subscribers as f64 / args.rate.max(1) as f64);
    let (last_tx, last_rx) = tokio::sync::watch::channel(None::<u64>);
    let rss_start = rss_kb(pid);
    let phase = Arc::new(Phase {
        opening: tokio::sync::Semaphore::new(crate::workloads::OPENING_AT_ONCE),
        opened: tokio::sync::watch::channel(0usize).0,
        measuring: AtomicBool::new(false),
    });
    let opening = Instant::now();
    let readers: Vec<_> = clients(&channels, subscribers)
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            tokio::spawn(subscriber(
                c,
                k as u64,
                stay,
                last_rx.clone(),
                phase.clone(),
            ))
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(300),
        phase.opened.subscribe().wait_for(|n| *n >= subscribers),
    )
    .await
    .map_err(|_| "the subscribers did not all open within 300 s".to_owned())?
    .map_err(|e| e.to_string())?;
    let open_secs = opening.elapsed().as_secs_f64();
    let rss_open = rss_kb(pid);
    phase.measuring.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(args.interval_ms);
    let writers: Vec<_> = all
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut acked, mut errors) = (Vec::new(), 0u64);
                let mut next = tokio::time::Instant::now();
                for n in 0..u64::MAX {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    next += every;
                    tokio::time::sleep_until(next).await;
                    match c
                        .put(put_request("bench", format!("c{k}-{n}"), String::new(), n))
                        .await
                    {
                        Ok(r) => acked.push(r.into_inner().seq),
                        Err(_) => errors += 1,
                    }
                }
                (acked, errors)
            })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    phase.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let (mut acked, mut write_errors) = (Vec::new(), 0);
    for w in writers {
        let (seqs, errors) = w.await.map_err(|e| e.to_string())?;
        acked.extend(seqs);
        write_errors += errors;
    }
    acked.sort_unstable();
    let _ = last_tx.send(Some(acked.last().copied().unwrap_or(0)));
    let mut totals = Totals::default();
    let (mut complete, mut broken) = (0usize, Vec::new());
    for (k, r) in readers.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .map_err(|_| format!("subscriber {k} did not catch up within 120 s"))?
            .map_err(|e| e.to_string())?;
        totals.ops += seen.latencies_us.len() as u64;
        totals.errors += seen.errors;
        totals.latencies_us.extend(seen.latencies_us);
        if seen.history == acked {
            complete += 1;
        } else if broken.len() < 3 {
            let at = seen
                .history
                .iter()
                .zip(&acked)
                .position(|(h, a)| h != a)
                .unwrap_or(seen.history.len().min(acked.len()));
            broken.push(format!(
                "subscriber {k}: at position {at} heard {:?}, expected {:?} ({} heard, {} acknowledged)",
                seen.history.get(at),
                acked.get(at),
                seen.history.len(),
                acked.len()
            ));
        }
    }
    let resubscribes = totals.ops;
    let mut r = totals.into_report(args, elapsed);
    r.clients = subscribers;
    r.rss_start_kb = rss_start;
    r.insert_extra([
        ("subscribers", serde_json::Value::from(subscribers)),
        ("writes", acked.len().into()),
        ("write_errors", write_errors.into()),
        ("complete_histories", complete.into()),
    ]);
    r.insert_extra([
        ("open_secs", serde_json::Value::from(open_secs)),
        ("rss_open_kb", rss_open.into()),
    ]);
    r.notes.push(format!(
        "{subscribers} streams opened in {open_secs:.1} s (server RSS {:.1} MB), then {resubscribes} resubscribes in {:.1} s ({:.0}/s; latency: Subscribe to `subscribed`, after the replay), {} writes acknowledged; {complete} of {subscribers} histories are exactly the acknowledged writes",
        rss_open as f64 / 1024.0,
        elapsed.as_secs_f64(),
        resubscribes as f64 / elapsed.as_secs_f64(),
        acked.len()
    ));
    if complete != subscribers || write_errors > 0 {
        r.failed.push(format!(
            "{} histories differ from the acknowledged writes, {write_errors} writes failed: {}",
            subscribers - complete,
            broken.join("; ")
        ));
    }
    Ok(r)
}

/// Shared by the subscribers: the opening's permits and count, and whether
/// the measured time runs.
struct Phase {
    opening: tokio::sync::Semaphore,
    opened: tokio::sync::watch::Sender<usize>,
    measuring: AtomicBool,
}

/// Subscribes from 0 (under an opening permit), then leaves after a random
/// share of `stay` (so the leaves are spread from the start), subscribes
/// again from the last seq seen, and from then on leaves after about
/// `stay`; until the last acknowledged seq is known and seen.
async fn subscriber(
    mut c: Client,
    k: u64,
    stay: Duration,
    mut last: tokio::sync::watch::Receiver<Option<u64>>,
    phase: Arc<Phase>,
) -> Seen {
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (k + 1);
    let mut seen = Seen::default();
    let mut since = 0u64;
    let mut first = true;
    loop {
        if last.borrow().is_some_and(|l| since >= l) {
            return seen;
        }
        let mut permit = if first {
            phase.opening.acquire().await.ok()
        } else {
            None
        };
        let called = Instant::now();
        let opened = c
            .subscribe(pb::SubscribeRequest {
                sync_keys: vec!["bench.key".into()],
                since: Some(since),
                ..Default::default()
            })
            .await;
        let Ok(stream) = opened else {
            seen.errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let share = (xorshift(&mut seed) % 1000) as f64 / 1000.0;
        let leave =
            tokio::time::Instant::now() + stay.mul_f64(if first { share } else { 0.5 + share });
        let mut subscribed = false;
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(pb::SubscribeResponse { event: Some(Event::Notification(n)) })) => {
                        since = n.seq;
                        seen.history.push(n.seq);
                    }
                    Ok(Some(pb::SubscribeResponse { event: Some(Event::Subscribed(_)) })) => {
                        subscribed = true;
                        if first {
                            first = false;
                            drop(permit.take());
                            phase.opened.send_modify(|n| *n += 1);
                        } else if phase.measuring.load(Ordering::Relaxed) {
                            seen.latencies_us.push(micros(called.elapsed()));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        seen.errors += 1;
                        break;
                    }
                },
                () = tokio::time::sleep_until(leave), if subscribed => break,
                changed = last.changed() => if changed.is_err() { return seen },
            }
            if last.borrow().is_some_and(|l| since >= l) {
                return seen;
            }
        }
    }
}
