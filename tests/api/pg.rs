//! A real PostgreSQL for the suite's PostgreSQL run (`tests/api_postgres`):
//! `AGSYNC_TEST_POSTGRES_URL` when set (a server the tests may create
//! databases on), else a throwaway cluster started once per test process,
//! as the `postgres` user (PostgreSQL refuses to run as root), in a temp
//! dir on a free 127.0.0.1 port, and stopped when the process exits. Each
//! database path a test uses maps to a fresh PostgreSQL database, so a
//! restart "on the same file" finds the same data.
//!
//! Without PostgreSQL (no `initdb`, not root) the run prints one line saying
//! the PostgreSQL tests were skipped and ends the process successfully,
//! unless `AGSYNC_TEST_REQUIRE_POSTGRES=1` (CI), which makes it fail.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sqlx::Connection;

struct Cluster {
    /// A URL of the server's `postgres` database, for CREATE DATABASE.
    admin_url: String,
    /// The URL with `{db}` where the database name goes.
    url_template: String,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
/// The suite's shared cluster, when it started one (stopped at exit).
static SHARED: OnceLock<OwnCluster> = OnceLock::new();
static DATABASES: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);

/// The URL of the PostgreSQL database standing for the SQLite file `path`
/// (created the first time a path is seen).
pub async fn url_for(path: &Path) -> String {
    if let Some(url) = path.to_str().filter(|p| p.starts_with("postgres")) {
        // Already a URL (a test with a cluster of its own).
        return url.to_string();
    }
    let cluster = match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(why) => skip(why),
    };
    if let Some(url) = DATABASES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(path)
    {
        return url.clone();
    }
    let name = format!(
        "agsync_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&cluster.admin_url)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    let url = cluster.url_template.replace("{db}", &name);
    DATABASES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(path.to_path_buf(), url.clone());
    url
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn skip(why: &str) -> ! {
    if std::env::var("AGSYNC_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("PostgreSQL is required (AGSYNC_TEST_REQUIRE_POSTGRES=1) but unavailable: {why}");
    }
    // Straight to the terminal: libtest captures only print!/eprint!.
    let _ = writeln!(
        std::io::stderr(),
        "PostgreSQL tests skipped: {why} (install postgresql, or set AGSYNC_TEST_POSTGRES_URL)"
    );
    std::process::exit(0);
}

fn start() -> Result<Cluster, String> {
    if let Ok(url) = std::env::var("AGSYNC_TEST_POSTGRES_URL") {
        let (base, _) = url
            .rsplit_once('/')
            .ok_or("AGSYNC_TEST_POSTGRES_URL has no /database")?;
        return Ok(Cluster {
            admin_url: url.clone(),
            url_template: format!("{base}/{{db}}"),
        });
    }
    let own = OwnCluster::start()?;
    let cluster = Cluster {
        admin_url: own.url("postgres"),
        url_template: own.url("{db}"),
    };
    SHARED.get_or_init(|| own);
    // SAFETY: registers a plain extern "C" fn.
    unsafe { libc::atexit(stop_shared) };
    Ok(cluster)
}

/// A throwaway cluster run as the `postgres` user in a temp dir, on a free
/// 127.0.0.1 port; stopped and removed when dropped.
pub struct OwnCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

/// A server certificate and key (PEM) for a cluster that serves TLS.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl OwnCluster {
    pub fn start() -> Result<OwnCluster, String> {
        Self::start_with_tls(None)
    }

    /// With `tls`, the cluster runs with `ssl = on` and that certificate.
    pub fn start_with_tls(tls: Option<&ServerTls>) -> Result<OwnCluster, String> {
        let bin = pg_bin().ok_or("no initdb found under /usr/lib/postgresql/*/bin")?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "starting a throwaway cluster needs root (to run it as the postgres user)".into(),
            );
        }
        reap_abandoned(&bin);
        let dir = tempfile::Builder::new()
            .prefix("agsync-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        let cluster = OwnCluster {
            bin,
            dir,
            port: free_port(),
        };
        std::fs::write(cluster.dir.join("owner"), std::process::id().to_string())
            .map_err(|e| e.to_string())?;
        run("chown", &["postgres:", &cluster.path("")])?;
        run("chmod", &["700", &cluster.path("")])?;
        cluster.pg(
            "initdb",
            &[
                "-D",
                &cluster.path("data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=500 -c shared_buffers=64MB",
            cluster.port,
            cluster.dir.display()
        );
        if let Some(tls) = tls {
            // PostgreSQL wants its key owned by its user and private.
            let (cert, key) = (cluster.path("server.crt"), cluster.path("server.key"));
            std::fs::write(&cert, &tls.cert_pem).map_err(|e| e.to_string())?;
            std::fs::write(&key, &tls.key_pem).map_err(|e| e.to_string())?;
            run("chown", &["postgres:", &cert, &key])?;
            run("chmod", &["600", &key])?;
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
            ));
        }
        cluster.pg(
            "pg_ctl",
            &[
                "-D",
                &cluster.path("data"),
                "-o",
                &options,
                "-l",
                &cluster.path("log"),
                "-w",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `statements` in order as the superuser, on the `postgres`
    /// database (`CREATE DATABASE ...`).
    pub async fn admin(&self, statements: &[&str]) {
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the throwaway cluster");
        for statement in statements {
            sqlx::Executor::execute(&mut admin, *statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        let _ = admin.close().await;
    }

    /// `pg_ctl stop -m fast`: the server goes away under its clients.
    pub fn stop_fast(&self) {
        self.stop_with("fast");
    }

    /// `pg_ctl stop -m immediate`: the server crashes (it recovers from
    /// its WAL on the next start).
    pub fn crash(&self) {
        self.stop_with("immediate");
    }

    fn stop_with(&self, mode: &str) {
        self.pg(
            "pg_ctl",
            &["-D", &self.path("data"), "-m", mode, "-w", "stop"],
        )
        .expect("pg_ctl stop");
    }

    /// Starts it again after `stop_fast`, with the options of its first
    /// start (`pg_ctl restart` reuses them). The server's output goes to the
    /// log file: on a pipe, `output()` would wait for ever.
    pub fn start_again(&self) {
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.path("data"),
                "-l",
                &self.path("log"),
                "-w",
                "restart",
            ],
        )
        .expect("pg_ctl restart");
    }

    fn stop(&self) {
        let _ = self.pg(
            "pg_ctl",
            &["-D", &self.path("data"), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn pg(&self, program: &str, args: &[&str]) -> Result<(), String> {
        as_postgres(&self.bin.join(program), args)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn stop_shared() {
    if let Some(cluster) = SHARED.get() {
        cluster.stop();
    }
}

/// Stops and removes the clusters of earlier test processes that died
/// before their exit hook ran (a killed or timed-out `cargo test`).
fn reap_abandoned(bin: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for dir in entries.filter_map(Result::ok).map(|e| e.path()) {
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("agsync-pg-"));
        let Some(owner) = is_ours
            .then(|| std::fs::read_to_string(dir.join("owner")).ok())
            .flatten()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let _ = as_postgres(
            &bin.join("pg_ctl"),
            &[
                "-D",
                dir.join("data").to_str().unwrap_or(""),
                "-m",
                "immediate",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The directory of the newest installed PostgreSQL's binaries.
pub fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn as_postgres(program: &Path, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["-u", "postgres", "--", program.to_str().unwrap()];
    full.extend_from_slice(args);
    run("runuser", &full)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .current_dir("/")
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
