//! agsync-bench: drives an agsync server (or the no-op server, the ceiling
//! of any tonic server on the same machine) over gRPC with many concurrent
//! clients spread over a few HTTP/2 connections, and reports throughput,
//! latency percentiles, errors and the server's RSS: a human table and one
//! JSON line per run.
//!
//! `run` measures a running server (`run.rs` dispatches to the workload);
//! `noop` serves the no-op server; `compare` starts agsync and the no-op
//! server (and, if asked, agsync with metrics scraped, agsync on
//! PostgreSQL with one and two nodes, and etcd) one after another with a
//! fresh database each run, runs the workload against each `--runs` times
//! and prints medians and the ratios.

// Message literals end with `..Default::default()` even when they name every
// field today, so fields added to the proto do not break the bench.
#![allow(clippy::needless_update)]

mod churn;
mod etcd;
mod hostile;
mod noop;
mod run;
mod walsoak;
mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncBufReadExt, BufReader};

use workloads::Report;

#[derive(Parser)]
#[command(
    name = "agsync-bench",
    about = "Benchmarks agsync against a no-op gRPC ceiling"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a workload against a running server.
    Run {
        /// The server to drive.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: SocketAddr,
        /// The server's pid, to report its RSS (from /proc).
        #[arg(long)]
        server_pid: Option<u32>,
        /// Name of the server in the report.
        #[arg(long, default_value = "agsync")]
        label: String,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Serves the no-op server (same proto, every RPC returns at once).
    Noop {
        #[arg(long, default_value = "127.0.0.1:50052")]
        listen: SocketAddr,
    },
    /// Starts agsync and the no-op server, runs the workload against each
    /// `--runs` times (alternating, a fresh agsync database each time), and
    /// prints the medians and agsync's ratio to the ceiling.
    Compare {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Extra flags for the agsync server, e.g. "--retain-events=2000000".
        #[arg(long, allow_hyphen_values = true)]
        server_arg: Vec<String>,
        /// Where the agsync server keeps its database (a temp dir by default;
        /// its filesystem matters for fsync-bound workloads).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A PostgreSQL server the bench may create databases on (e.g. the
        /// URL `scripts/pg-throwaway start` prints). Adds two servers to
        /// each run: one agsync node on PostgreSQL ("agsync-pg"), and two
        /// nodes on one database with the clients split over both
        /// ("agsync-pg2"); each gets a fresh database, dropped after.
        #[arg(long)]
        postgres: Option<String>,
        /// Adds agsync with `--metrics-listen`, scraped once a second during
        /// the run ("agsync-metrics"), to measure what the metrics cost.
        #[arg(long)]
        metrics: bool,
        /// Adds a peer to compare with: `etcd` starts Debian's etcd-server
        /// (the `etcd` binary on PATH) on loopback with a fresh data dir for
        /// each run and drives it with the closest etcd calls (see
        /// BENCHMARKS.md).
        #[arg(long, value_enum)]
        peer: Option<Peer>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// etcd v3 (Debian's etcd-server), one member, default durability.
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Puts of new documents.
    Create,
    /// Each client CAS-updates its own documents, carrying the last rev.
    Update,
    /// All clients CAS-update the same 10 documents.
    Contended,
    /// Gets of random preloaded documents.
    Get,
    /// BulkPut of `--batch` new documents per call.
    Bulk,
    /// `--subscribers` on one key, a writer doing spaced Puts.
    Fanout,
    /// One subscriber replays `--events` logged events from since=0.
    Replay,
    /// Only fills a database with `--docs` documents.
    Preload,
    /// Writers and subscribers together for the whole duration; fails on any
    /// error other than a conflict or any undelivered event.
    Soak,
    /// `--clients` CAS-updaters plus `--clients` creators for the whole
    /// duration while the server's WAL (`--db-file`-wal) is sampled every
    /// second; fails on any error other than a conflict, or on a sample over
    /// `--wal-max-bytes`.
    WalSoak,
    /// After an untimed setup (`--docs` documents of ~100 KiB, `--events`
    /// Notify events over `--keys` keys), runs together: `--bulk-clients`
    /// ~15.2 MiB BulkPuts, `--pager-clients` paging Changes with bodies under
    /// the default 4 MiB receive limit, `--subscribers` replaying their key
    /// from since=0, and `--good-clients` small Put/Get clients whose latency
    /// is the headline. Fails on a missed or repeated event, an oversized
    /// page, any real error, or `--max-rss-mb` / `--good-p99-ms` exceeded.
    Hostile,
    /// Puts at `--rate` per second from `--clients` writers on the first
    /// node, one subscriber on the last (with `compare --postgres`, the
    /// other node of a pair): write→notification latency. Fails if an
    /// acknowledged write is not delivered.
    CrossNode,
    /// `--subscribers` streams that each leave and subscribe again with
    /// `since`, `--rate` resubscribes per second in all, while `--clients`
    /// writers Put: latency of a resubscribe (to `subscribed`). Fails
    /// unless every stream's history is exactly the acknowledged writes.
    Churn,
}

#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Concurrent clients (writers for soak; each of the two writer groups of
    /// wal-soak; the setup writers of hostile).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How long the measured phase runs.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Documents preloaded first (get, update, wal-soak; preload's target;
    /// hostile's ~100 KiB documents).
    #[arg(long, default_value_t = 10_000)]
    pub docs: usize,
    /// Subscribers (fanout, soak: default 1000; hostile: default 5000).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Share of the fanout subscribers that listen to the key written; the
    /// others listen to a key nobody writes (idle streams the server holds
    /// while it fans out to the rest).
    #[arg(long, default_value_t = 1.0)]
    pub listening_fraction: f64,
    /// Most Subscribe (or etcd Watch) streams the bench opens on one HTTP/2
    /// connection; the subscribers take as many connections as that needs
    /// (100,000 streams at the default: 1,000 connections).
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Documents per BulkPut (bulk).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Events logged before the replay (replay: default 1000000; hostile:
    /// default 100000, spread over `--keys`).
    #[arg(long)]
    pub events: Option<usize>,
    /// Time between the writer's Puts (fanout; each writer's, churn).
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// The server's SQLite database file, its `--db` (wal-soak; required
    /// there). The WAL is sampled from `PATH-wal`, the shared memory from
    /// `PATH-shm`. `compare` sets it to the database it creates.
    #[arg(long)]
    pub db_file: Option<PathBuf>,
    /// Fail wal-soak when any sample of the WAL is bigger than this. Pass the
    /// server's own bound to the server too (`--server-arg=--wal-max-bytes=N`
    /// with `compare`).
    #[arg(long)]
    pub wal_max_bytes: Option<u64>,
    /// Sync keys the events are spread over (hostile).
    #[arg(long, default_value_t = 100)]
    pub keys: usize,
    /// Clients looping ~15.2 MiB BulkPuts (hostile).
    #[arg(long, default_value_t = 64)]
    pub bulk_clients: usize,
    /// Clients paging Changes with bodies (hostile).
    #[arg(long, default_value_t = 32)]
    pub pager_clients: usize,
    /// Well-behaved clients doing small Puts and Gets (hostile).
    #[arg(long, default_value_t = 8)]
    pub good_clients: usize,
    /// Fail hostile when the server's peak RSS exceeds this (needs
    /// `--server-pid`).
    #[arg(long)]
    pub max_rss_mb: Option<u64>,
    /// Fail hostile when the well-behaved clients' p99 latency exceeds this.
    #[arg(long)]
    pub good_p99_ms: Option<f64>,
    /// Writes per second (cross-node); resubscribes per second (churn).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Cmd::Noop { listen } => match noop::serve(listen).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("no-op server failed: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Cmd::Run {
            addr,
            server_pid,
            label,
            workload,
        } => match run::run(&[addr], server_pid, &workload).await {
            Ok(report) => {
                let report = Report {
                    server: label,
                    ..report
                };
                print_table(&[&report]);
                println!("{}", report.json());
                exit_for(&report)
            }
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Cmd::Compare {
            runs,
            server_arg,
            data_dir,
            postgres,
            metrics,
            peer,
            workload,
        } => match tokio::select! {
            // Stopping the comparison drops the servers it started (each is
            // killed on drop) and their scratch directories.
            r = compare(
                runs,
                &server_arg,
                data_dir,
                postgres.as_deref(),
                metrics,
                peer,
                &workload,
            ) => r,
            why = interrupted() => Err(format!("{why}: stopped the servers it started")),
        } {
            Ok(ok) => {
                if ok {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted (SIGINT)",
            _ = term.recv() => "terminated (SIGTERM)",
        },
        _ => std::future::pending().await,
    }
}

fn exit_for(report: &Report) -> std::process::ExitCode {
    if report.failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("FAILED: {}", report.failed.join("; "));
        std::process::ExitCode::FAILURE
    }
}

/// A server started for a comparison; killed on drop.
struct Child {
    process: tokio::process::Child,
    addr: SocketAddr,
    pid: u32,
}

async fn spawn(program: &std::path::Path, args: &[String]) -> Result<Child, String> {
    let mut process = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = process.id().ok_or("no pid")?;
    let mut lines = BufReader::new(process.stderr.take().ok_or("no stderr")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.contains("metrics listening")
                && let Some(rest) = line.split("address=").nth(1)
                && let Some(addr) = rest.split_whitespace().next()
            {
                return addr.parse::<SocketAddr>().map_err(|e| e.to_string());
            }
        }
        Err("the server exited before listening".to_owned())
    })
    .await
    .map_err(|_| "the server did not start within 60 s".to_owned())??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Child { process, addr, pid })
}

/// A free loopback port (bound, then released for the server to take).
fn free_port() -> Result<SocketAddr, String> {
    free_ports::<1>().map(|[port]| port)
}

/// `N` distinct free loopback ports: all are held until all are chosen.
fn free_ports<const N: usize>() -> Result<[SocketAddr; N], String> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free port: {e}"))?;
    let addrs = listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free port: {e}"))?;
    addrs.try_into().map_err(|_| "no free port".to_owned())
}

/// Scrapes `http://addr/metrics` once a second, as a busy Prometheus would
/// (it usually scrapes every 15 s), reading each page to its end.
async fn scrape_every_second(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            let request = format!("GET /metrics HTTP/1.0\r\nhost: {addr}\r\n\r\n");
            let mut page = Vec::new();
            if stream.write_all(request.as_bytes()).await.is_ok() {
                let _ = stream.read_to_end(&mut page).await;
            }
        }
    }
}

/// The servers a comparison runs against, in the order of the first run.
const SERVERS: [&str; 6] = [
    "agsync",
    "agsync-metrics",
    "agsync-pg",
    "agsync-pg2",
    "etcd",
    "noop",
];

async fn compare(
    runs: usize,
    server_args: &[String],
    data_dir: Option<PathBuf>,
    postgres: Option<&str>,
    metrics: bool,
    peer: Option<Peer>,
    workload: &WorkloadArgs,
) -> Result<bool, String> {
    if peer == Some(Peer::Etcd) && !etcd::runs(workload.workload) {
        return Err(format!(
            "etcd has no counterpart for {}: --peer etcd runs {}",
            workload.workload_name(),
            etcd::WORKLOADS
        ));
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let agsync = me.with_file_name("agsync");
    let servers: Vec<&str> = SERVERS
        .into_iter()
        .filter(|s| postgres.is_some() || !s.starts_with("agsync-pg"))
        .filter(|s| metrics || *s != "agsync-metrics")
        .filter(|s| peer == Some(Peer::Etcd) || *s != "etcd")
        .collect();
    let mut reports: Vec<Report> = Vec::new();
    for run in 0..runs {
        // Alternate the order, so drift affects every server alike.
        let mut order = servers.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let dir = TempDir::new(data_dir.as_deref(), run)?;
            let db_file = dir.0.join("bench.db");
            // wal-soak samples the files of the SQLite database this run
            // created; the other servers have none.
            let run_args = WorkloadArgs {
                db_file: (which == "agsync").then(|| db_file.clone()),
                ..workload.clone()
            };
            let node_args = |db: &str| {
                let mut args = vec![
                    "--listen".to_owned(),
                    "127.0.0.1:0".to_owned(),
                    "--db".to_owned(),
                    db.to_owned(),
                ];
                args.extend(server_args.iter().cloned());
                args
            };
            if which == "etcd" {
                let etcd = etcd::Etcd::start(&dir.0, workload.batch).await?;
                let report = etcd::run(etcd.addr, etcd.pid, &run_args).await;
                etcd.stop().await;
                let mut report = report?;
                report.server = which.to_owned();
                report.run = run;
                println!("{}", report.json());
                reports.push(report);
                continue;
            }
            let mut scratch = None;
            let mut scraper = None;
            let children = match which {
                "agsync" => vec![spawn(&agsync, &node_args(&db_file.display().to_string())).await?],
                "agsync-metrics" => {
                    let metrics_addr = free_port()?;
                    let mut args = node_args(&db_file.display().to_string());
                    args.extend(["--metrics-listen".to_owned(), metrics_addr.to_string()]);
                    let child = spawn(&agsync, &args).await?;
                    scraper = Some(tokio::spawn(scrape_every_second(metrics_addr)));
                    vec![child]
                }
                "noop" => vec![
                    spawn(
                        &me,
                        &[
                            "noop".to_owned(),
                            "--listen".to_owned(),
                            "127.0.0.1:0".to_owned(),
                        ],
                    )
                    .await?,
                ],
                pg => {
                    let admin = postgres.ok_or("no --postgres")?;
                    let db = ScratchPg::create(admin, run, pg).await?;
                    let nodes = if pg == "agsync-pg2" { 2 } else { 1 };
                    let mut children = Vec::new();
                    for _ in 0..nodes {
                        children.push(spawn(&agsync, &node_args(&db.url)).await?);
                    }
                    scratch = Some(db);
                    children
                }
            };
            let addrs: Vec<SocketAddr> = children.iter().map(|c| c.addr).collect();
            let mut report = run::run(&addrs, Some(children[0].pid), &run_args).await?;
            report.server = which.to_owned();
            report.run = run;
            println!("{}", report.json());
            reports.push(report);
            if let Some(scraper) = scraper {
                scraper.abort();
            }
            for mut child in children {
                let _ = child.process.kill().await;
            }
            if let Some(db) = scratch {
                db.drop_database().await?;
            }
        }
    }
    let medians: Vec<Report> = servers
        .iter()
        .map(|s| {
            let of: Vec<&Report> = reports.iter().filter(|r| r.server == *s).collect();
            if matches!(workload.workload, Workload::Fanout | Workload::CrossNode) {
                Report::median_latency(&of)
            } else {
                Report::median(&of)
            }
        })
        .collect();
    print_table(&medians.iter().collect::<Vec<_>>());
    let median = |server: &str| {
        medians
            .iter()
            .find(|r| r.server == server)
            .cloned()
            .unwrap_or_default()
    };
    let (a, n) = (median("agsync"), median("noop"));
    let throughput_workload = !matches!(
        workload.workload,
        Workload::Fanout | Workload::Replay | Workload::Hostile | Workload::CrossNode
    );
    let ratio = |x: &Report, y: &Report| {
        if throughput_workload && y.ops_per_s > 0.0 {
            x.ops_per_s / y.ops_per_s
        } else {
            0.0
        }
    };
    if throughput_workload {
        for r in &medians {
            if r.server != "noop" && n.ops_per_s > 0.0 {
                println!(
                    "{} / no-op ceiling: {:.1}% of throughput (medians of {runs} runs)",
                    r.server,
                    100.0 * ratio(r, &n)
                );
            }
        }
    }
    let mut summary = serde_json::json!({
        "summary": workload.workload_name(),
        "agsync_ops_per_s": a.ops_per_s,
        "noop_ops_per_s": n.ops_per_s,
        "ratio": ratio(&a, &n),
        "agsync_p50_ms": a.p50_ms,
        "agsync_p99_ms": a.p99_ms,
        "noop_p99_ms": n.p99_ms,
        "runs": runs,
    });
    if postgres.is_some()
        && let Some(obj) = summary.as_object_mut()
    {
        for (key, server) in [("pg", "agsync-pg"), ("pg2", "agsync-pg2")] {
            let r = median(server);
            obj.insert(format!("{key}_ops_per_s"), r.ops_per_s.into());
            obj.insert(format!("{key}_p50_ms"), r.p50_ms.into());
            obj.insert(format!("{key}_p99_ms"), r.p99_ms.into());
            obj.insert(format!("{key}_vs_sqlite"), ratio(&r, &a).into());
        }
    }
    if metrics && let Some(obj) = summary.as_object_mut() {
        let r = median("agsync-metrics");
        obj.insert("metrics_ops_per_s".into(), r.ops_per_s.into());
        obj.insert("metrics_p99_ms".into(), r.p99_ms.into());
        obj.insert("metrics_vs_off".into(), ratio(&r, &a).into());
    }
    if peer == Some(Peer::Etcd)
        && let Some(obj) = summary.as_object_mut()
    {
        let e = median("etcd");
        obj.insert("etcd_ops_per_s".into(), e.ops_per_s.into());
        obj.insert("etcd_p50_ms".into(), e.p50_ms.into());
        obj.insert("etcd_p99_ms".into(), e.p99_ms.into());
        println!("{}", versus_etcd(workload.workload, &a, &e, &n, runs, obj));
    }
    println!("{summary}");
    let failures: Vec<&String> = reports
        .iter()
        .filter(|r| r.server != "noop")
        .flat_map(|r| &r.failed)
        .collect();
    for f in &failures {
        eprintln!("FAILED: {f}");
    }
    Ok(failures.is_empty())
}

/// The line comparing agsync's medians `a` with etcd's `e` (and the no-op
/// ceiling `n`); adds the ratios to the summary `obj`.
fn versus_etcd(
    workload: Workload,
    a: &Report,
    e: &Report,
    n: &Report,
    runs: usize,
    obj: &mut serde_json::Map<String, serde_json::Value>,
) -> String {
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    let kb = |r: &Report, key: &str| r.extra.get(key).and_then(serde_json::Value::as_f64);
    match workload {
        Workload::Fanout => {
            let p99 = ratio(a.p99_ms, e.p99_ms);
            let (ar, er) = (
                kb(a, "subscribed_rss_kb").unwrap_or(0.0),
                kb(e, "subscribed_rss_kb").unwrap_or(0.0),
            );
            obj.insert("p99_vs_etcd".into(), p99.into());
            obj.insert("rss_vs_etcd".into(), ratio(ar, er).into());
            format!(
                "agsync vs etcd: p99 {:.1} ms vs {:.1} ms ({p99:.2}x), RSS with subscribers {:.1} MB vs {:.1} MB ({:.2}x) (medians of {runs} runs)",
                a.p99_ms,
                e.p99_ms,
                ar / 1024.0,
                er / 1024.0,
                ratio(ar, er)
            )
        }
        _ => {
            let x = ratio(a.ops_per_s, e.ops_per_s);
            obj.insert("agsync_vs_etcd".into(), x.into());
            obj.insert(
                "etcd_vs_ceiling".into(),
                ratio(e.ops_per_s, n.ops_per_s).into(),
            );
            format!(
                "agsync / etcd: {x:.2}x throughput ({:.0} vs {:.0} ops/s), p99 {:.2} ms vs {:.2} ms (medians of {runs} runs)",
                a.ops_per_s, e.ops_per_s, a.p99_ms, e.p99_ms
            )
        }
    }
}

/// A fresh PostgreSQL database for one run, created through `admin` (a URL
/// of any database on the server) and dropped after.
struct ScratchPg {
    admin: String,
    name: String,
    url: String,
}

impl ScratchPg {
    async fn create(admin: &str, run: usize, server: &str) -> Result<ScratchPg, String> {
        use sqlx::Connection;
        let name = format!(
            "agsync_bench_{}_{run}_{}",
            std::process::id(),
            server.replace('-', "_")
        );
        let mut conn = sqlx::PgConnection::connect(admin)
            .await
            .map_err(|e| format!("cannot connect to --postgres: {e}"))?;
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        let _ = conn.close().await;
        // The same server and parameters, another database.
        let (base, query) = admin
            .split_once('?')
            .map_or((admin, None), |(b, q)| (b, Some(q)));
        let (server_part, _) = base.rsplit_once('/').ok_or("--postgres has no /database")?;
        let url = match query {
            Some(q) => format!("{server_part}/{name}?{q}"),
            None => format!("{server_part}/{name}"),
        };
        Ok(ScratchPg {
            admin: admin.to_owned(),
            url,
            name,
        })
    }

    async fn drop_database(self) -> Result<(), String> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin)
            .await
            .map_err(|e| format!("cannot connect to --postgres: {e}"))?;
        sqlx::Executor::execute(
            &mut conn,
            format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str(),
        )
        .await
        .map_err(|e| format!("cannot drop database {}: {e}", self.name))?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// A scratch directory for one server's database, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: Option<&std::path::Path>, run: usize) -> Result<TempDir, String> {
        let parent = parent.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = parent.join(format!("agsync-bench-{}-{run}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl WorkloadArgs {
    /// The name given on the command line, e.g. "wal-soak".
    pub fn workload_name(&self) -> String {
        self.workload
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned())
    }

    /// `--subscribers`, or the workload's default.
    /// How many of the fanout subscribers listen to the key written
    /// (`--listening-fraction`), at least one.
    pub fn listening(&self) -> usize {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let n =
            (self.subscribers() as f64 * self.listening_fraction.clamp(0.0, 1.0)).round() as usize;
        n.clamp(1, self.subscribers().max(1))
    }

    pub fn subscribers(&self) -> usize {
        let default = if self.workload == Workload::Hostile {
            5000
        } else {
            1000
        };
        self.subscribers.unwrap_or(default)
    }

    /// `--events`, or the workload's default.
    pub fn events(&self) -> usize {
        let default = if self.workload == Workload::Hostile {
            100_000
        } else {
            1_000_000
        };
        self.events.unwrap_or(default)
    }
}

fn print_table(reports: &[&Report]) {
    println!(
        "{:<10} {:<10} {:>7} {:>12} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10}",
        "server",
        "workload",
        "clients",
        "ops",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "conflicts",
        "rss MB"
    );
    for r in reports {
        println!(
            "{:<10} {:<10} {:>7} {:>12} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>9} {:>10.1}",
            r.server,
            r.workload,
            r.clients,
            r.ops,
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
            r.conflicts,
            r.rss_end_kb as f64 / 1024.0
        );
        for note in &r.notes {
            println!("         {note}");
        }
    }
}
