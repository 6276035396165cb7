//! The `agsync` binary: picks the allocator and builds the request runtime,
//! parses flags, sets up logging, binds the listener and runs the server
//! until SIGINT or SIGTERM, or runs the `hash-token` or `backup` helper. Nothing else
//! lives here.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use agsync::config::{Cli, Command, LogFormat};

/// mimalloc instead of glibc's malloc: requests are allocated on the request
/// threads and freed on the writer thread and back, which glibc serves
/// slowly (measured: a fifth of the request threads' CPU in malloc/free
/// under contended CAS).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The request runtime. Without tokio's LIFO slot: with it, a Subscribe
/// stream that hands a notification to its HTTP/2 connection runs the
/// connection's task next, which writes that one frame; without it the
/// connection task runs after the other streams' tasks and writes all their
/// frames at once. Measured (agsync-bench run --workload fanout
/// --subscribers 5000, alternating): notification p99 41/37 ms vs 50/63 ms,
/// and contended CAS 3.7k/3.9k wins/s vs 3.5k/3.5k. The setting needs
/// `--cfg tokio_unstable` (.cargo/config.toml); a build without it runs
/// with the slot.
fn main() -> std::process::ExitCode {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("agsync: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.config.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.command {
        Some(Command::HashToken { generate }) => return hash_token(generate),
        Some(Command::Backup { db, dest }) => return backup(&db, &dest),
        None => {}
    }
    let config = cli.config;
    raise_open_file_limit();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %config.listen, error = %e, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    match agsync::server::run(config, listener, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agsync failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Each connection takes a file descriptor, and 1024 (a common soft
/// limit) is far below what the server serves: the soft limit is raised to
/// the hard one, and the log says so.
fn raise_open_file_limit() {
    /// Below this many, thousands of clients cannot all connect.
    const WANTED: u64 = 65_536;
    let before = rlimit::Resource::NOFILE.get().ok();
    // A privileged process may raise the hard limit too (up to the
    // kernel's fs.nr_open); elsewhere this fails and changes nothing.
    if before.is_some_and(|(_, hard)| hard < WANTED) {
        let _ = rlimit::Resource::NOFILE.set(WANTED, WANTED);
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            if before.is_some_and(|(soft, _)| soft < now) {
                tracing::info!(
                    from = before.map(|(soft, _)| soft),
                    to = now,
                    "raised the open-file limit (RLIMIT_NOFILE) to its hard limit: each client connection takes one"
                );
            }
            if now < WANTED {
                tracing::warn!(
                    limit = now,
                    "the open-file limit is low: at most about this many clients can connect at once; raise the hard limit (ulimit -Hn, LimitNOFILE=) to serve more"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `agsync backup --db FILE DEST`: prints the seq the copy holds.
fn backup(db: &agsync::store::Location, dest: &std::path::Path) -> std::process::ExitCode {
    match agsync::store::backup(db, dest) {
        Ok(seq) => {
            println!(
                "backed up {} to {} through seq {seq}",
                db.for_logs(),
                dest.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agsync backup: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `agsync hash-token`: prints the auth-file hash of a token.
fn hash_token(generate: bool) -> std::process::ExitCode {
    let token = if generate {
        let token = agsync::auth::generate_token();
        println!("token: {token}");
        token
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("cannot read the token from standard input: {e}");
            return std::process::ExitCode::FAILURE;
        }
        line.trim().to_owned()
    };
    if token.is_empty() {
        eprintln!(
            "no token given: pipe one in (echo -n TOKEN | agsync hash-token) or use --generate"
        );
        return std::process::ExitCode::FAILURE;
    }
    println!("hash = \"{}\"", agsync::auth::hash_token(&token));
    std::process::ExitCode::SUCCESS
}
