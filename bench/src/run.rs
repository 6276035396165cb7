//! Runs one workload against running servers: opens the connections and
//! clients, creates the bench database, and dispatches to the workload's
//! driver (in `workloads`, or a module of its own for the long ones:
//! `hostile`, `walsoak`). The one place that knows every workload, so the
//! drivers import only the shared helpers of `workloads`, never each other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agsync::pb;

use crate::workloads::{
    Client, Report, body, clients, connections, contended, create_database, create_once,
    cross_node, drive, fanout, outcome, preload, replay, rss_kb, soak, update, xorshift,
};
use crate::{Workload, WorkloadArgs, churn, hostile, walsoak};

/// Runs the workload against the nodes `addrs` (one, or several serving
/// one data set): the clients' connections are spread round-robin over
/// them; the workloads that open extra streams open them on the first.
pub async fn run(
    addrs: &[SocketAddr],
    pid: Option<u32>,
    args: &WorkloadArgs,
) -> Result<Report, String> {
    let addr = *addrs.first().ok_or("no server address")?;
    let mut channels = Vec::new();
    for i in 0..args.connections.max(addrs.len()) {
        channels.extend(connections(addrs[i % addrs.len()], 1).await?);
    }
    let all = clients(&channels, args.clients.max(1));
    let duration = Duration::from_secs_f64(args.duration_secs);
    let mut admin = all[0].clone();
    let db = "bench";
    create_database(&mut admin, db, "bench.key").await?;
    let mut report = match args.workload {
        Workload::Create => {
            let states: Vec<(Client, usize)> =
                all.into_iter().enumerate().map(|(k, c)| (c, k)).collect();
            let rss = rss_kb(pid);
            let (totals, elapsed) = drive(states, duration, |(mut c, k), n| async move {
                let out = create_once(&mut c, format!("c{k}-{n}"), n).await;
                ((c, k), out)
            })
            .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            r
        }
        Workload::Update => update(args, pid, all, duration).await?,
        Workload::Contended => contended(args, pid, all, duration).await?,
        Workload::Get => {
            preload(&all, db, args.docs).await?;
            let n_docs = args.docs.max(1) as u64;
            let states: Vec<(Client, u64)> = all
                .into_iter()
                .enumerate()
                .map(|(k, c)| (c, 0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1)))
                .collect();
            let rss = rss_kb(pid);
            let (totals, elapsed) =
                drive(states, duration, move |(mut c, mut seed), _| async move {
                    let id = format!("p{}", xorshift(&mut seed) % n_docs);
                    let r = c
                        .get(pb::GetRequest {
                            database: "bench".into(),
                            id,
                            ..Default::default()
                        })
                        .await;
                    ((c, seed), outcome(r, 1))
                })
                .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            r
        }
        Workload::Bulk => {
            let batch = args.batch.max(1);
            let states: Vec<(Client, usize)> =
                all.into_iter().enumerate().map(|(k, c)| (c, k)).collect();
            let rss = rss_kb(pid);
            let (totals, elapsed) = drive(states, duration, move |(mut c, k), n| async move {
                let docs = (0..batch)
                    .map(|i| pb::BulkPutItem {
                        id: format!("b{k}-{n}-{i}"),
                        body: Some(body(n)),
                        ..Default::default()
                    })
                    .collect();
                let r = c
                    .bulk_put(pb::BulkPutRequest {
                        database: "bench".into(),
                        docs,
                        ..Default::default()
                    })
                    .await;
                let ok = match &r {
                    Ok(resp) => resp
                        .get_ref()
                        .results
                        .iter()
                        .filter(|x| x.error.is_empty())
                        .count() as u64,
                    Err(_) => 0,
                };
                ((c, k), outcome(r, ok))
            })
            .await;
            let mut r = totals.into_report(args, elapsed);
            r.rss_start_kb = rss;
            r.notes.push(format!(
                "ops are documents; latency is per BulkPut of {batch}"
            ));
            r
        }
        Workload::Preload => {
            let start = Instant::now();
            preload(&all, db, args.docs).await?;
            let elapsed = start.elapsed();
            Report {
                workload: args.workload_name(),
                clients: 8.min(args.clients),
                ops: args.docs as u64,
                ops_per_s: args.docs as f64 / elapsed.as_secs_f64(),
                ..Default::default()
            }
        }
        Workload::Fanout => fanout(addr, args, pid, &channels, all, duration).await?,
        Workload::Replay => replay(args, pid, all).await?,
        Workload::Soak => soak(addr, args, pid, &channels, all, duration).await?,
        Workload::WalSoak => walsoak::run(args, pid, &channels, duration).await?,
        Workload::Hostile => hostile::run(addr, args, pid, &channels, all, duration).await?,
        Workload::CrossNode => cross_node(addrs, args, pid, duration).await?,
        Workload::Churn => churn::run(addr, args, pid, all, duration).await?,
    };
    report.workload = args.workload_name();
    report.rss_end_kb = rss_kb(pid);
    if report.rss_start_kb == 0 {
        report.rss_start_kb = report.rss_end_kb;
    }
    Ok(report)
}
