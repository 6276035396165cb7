//! agsync-bench: drives an agsync server (or the no-op server, the ceiling
//! of any tonic server on the same machine) over gRPC with many concurrent
//! clients spread over a few HTTP/2 connections, and reports throughput,
//! latency percentiles, errors and the server's RSS: a human table and one
//! JSON line per run.
//!
//! `run` measures a running server; `noop` serves the no-op server;
//! `compare` starts both side by side (fresh database each run), runs the
//! workload against each `--runs` times and prints medians and the ratio.

// Message literals end with `..Default::default()` even when they name every
// field today, so fields added to the proto do not break the bench.
#![allow(clippy::needless_update)]

mod hostile;
mod noop;
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
        #[command(flatten)]
        workload: WorkloadArgs,
    },
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
    /// ~15.5 MiB BulkPuts, `--pager-clients` paging Changes with bodies under
    /// the default 4 MiB receive limit, `--subscribers` replaying their key
    /// from since=0, and `--good-clients` small Put/Get clients whose latency
    /// is the headline. Fails on a missed or repeated event, an oversized
    /// page, any real error, or `--max-rss-mb` / `--good-p99-ms` exceeded.
    Hostile,
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
    /// Documents per BulkPut (bulk).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Events logged before the replay (replay: default 1000000; hostile:
    /// default 100000, spread over `--keys`).
    #[arg(long)]
    pub events: Option<usize>,
    /// Time between the writer's Puts (fanout).
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
    /// Clients looping ~15.5 MiB BulkPuts (hostile).
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
        } => match workloads::run(addr, server_pid, &workload).await {
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
            workload,
        } => match compare(runs, &server_arg, data_dir, &workload).await {
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
            if let Some(rest) = line.split("address=").nth(1)
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

async fn compare(
    runs: usize,
    server_args: &[String],
    data_dir: Option<PathBuf>,
    workload: &WorkloadArgs,
) -> Result<bool, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let agsync = me.with_file_name("agsync");
    let mut reports: Vec<Report> = Vec::new();
    for run in 0..runs {
        // Alternate which server goes first, so drift affects both alike.
        let order = if run % 2 == 0 {
            ["agsync", "noop"]
        } else {
            ["noop", "agsync"]
        };
        for which in order {
            let dir = TempDir::new(data_dir.as_deref(), run)?;
            let db_file = dir.0.join("bench.db");
            // wal-soak samples the files of the database this run created;
            // the no-op server has none.
            let run_args = WorkloadArgs {
                db_file: (which == "agsync").then(|| db_file.clone()),
                ..workload.clone()
            };
            let mut child = if which == "agsync" {
                let mut args = vec![
                    "--listen".to_owned(),
                    "127.0.0.1:0".to_owned(),
                    "--db".to_owned(),
                    db_file.display().to_string(),
                ];
                args.extend(server_args.iter().cloned());
                spawn(&agsync, &args).await?
            } else {
                spawn(
                    &me,
                    &[
                        "noop".to_owned(),
                        "--listen".to_owned(),
                        "127.0.0.1:0".to_owned(),
                    ],
                )
                .await?
            };
            let mut report = workloads::run(child.addr, Some(child.pid), &run_args).await?;
            report.server = which.to_owned();
            report.run = run;
            println!("{}", report.json());
            reports.push(report);
            let _ = child.process.kill().await;
        }
    }
    let agsync_runs: Vec<&Report> = reports.iter().filter(|r| r.server == "agsync").collect();
    let noop_runs: Vec<&Report> = reports.iter().filter(|r| r.server == "noop").collect();
    let a = Report::median(&agsync_runs);
    let n = Report::median(&noop_runs);
    print_table(&[&a, &n]);
    let throughput_workload = !matches!(
        workload.workload,
        Workload::Fanout | Workload::Replay | Workload::Hostile
    );
    if throughput_workload && n.ops_per_s > 0.0 {
        println!(
            "agsync / no-op ceiling: {:.1}% of throughput (medians of {runs} runs)",
            100.0 * a.ops_per_s / n.ops_per_s
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "summary": workload.workload_name(),
            "agsync_ops_per_s": a.ops_per_s,
            "noop_ops_per_s": n.ops_per_s,
            "ratio": if throughput_workload && n.ops_per_s > 0.0 { a.ops_per_s / n.ops_per_s } else { 0.0 },
            "agsync_p99_ms": a.p99_ms,
            "noop_p99_ms": n.p99_ms,
            "runs": runs,
        })
    );
    let failures: Vec<&String> = agsync_runs.iter().flat_map(|r| &r.failed).collect();
    for f in &failures {
        eprintln!("FAILED: {f}");
    }
    Ok(failures.is_empty())
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
        "{:<8} {:<10} {:>7} {:>12} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10}",
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
            "{:<8} {:<10} {:>7} {:>12} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>9} {:>10.1}",
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
