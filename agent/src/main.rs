//! `banger-agent`: the guest side of banger (see docs/guest-contract.md).
//!
//! One static binary, two roles: as PID 1 (or `banger-agent init`) it
//! prepares the guest from the config drive and hands over to the image's
//! init; `banger-agent serve` is the vsock API.

mod bridge;
mod console;
mod init;
mod mux;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use banger_guest_protocol::api::AGENT_PORT;

const USAGE: &str = "usage: banger-agent [init | serve [--tcp ADDR] [--root DIR] | bridge --mux SOCKET --uds SOCKET [--resync] | --version]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() == 1 {
        init::run();
    }
    match args.first().map(String::as_str) {
        Some("--version") | Some("version") => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
        }
        Some("init") => init::run(),
        Some("serve") => match parse_serve(&args[1..]) {
            Ok((endpoint, root)) => {
                if let Err(e) = serve(endpoint, root) {
                    console::error("serve", &e);
                    std::process::exit(1);
                }
            }
            Err(msg) => {
                eprintln!("banger-agent: {msg}\n{USAGE}");
                std::process::exit(2);
            }
        },
        Some("bridge") => match parse_bridge(&args[1..]) {
            Ok(opts) => {
                if let Err(e) = bridge::run(&opts) {
                    eprintln!("banger-agent bridge: {e}");
                    std::process::exit(1);
                }
            }
            Err(msg) => {
                eprintln!("banger-agent: {msg}\n{USAGE}");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn parse_serve(args: &[String]) -> Result<(serve::Endpoint, PathBuf), String> {
    let mut endpoint = serve::Endpoint::Vsock(AGENT_PORT);
    let mut root = PathBuf::from("/");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => {
                let v = it
                    .next()
                    .ok_or("--tcp needs an address like 127.0.0.1:1024")?;
                let addr: SocketAddr = v
                    .parse()
                    .map_err(|_| format!("--tcp {v}: not an address; use IP:PORT"))?;
                endpoint = serve::Endpoint::Tcp(addr);
            }
            "--root" => {
                root = it.next().ok_or("--root needs a directory")?.into();
            }
            other => return Err(format!("unknown serve option {other}")),
        }
    }
    Ok((endpoint, root))
}

/// `bridge --mux SOCKET --uds SOCKET [--resync]`: the host end of the
/// serial transport (see `bridge`).
fn parse_bridge(args: &[String]) -> Result<bridge::Options, String> {
    let (mut mux, mut uds, mut resync) = (None, None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mux" => mux = Some(PathBuf::from(it.next().ok_or("--mux needs a socket path")?)),
            "--uds" => uds = Some(PathBuf::from(it.next().ok_or("--uds needs a socket path")?)),
            "--resync" => resync = true,
            other => return Err(format!("unknown bridge option {other}")),
        }
    }
    Ok(bridge::Options {
        mux: mux.ok_or("bridge needs --mux SOCKET (QEMU's chardev)")?,
        uds: uds.ok_or("bridge needs --uds SOCKET (the hybrid-vsock socket)")?,
        resync,
    })
}

fn serve(endpoint: serve::Endpoint, root: PathBuf) -> Result<(), serve::ServeError> {
    let server = serve::Server::bind(endpoint, &root)?;
    console::log(&format!("serving the agent API on {}", server.describe()));
    server.run()
}
