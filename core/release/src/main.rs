//! `banger-release`: publishes a kernel and an image as OCI artifacts pinned
//! by digest, and writes the catalogs that name them (see docs/release.md).
//!
//! `push` packs the kernel directory and the image bundle as the `.tar.zst`
//! formats the catalogs serve, pushes each with
//! [`banger_artifacts::oci_artifact::push_artifact`] as `PREFIX/kernel-NAME:TAG`
//! and `PREFIX/image-NAME:TAG`, and writes `kernels.toml` and `images.toml`
//! into the output directory with `oci = "...@sha256:<manifest digest>"`.
//!
//! `publish-binaries` lays out and signs a binary release for `banger
//! update` and `scripts/install.sh` (see [`binaries`]).

#![forbid(unsafe_code)]

mod binaries;
mod bundle;
mod catalog;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use banger_artifacts::images::PullOptions;
use banger_artifacts::oci_artifact::{self, ArtifactKind, ArtifactPush};
use clap::{Parser, Subcommand};
use toml::{Table, Value};

use crate::bundle::Member;

#[derive(Debug, Parser)]
#[command(name = "banger-release", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack, push and pin one kernel and one image.
    Push(PushArgs),
    /// Lay out and sign a binary release (banger, bangerd, banger-helper,
    /// banger-agent) for `banger update` and install.sh.
    PublishBinaries(binaries::PublishArgs),
}

#[derive(Debug, clap::Args)]
struct PushArgs {
    /// Where to push: HOST[:PORT]/PREFIX (e.g. ghcr.io/banger-dev).
    #[arg(long, value_name = "HOST[:PORT]/PREFIX")]
    registry: String,
    /// Talk plain HTTP to the registry (loopback test registries only).
    #[arg(long)]
    insecure: bool,
    /// A local kernel directory: vmlinux, optional initrd, manifest.toml.
    #[arg(long, value_name = "DIR")]
    kernel_dir: PathBuf,
    /// The kernel's catalog name.
    #[arg(long, value_name = "NAME")]
    kernel_name: String,
    /// The image's root filesystem (ext4).
    #[arg(long, value_name = "FILE")]
    image_rootfs: PathBuf,
    /// The image's catalog name.
    #[arg(long, value_name = "NAME")]
    image_name: String,
    /// The kernel the image boots with (default: --kernel-name).
    #[arg(long, value_name = "NAME")]
    image_kernel: Option<String>,
    /// Catalogs to start from (kernels.toml, images.toml); entries of the
    /// same name keep every field but their source. Without it the written
    /// catalogs hold only the pushed entries.
    #[arg(long, value_name = "DIR")]
    catalog_dir: Option<PathBuf>,
    /// The description of a kernel entry the input catalog lacks.
    #[arg(long)]
    kernel_description: Option<String>,
    /// The description of an image entry the input catalog lacks.
    #[arg(long)]
    image_description: Option<String>,
    /// The tag pushed alongside the digest.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// zstd compression level for the bundles.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// Where to write kernels.toml and images.toml.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// What the release records about the kernel, from its `manifest.toml`.
#[derive(Debug)]
struct KernelFacts {
    arch: String,
    distro: String,
    version: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("banger-release: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Push(args) => runtime.block_on(push(args)),
        Command::PublishBinaries(args) => binaries::publish(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-release: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let (host, prefix) = split_registry(&args.registry)?;
    let facts = kernel_facts(&args.kernel_dir)?;
    let image_kernel = args.image_kernel.as_deref().unwrap_or(&args.kernel_name);
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("Cannot create {}", args.out_dir.display()))?;
    let kernels_in = args.catalog_dir.as_ref().map(|d| d.join("kernels.toml"));
    let images_in = args.catalog_dir.as_ref().map(|d| d.join("images.toml"));
    let mut kernels = catalog::load(kernels_in.as_deref())?;
    let mut images = catalog::load(images_in.as_deref())?;
    let image_description = existing_field(&images, "image", &args.image_name, "description")
        .or(args.image_description.clone())
        .unwrap_or_else(|| format!("{} (banger release {})", args.image_name, args.tag));
    let publisher = Publisher::new(&args, host, prefix)?;

    let kernel_bundle = publisher.bundle_path("kernel");
    pack_kernel(&args.kernel_dir, &facts, &kernel_bundle, args.zstd_level)?;
    let kernel_oci = publisher
        .push(
            ArtifactKind::KERNEL,
            "kernel",
            &args.kernel_name,
            &facts.version,
            &kernel_bundle,
        )
        .await?;
    let image_bundle = publisher.bundle_path("image");
    pack_image(&args, image_kernel, &image_description, &image_bundle)?;
    let image_oci = publisher
        .push(
            ArtifactKind::IMAGE,
            "image",
            &args.image_name,
            &args.tag,
            &image_bundle,
        )
        .await?;

    let arch = Value::String(facts.arch.clone());
    let kernel_description = args
        .kernel_description
        .clone()
        .unwrap_or_else(|| format!("{} {} kernel", facts.distro, facts.version));
    let kernel_entry = new_entry(&kernels, "kernel", kernel_description);
    let kernel_facts = [
        ("arch", arch.clone()),
        ("distro", Value::String(facts.distro.clone())),
        ("version", Value::String(facts.version.clone())),
    ];
    catalog::pin(
        &mut kernels,
        "kernel",
        &args.kernel_name,
        &kernel_oci,
        kernel_entry,
        &kernel_facts,
    )?;
    let image_entry = new_entry(&images, "image", image_description);
    let image_facts = [
        ("arch", arch),
        ("kernel", Value::String(image_kernel.to_owned())),
    ];
    catalog::pin(
        &mut images,
        "image",
        &args.image_name,
        &image_oci,
        image_entry,
        &image_facts,
    )?;
    let header = format!(
        "# Written by banger-release {} on {}: entries pinned to the\n\
         # artifacts it pushed to {}. See docs/release.md.\n",
        env!("CARGO_PKG_VERSION"),
        publisher.created,
        args.registry
    );
    catalog::write(&args.out_dir.join("kernels.toml"), &header, &kernels)?;
    catalog::write(&args.out_dir.join("images.toml"), &header, &images)?;
    println!("kernel {} {kernel_oci}", args.kernel_name);
    println!("image {} {image_oci}", args.image_name);
    Ok(())
}

/// Where and how one run publishes its artifacts.
#[derive(Debug)]
struct Publisher {
    /// `HOST[:PORT]/PREFIX`.
    repo_prefix: String,
    tag: String,
    opts: PullOptions,
    /// When this run started (RFC 3339), for annotations and headers.
    created: String,
    /// Bundles are scratch: packed next to the output, removed on exit.
    scratch: tempfile::TempDir,
}

impl Publisher {
    fn new(args: &PushArgs, host: &str, prefix: &str) -> anyhow::Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix(".banger-release-")
            .tempdir_in(&args.out_dir)
            .with_context(|| {
                format!("Cannot create a scratch dir in {}", args.out_dir.display())
            })?;
        let insecure_registries = if args.insecure {
            vec![host.to_owned()]
        } else {
            Vec::new()
        };
        Ok(Publisher {
            repo_prefix: format!("{host}/{prefix}"),
            tag: args.tag.clone(),
            opts: PullOptions {
                insecure_registries,
                ..PullOptions::default()
            },
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            scratch,
        })
    }

    /// Where to pack the `what` bundle.
    fn bundle_path(&self, what: &str) -> PathBuf {
        self.scratch.path().join(format!("{what}.tar.zst"))
    }

    /// Pushes `bundle` as `PREFIX/WHAT-NAME:TAG` and returns
    /// `HOST/PREFIX/WHAT-NAME@<manifest digest>`.
    async fn push(
        &self,
        kind: ArtifactKind,
        what: &str,
        name: &str,
        version: &str,
        bundle: &Path,
    ) -> anyhow::Result<String> {
        let repo = format!("{}/{what}-{name}", self.repo_prefix);
        let annotations = [
            (oci_artifact::ANNOTATION_TITLE, name),
            (oci_artifact::ANNOTATION_VERSION, version),
            (oci_artifact::ANNOTATION_CREATED, &self.created),
            (oci_artifact::ANNOTATION_NAME, name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let artifact = ArtifactPush {
            kind,
            bundle,
            annotations,
        };
        let reference = format!("{repo}:{}", self.tag);
        let digest = oci_artifact::push_artifact(&reference, &artifact, &self.opts).await?;
        Ok(format!("{repo}@{digest}"))
    }
}

/// Splits `HOST[:PORT]/PREFIX`.
fn split_registry(registry: &str) -> anyhow::Result<(&str, &str)> {
    match registry.split_once('/') {
        Some((host, prefix)) if !host.is_empty() && !prefix.trim_matches('/').is_empty() => {
            Ok((host, prefix.trim_matches('/')))
        }
        _ => bail!(
            "--registry {registry:?} must be HOST[:PORT]/PREFIX, e.g. ghcr.io/banger-dev or 127.0.0.1:5000/banger"
        ),
    }
}

/// Arch, distro and version from the kernel directory's `manifest.toml`
/// (what `banger kernel build`/`import` write), else `banger-kernel.toml`.
fn kernel_facts(dir: &Path) -> anyhow::Result<KernelFacts> {
    let path = ["manifest.toml", "banger-kernel.toml"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{} has no manifest.toml or banger-kernel.toml: pass a kernel directory from `banger kernel show NAME --json`",
                dir.display()
            )
        })?;
    let table = catalog::load(Some(&path))?;
    let field = |key: &str| {
        table
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{} has no string field `{key}`", path.display()))
    };
    Ok(KernelFacts {
        arch: field("arch")?,
        distro: field("distro")?,
        version: field("version")?,
    })
}

/// Packs `dir`'s vmlinux, initrd (if any) and a `banger-kernel.toml` of
/// `facts` as the kernel bundle.
fn pack_kernel(dir: &Path, facts: &KernelFacts, out: &Path, level: i32) -> anyhow::Result<()> {
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.is_file() {
        bail!(
            "{} has no vmlinux: pass a kernel directory from `banger kernel show NAME --json`",
            dir.display()
        );
    }
    let mut meta = Table::new();
    meta.insert("arch".into(), Value::String(facts.arch.clone()));
    meta.insert("distro".into(), Value::String(facts.distro.clone()));
    meta.insert("version".into(), Value::String(facts.version.clone()));
    let meta = toml::to_string(&meta).context("Cannot serialise banger-kernel.toml")?;
    let initrd = dir.join("initrd");
    let mut members = vec![("vmlinux", Member::File(&vmlinux))];
    if initrd.is_file() {
        members.push(("initrd", Member::File(&initrd)));
    }
    members.push(("banger-kernel.toml", Member::Text(meta)));
    bundle::pack(out, level, &members)
}

/// Packs the image bundle: the rootfs and a `manifest.toml` naming its
/// kernel.
fn pack_image(args: &PushArgs, kernel: &str, description: &str, out: &Path) -> anyhow::Result<()> {
    let mut manifest = Table::new();
    manifest.insert("kernel".into(), Value::String(kernel.to_owned()));
    manifest.insert("description".into(), Value::String(description.to_owned()));
    let manifest = toml::to_string(&manifest).context("Cannot serialise manifest.toml")?;
    let members = [
        (
            banger_artifacts::imagecat::ROOTFS_FILE,
            Member::File(&args.image_rootfs),
        ),
        (
            banger_artifacts::imagecat::MANIFEST_FILE,
            Member::Text(manifest),
        ),
    ];
    bundle::pack(out, args.zstd_level, &members)
}

/// The fields of an entry the input catalog lacks: `description`, and
/// `default = true` when no other entry is the default.
fn new_entry(catalog: &Table, section: &str, description: String) -> Table {
    let mut entry = Table::new();
    entry.insert("description".into(), Value::String(description));
    entry.insert(
        "default".into(),
        Value::Boolean(!has_default(catalog, section)),
    );
    entry
}

/// The string `field` of the `[[section]]` entry named `name`, if any.
fn existing_field(catalog: &Table, section: &str, name: &str, field: &str) -> Option<String> {
    catalog
        .get(section)?
        .as_array()?
        .iter()
        .filter_map(Value::as_table)
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get(field)?
        .as_str()
        .map(str::to_owned)
}

/// Whether some `[[section]]` entry is marked `default = true`.
fn has_default(catalog: &Table, section: &str) -> bool {
    catalog
        .get(section)
        .and_then(Value::as_array)
        .is_some_and(|entries| {
            entries
                .iter()
                .filter_map(Value::as_table)
                .any(|e| e.get("default").and_then(Value::as_bool) == Some(true))
        })
}
