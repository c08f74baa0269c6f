//! `banger image ...` and `banger kernel ...`: thin calls of the daemon API.

use std::process::ExitCode;

use anyhow::{Context, Result};
use banger_api::api::{
    BuildRequest, CatalogImageView, CatalogKernelView, ImageView, ImportKernelRequest,
    KernelManifest, KernelView, PruneReport, PullImageRequest, RegisterImageRequest,
};
use banger_api::client::{Client, Method};
use banger_api::model::{ByteSize, ImageKernel, ImageRecord, ImageSource};

use crate::args::{ImageCacheCommand, ImageCommand, KernelCommand};
use crate::output;

fn abs(p: &std::path::Path) -> Result<std::path::PathBuf> {
    std::path::absolute(p).with_context(|| format!("Resolving {}", p.display()))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn kernel_of(i: &ImageRecord) -> String {
    match &i.kernel {
        ImageKernel::Named { name } => name.clone(),
        ImageKernel::Files { kernel, .. } => kernel.display().to_string(),
    }
}

fn source_of(i: &ImageRecord) -> String {
    match &i.source {
        ImageSource::Oci { reference, .. } => format!("oci {reference}"),
        ImageSource::Catalog { name, .. } => format!("catalog {name}"),
        ImageSource::Built { recipe, .. } => format!("built from recipe {recipe}"),
        ImageSource::Registered => "registered".to_string(),
        ImageSource::Promoted { from } => format!("promoted from {}", from.display()),
    }
}

fn image_details(i: &ImageRecord) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<9}{v}\n", format!("{k}:")));
    line("name", i.name.clone());
    line("rootfs", i.rootfs.display().to_string());
    line("size", ByteSize(i.size_bytes).to_string());
    match &i.kernel {
        ImageKernel::Named { name } => {
            line("kernel", format!("{name} (banger kernel show {name})"))
        }
        ImageKernel::Files { kernel, initrd } => {
            line("kernel", kernel.display().to_string());
            line(
                "initrd",
                initrd
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    line("source", source_of(i));
    line(
        "managed",
        if i.managed {
            "yes".into()
        } else {
            "no (registered in place)".into()
        },
    );
    line("added", output::timestamp(i.created_at));
    out
}

fn kernel_details(k: &KernelView) -> String {
    let m = &k.manifest;
    let opt = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "name:     {}\ndistro:   {}\narch:     {}\nversion:  {}\nsha256:   {}\nsource:   {}\nadded:    {}\nvmlinux:  {}\ninitrd:   {}\nmodules:  {}\n",
        m.name,
        m.distro,
        m.arch,
        m.version,
        m.sha256,
        m.source,
        m.imported_at,
        k.vmlinux.display(),
        opt(&k.initrd),
        opt(&k.modules)
    )
}

/// Runs `banger image ...`.
pub async fn image(client: &Client, cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::List {
            available: true,
            json,
        } => {
            let is: Vec<CatalogImageView> = client.get("/v1/images/catalog").await?;
            if json {
                print_json(&is)?;
            } else {
                let yes = |b: bool| if b { "yes" } else { "" }.to_string();
                let rows: Vec<Vec<String>> = is
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.kernel.clone(),
                            yes(i.default),
                            yes(i.local),
                            i.sources.clone(),
                            i.description.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &[
                            "NAME",
                            "KERNEL",
                            "DEFAULT",
                            "LOCAL",
                            "SOURCE",
                            "DESCRIPTION"
                        ],
                        &rows
                    )
                );
                println!("Any OCI reference can be pulled too: banger image pull REF");
            }
        }
        ImageCommand::List {
            available: false,
            json,
        } => {
            let images: Vec<ImageView> = client.get("/v1/images").await?;
            if json {
                print_json(&images)?;
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|v| &v.record)
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            ByteSize(i.size_bytes).to_string(),
                            kernel_of(i),
                            source_of(i),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(&["NAME", "SIZE", "KERNEL", "SOURCE"], &rows)
                );
            }
        }
        ImageCommand::Show { name, json } => {
            let v: ImageView = client.get(&format!("/v1/images/{name}")).await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", image_details(&v.record));
                let path = |p: &Option<std::path::PathBuf>, none: &str| {
                    p.as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| none.to_string())
                };
                println!(
                    "vmlinux: {}",
                    path(&v.kernel_path, "(not pulled yet; VMs pull it on create)")
                );
                println!("initrd:  {}", path(&v.initrd_path, "-"));
            }
        }
        ImageCommand::Delete { names } => {
            let mut failed = false;
            for name in names {
                match client
                    .send::<(), ImageRecord>(Method::DELETE, &format!("/v1/images/{name}"), None)
                    .await
                {
                    Ok(_) => println!("{name}: deleted"),
                    Err(e) => {
                        println!("{name}: error: {e}");
                        failed = true;
                    }
                }
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        ImageCommand::Register {
            name,
            rootfs,
            kernel_ref,
            kernel,
            initrd,
            modules,
        } => {
            let req = RegisterImageRequest {
                name,
                rootfs: abs(&rootfs)?,
                kernel_ref,
                kernel: kernel.as_deref().map(abs).transpose()?,
                initrd: initrd.as_deref().map(abs).transpose()?,
                modules: modules.as_deref().map(abs).transpose()?,
            };
            let i: ImageRecord = client
                .send(Method::POST, "/v1/images/register", Some(&req))
                .await?;
            print!("{}", image_details(&i));
        }
        ImageCommand::Pull {
            reference,
            name,
            size,
            kernel_ref,
            kernel,
            initrd,
            modules,
        } => {
            let req = PullImageRequest {
                reference,
                name,
                size,
                kernel_ref,
                kernel: kernel.as_deref().map(abs).transpose()?,
                initrd: initrd.as_deref().map(abs).transpose()?,
                modules: modules.as_deref().map(abs).transpose()?,
            };
            let i: ImageRecord = client
                .stream_events(
                    Method::POST,
                    "/v1/images/pull",
                    Some(&req),
                    output::show_events(None),
                )
                .await?;
            print!("{}", image_details(&i));
        }
        ImageCommand::Build { name } => {
            let req = BuildRequest { name, force: false };
            let i: ImageView = client
                .stream_events(
                    Method::POST,
                    "/v1/images/build",
                    Some(&req),
                    output::show_events(None),
                )
                .await?;
            print!("{}", image_details(&i.record));
        }
        ImageCommand::Cache(ImageCacheCommand::Prune) => {
            let r: PruneReport = client
                .send::<(), _>(Method::POST, "/v1/images/cache/prune", None)
                .await?;
            for d in &r.removed {
                println!("removed {d}");
            }
            println!(
                "freed {} in {} layer(s)",
                ByteSize(r.freed_bytes),
                r.removed.len()
            );
        }
        ImageCommand::Promote { name } => {
            let i: ImageRecord = client
                .send::<(), _>(Method::POST, &format!("/v1/images/{name}/promote"), None)
                .await?;
            print!("{}", image_details(&i));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A catalog entry's download size (`-` when the catalog does not say, as
/// for a kernel built here from its recipe).
fn download_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    match UNITS.iter().find(|(m, _)| bytes >= *m) {
        _ if bytes == 0 => "-".to_string(),
        Some((m, unit)) => format!("{:.1} {unit}", bytes as f64 / *m as f64),
        None => format!("{bytes} B"),
    }
}

/// Runs `banger kernel ...`.
pub async fn kernel(client: &Client, cmd: KernelCommand) -> Result<ExitCode> {
    match cmd {
        KernelCommand::List {
            available: false,
            json,
        } => {
            let ks: Vec<KernelManifest> = client.get("/v1/kernels").await?;
            if json {
                print_json(&ks)?;
            } else {
                let rows: Vec<Vec<String>> = ks
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.distro.clone(),
                            k.version.clone(),
                            k.arch.clone(),
                            k.source.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(&["NAME", "DISTRO", "VERSION", "ARCH", "SOURCE"], &rows)
                );
            }
        }
        KernelCommand::List {
            available: true,
            json,
        } => {
            let ks: Vec<CatalogKernelView> = client.get("/v1/kernels/catalog").await?;
            if json {
                print_json(&ks)?;
            } else {
                let yes = |b: bool| if b { "yes" } else { "" }.to_string();
                let rows: Vec<Vec<String>> = ks
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.version.clone(),
                            k.arch.clone(),
                            download_size(k.size),
                            yes(k.default),
                            yes(k.local),
                            k.sources.clone(),
                            k.description.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &[
                            "NAME",
                            "VERSION",
                            "ARCH",
                            "SIZE",
                            "DEFAULT",
                            "LOCAL",
                            "SOURCE",
                            "DESCRIPTION"
                        ],
                        &rows
                    )
                );
            }
        }
        KernelCommand::Show { name, json } => {
            let k: KernelView = client.get(&format!("/v1/kernels/{name}")).await?;
            if json {
                print_json(&k)?;
            } else {
                print!("{}", kernel_details(&k));
            }
        }
        KernelCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                match client
                    .send::<(), KernelView>(Method::DELETE, &format!("/v1/kernels/{name}"), None)
                    .await
                {
                    Ok(_) => println!("{name}: removed"),
                    Err(e) => {
                        println!("{name}: error: {e}");
                        failed = true;
                    }
                }
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        KernelCommand::Import { name, from, force } => {
            let req = ImportKernelRequest {
                name,
                from: abs(&from)?,
                force,
            };
            let k: KernelView = client
                .send(Method::POST, "/v1/kernels/import", Some(&req))
                .await?;
            print!("{}", kernel_details(&k));
        }
        KernelCommand::Build { name, force } => {
            let req = BuildRequest { name, force };
            let k: KernelView = client
                .stream_events(
                    Method::POST,
                    "/v1/kernels/build",
                    Some(&req),
                    output::show_events(None),
                )
                .await?;
            print!("{}", kernel_details(&k));
        }
        KernelCommand::Pull { name, force } => {
            let path = format!(
                "/v1/kernels/{name}/pull{}",
                if force { "?force=true" } else { "" }
            );
            let k: KernelView = client
                .stream_events::<(), _>(Method::POST, &path, None, output::show_events(None))
                .await?;
            print!("{}", kernel_details(&k));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn download_sizes_read_as_humans_say_them() {
        for (bytes, want) in [
            (0, "-"),
            (512, "512 B"),
            (1536, "1.5 KiB"),
            (12_400_000, "11.8 MiB"),
            (3 << 30, "3.0 GiB"),
        ] {
            assert_eq!(super::download_size(bytes), want, "{bytes}");
        }
    }
}
