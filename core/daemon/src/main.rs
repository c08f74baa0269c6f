//! `bangerd`: the banger daemon. Serves the API on
//! `$XDG_RUNTIME_DIR/banger/bangerd.sock` until SIGTERM or
//! `POST /v1/shutdown`. Log level from `BANGER_LOG` (default `info`).

#![forbid(unsafe_code)]

// Linking the built-ins is what registers them with `inventory`.
use banger_capabilities as _;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANGER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: the CLI starts the daemon with stderr on
    // bangerd.log and systemd on the journal, where escape codes are noise
    // (and formatting them was 1% of the daemon's CPU per create).
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if std::env::args().nth(1).as_deref() == Some("--version") {
        let v = banger_api::api::VersionInfo::current();
        println!("bangerd {} ({})", v.version, v.commit);
        return;
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bangerd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(banger_core::daemon::run()) {
        let chain = banger_core::lifecycle::render_chain(&e);
        tracing::error!("{chain}");
        eprintln!("bangerd: {chain}");
        std::process::exit(1);
    }
}
