//! The wal-soak workload: sustained updates and creates while the sizes of
//! the server's database, WAL and shared-memory files are sampled every
//! second, to show that the WAL stays within its bound under load and is
//! truncated when the server goes idle. It only reads those files' sizes;
//! it never opens them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::WorkloadArgs;
use crate::workloads::{
    Client, Outcome, Owner, Report, Sampler, clients, create_once, drive, is_noop, own_docs,
    rss_kb, update_once,
};

/// How often the files are sampled.
const PERIOD: Duration = Duration::from_secs(1);
/// How long after the load the server gets to truncate its WAL.
const IDLE: Duration = Duration::from_secs(3);
/// At most this many windows in the curve summary (each at least 10 s).
const CURVE_WINDOWS: u64 = 30;

/// The server's database file and the two files SQLite keeps beside it.
#[derive(Clone)]
struct DbFiles {
    db: PathBuf,
    wal: PathBuf,
    shm: PathBuf,
}

/// The sizes of the three files at one moment, `at` seconds into the load.
#[derive(Debug, Clone, Copy, Default)]
struct Sizes {
    at: f64,
    db: u64,
    wal: u64,
    shm: u64,
}

impl DbFiles {
    /// The files of `--db-file`, which must exist (the server is running).
    fn new(args: &WorkloadArgs) -> Result<DbFiles, String> {
        let db = args.db_file.clone().ok_or(
            "wal-soak needs --db-file PATH: the server's database file (its --db); \
             the WAL is sampled from PATH-wal",
        )?;
        std::fs::metadata(&db).map_err(|e| {
            format!(
                "cannot read the database file {} ({e}); pass the server's --db path as --db-file",
                db.display()
            )
        })?;
        let beside = |suffix: &str| {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            PathBuf::from(name)
        };
        Ok(DbFiles {
            wal: beside("-wal"),
            shm: beside("-shm"),
            db,
        })
    }

    /// The current sizes; a missing file (no WAL yet) counts as 0 bytes.
    fn sizes(&self, since: Instant) -> Sizes {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        Sizes {
            at: since.elapsed().as_secs_f64(),
            db: len(&self.db),
            wal: len(&self.wal),
            shm: len(&self.shm),
        }
    }
}

/// A writer of the soak: an updater of its own documents or a creator.
enum Writer {
    Update(Owner),
    Create(Client, usize),
}

async fn write_once(writer: Writer, n: u64) -> (Writer, Outcome) {
    match writer {
        Writer::Update((mut c, mut docs)) => {
            let out = update_once(&mut c, "bench", &mut docs, n).await;
            (Writer::Update((c, docs)), out)
        }
        Writer::Create(mut c, k) => {
            let out = create_once(&mut c, format!("w{k}-{n}"), n).await;
            (Writer::Create(c, k), out)
        }
    }
}

/// `--clients` updaters and `--clients` creators for `duration`, the files
/// sampled every second, then once more after `IDLE`.
pub(crate) async fn run(
    args: &WorkloadArgs,
    pid: Option<u32>,
    channels: &[Channel],
    duration: Duration,
) -> Result<Report, String> {
    let n = args.clients.max(1);
    let mut all = clients(channels, 2 * n);
    let creators = all.split_off(n);
    let files = if is_noop(&mut all[0].clone()).await? {
        None
    } else {
        Some(DbFiles::new(args)?)
    };
    let (owners, n_docs) = own_docs(all, args.docs).await?;
    let writers: Vec<Writer> = owners
        .into_iter()
        .map(Writer::Update)
        .chain(
            creators
                .into_iter()
                .enumerate()
                .map(|(k, c)| Writer::Create(c, k)),
        )
        .collect();
    let start = Instant::now();
    let sampler = files.clone().map(|f| {
        Sampler::spawn(PERIOD, duration + Duration::from_secs(30), move || {
            f.sizes(start)
        })
    });
    let rss = rss_kb(pid);
    let (totals, elapsed) = drive(writers, duration, write_once).await;
    let mut r = totals.into_report(args, elapsed);
    r.clients = 2 * n;
    r.rss_start_kb = rss;
    r.extra.insert("docs".into(), n_docs.into());
    r.notes.push(format!(
        "{n} updaters of {n_docs} preloaded documents + {n} creators"
    ));
    if r.errors > 0 {
        r.failed
            .push(format!("{} errors other than conflicts", r.errors));
    }
    match (files, sampler) {
        (Some(files), Some(sampler)) => {
            let samples = sampler.finish().await;
            tokio::time::sleep(IDLE).await;
            let idle = files.sizes(start);
            report_files(&mut r, args, &samples, idle);
        }
        _ => r
            .notes
            .push("no-op server: no database files to sample".into()),
    }
    Ok(r)
}

/// Adds the WAL figures, the footprint and the curve to `r`; fails it when
/// a sample is over `--wal-max-bytes`.
fn report_files(r: &mut Report, args: &WorkloadArgs, samples: &[Sizes], idle: Sizes) {
    let mut wal: Vec<u64> = samples.iter().map(|s| s.wal).collect();
    wal.sort_unstable();
    let max = wal.last().copied().unwrap_or(0);
    let median = wal.get(wal.len() / 2).copied().unwrap_or(0);
    let end = samples.last().copied().unwrap_or_default();
    let footprint = end.db + end.wal + end.shm;
    let ratio = footprint as f64 / end.db.max(1) as f64;
    let (window, curve) = curve(samples);
    r.insert_extra([
        ("wal_samples", samples.len().into()),
        ("wal_peak_bytes", max.into()),
        ("wal_median_bytes", median.into()),
        ("wal_last_bytes", end.wal.into()),
        ("wal_after_idle_bytes", idle.wal.into()),
        ("db_bytes_end", end.db.into()),
        ("shm_bytes_end", end.shm.into()),
        ("footprint_end_bytes", footprint.into()),
        ("footprint_ratio", ((ratio * 100.0).round() / 100.0).into()),
        ("wal_curve_window_s", window.into()),
        ("wal_curve_max_bytes", curve.clone().into()),
    ]);
    if let Some(limit) = args.wal_max_bytes {
        r.extra.insert("wal_limit_bytes".into(), limit.into());
    }
    r.notes.push(format!(
        "WAL max {} median {} last {} after {}s idle {}; db {} at the end, footprint {} ({ratio:.2}x the db)",
        mib(max),
        mib(median),
        mib(end.wal),
        IDLE.as_secs(),
        mib(idle.wal),
        mib(end.db),
        mib(footprint),
    ));
    let curve: Vec<String> = curve.iter().map(|b| format!("{:.1}", mb(*b))).collect();
    r.notes.push(format!(
        "WAL max per {window} s window (MiB): {}",
        curve.join(" ")
    ));
    fail_over_limit(r, args.wal_max_bytes, samples.iter().chain([&idle]));
}

/// Fails `r` at the first sample whose WAL is over `limit`.
fn fail_over_limit<'a>(
    r: &mut Report,
    limit: Option<u64>,
    mut samples: impl Iterator<Item = &'a Sizes>,
) {
    let Some(limit) = limit else { return };
    if let Some(over) = samples.find(|s| s.wal > limit) {
        r.failed.push(format!(
            "WAL was {} bytes at {:.0} s, over --wal-max-bytes {limit}",
            over.wal, over.at
        ));
    }
}

/// The WAL's maximum per window, windows of 10 s or more so that there are
/// at most `CURVE_WINDOWS`; returns the window length and the maxima.
fn curve(samples: &[Sizes]) -> (u64, Vec<u64>) {
    let span = samples.last().map_or(0.0, |s| s.at).ceil() as u64 + 1;
    let window = 10 * span.div_ceil(10 * CURVE_WINDOWS).max(1);
    let mut maxima = vec![0u64; span.div_ceil(window) as usize];
    for s in samples {
        let i = (s.at as u64 / window) as usize;
        if let Some(m) = maxima.get_mut(i) {
            *m = (*m).max(s.wal);
        }
    }
    (window, maxima)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", mb(bytes))
}
