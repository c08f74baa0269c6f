//! Push a rootfs tarball (as made by `guest/rootfs/build`) to an OCI registry
//! as a single-layer linux image, so `banger image pull` can fetch it.
//!
//! Usage: `push-rootfs TARBALL HOST/REPO:TAG [--arch ARCH]`
//!
//! The tarball is an uncompressed tar of the root filesystem; it is pushed as
//! one gzip layer with a config naming `os: linux` and `architecture: ARCH`
//! (default `amd64`). Loopback registries (`127.0.0.1:PORT`,
//! `localhost:PORT`) are spoken to over plain HTTP, every other over HTTPS.
//! Credentials come from `REGISTRY_USER`/`REGISTRY_PASSWORD` when both are
//! set; otherwise the push is anonymous. Prints the manifest digest on stdout.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use test_infra::registry::{LayerBlob, oci_client_for, push_layers};

const USAGE: &str = "usage: push-rootfs TARBALL HOST/REPO:TAG [--arch ARCH]";

#[derive(Debug)]
struct Args {
    tarball: PathBuf,
    reference: Reference,
    arch: String,
}

fn parse_args(mut raw: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut positional = Vec::new();
    let mut arch = "amd64".to_string();
    while let Some(arg) = raw.next() {
        match arg.as_str() {
            "--arch" => match raw.next() {
                Some(a) => arch = a,
                None => bail!("--arch needs a value such as amd64\n{USAGE}"),
            },
            "-h" | "--help" => bail!("{USAGE}"),
            _ if arg.starts_with("--") => bail!("Unknown option {arg}\n{USAGE}"),
            _ => positional.push(arg),
        }
    }
    let [tarball, reference] = <[String; 2]>::try_from(positional)
        .map_err(|_| anyhow::anyhow!("Expected a tarball and a reference\n{USAGE}"))?;
    let reference: Reference = reference.parse().with_context(|| {
        format!("Image reference {reference:?} is not valid: use HOST/REPO:TAG")
    })?;
    Ok(Args {
        tarball: PathBuf::from(tarball),
        reference,
        arch,
    })
}

/// Loopback registries run without TLS in tests and CI.
fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

async fn run(args: Args) -> anyhow::Result<String> {
    let file = File::open(&args.tarball)
        .with_context(|| format!("Opening rootfs tarball {}", args.tarball.display()))?;
    let layer = LayerBlob::gzip_from(BufReader::new(file), flate2::Compression::fast())
        .with_context(|| format!("Compressing {}", args.tarball.display()))?;
    let registry = args.reference.resolve_registry().to_string();
    let plain: Vec<&str> = if is_loopback(&registry) {
        vec![registry.as_str()]
    } else {
        Vec::new()
    };
    let client = oci_client_for(&plain);
    let auth = match (
        std::env::var("REGISTRY_USER"),
        std::env::var("REGISTRY_PASSWORD"),
    ) {
        (Ok(user), Ok(pass)) => RegistryAuth::Basic(user, pass),
        _ => RegistryAuth::Anonymous,
    };
    client
        .auth(&args.reference, &auth, oci_client::RegistryOperation::Push)
        .await
        .with_context(|| format!("Authenticating to {registry}"))?;
    let (pushed, _) = push_layers(&client, &args.reference, &args.arch, &[layer]).await?;
    Ok(pushed.digest)
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|args| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("Starting the async runtime")?
            .block_on(run(args))
    });
    match result {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("push-rootfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> anyhow::Result<Args> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_tarball_reference_and_arch() {
        let a = args(&[
            "r.tar",
            "127.0.0.1:5000/guest/debian:bookworm",
            "--arch",
            "arm64",
        ])
        .unwrap();
        assert_eq!(a.tarball, PathBuf::from("r.tar"));
        assert_eq!(a.reference.registry(), "127.0.0.1:5000");
        assert_eq!(a.reference.repository(), "guest/debian");
        assert_eq!(a.reference.tag(), Some("bookworm"));
        assert_eq!(a.arch, "arm64");
    }

    #[test]
    fn rejects_missing_reference_with_usage() {
        let e = args(&["r.tar"]).unwrap_err().to_string();
        assert!(e.contains("usage: push-rootfs"), "{e}");
    }

    #[test]
    fn only_loopback_registries_get_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(!is_loopback("registry.example.com:5000"));
        assert!(!is_loopback("docker.io"));
    }
}
