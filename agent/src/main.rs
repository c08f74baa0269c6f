//! `banger-agent`: the guest side of banger. For now it only reports its
//! version; the init and vsock roles arrive with the guest-side work (see
//! docs/guest-contract.md).

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--version") | Some("version") => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
        }
        _ => {
            eprintln!(
                "banger-agent {}: the guest agent is not implemented yet; only --version works",
                env!("CARGO_PKG_VERSION")
            );
            std::process::exit(2);
        }
    }
}
