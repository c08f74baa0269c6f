//! `banger vm ...` and `banger cap list`: thin calls of the daemon API.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::{Context, Result};
use banger_core::api::{CapView, CreateVmRequest, SetVmRequest, VmView};
use banger_core::client::{Client, ClientError, Method};

use crate::args::{CreateArgs, SetArgs};
use crate::ordered::run_in_order;
use crate::output;

/// A lifecycle verb that takes several VM names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `POST .../start`, streamed.
    Start,
    /// `POST .../stop`.
    Stop,
    /// `POST .../restart`, streamed.
    Restart,
    /// `DELETE /v1/vms/{name}`.
    Delete,
    /// `POST .../kill`.
    Kill,
}

impl Verb {
    /// What the report says after success.
    fn done(self) -> &'static str {
        match self {
            Verb::Start => "started",
            Verb::Stop => "stopped",
            Verb::Restart => "restarted",
            Verb::Delete => "deleted",
            Verb::Kill => "killed",
        }
    }
}

fn vm_path(name: &str) -> String {
    // Names are validated (a-z, 0-9, '-') so they need no escaping.
    format!("/v1/vms/{name}")
}

fn print_event(prefix: Option<&str>, e: &banger_core::api::Event) {
    if let Some(line) = output::event_line(prefix, e) {
        eprintln!("{line}");
    }
}

/// `vm create`: streams progress to stderr, prints the VM on stdout.
pub async fn create(client: &Client, a: Box<CreateArgs>) -> Result<ExitCode> {
    let abs = |p: &std::path::Path| {
        std::path::absolute(p).with_context(|| format!("Resolving {}", p.display()))
    };
    let req = CreateVmRequest {
        name: a.name,
        kernel: abs(&a.kernel)?,
        initrd: a.initrd.as_deref().map(abs).transpose()?,
        rootfs: abs(&a.rootfs)?,
        vcpus: a.shape.vcpu,
        memory_mib: a.shape.memory,
        disk_size: a.shape.disk_size,
        caps: a.caps,
        boot_args: a.boot_args,
        no_start: a.no_start,
    };
    let vm = client
        .stream_events(Method::POST, "/v1/vms", Some(&req), |e| {
            print_event(None, e)
        })
        .await?;
    print!("{}", output::vm_details(&vm));
    Ok(ExitCode::SUCCESS)
}

/// One lifecycle request for one VM.
async fn lifecycle(
    client: &Client,
    verb: Verb,
    name: &str,
    prefix: bool,
) -> Result<VmView, ClientError> {
    let path = vm_path(name);
    let prefix = prefix.then_some(name);
    let none: Option<&()> = None;
    match verb {
        Verb::Start => {
            client
                .stream_events(Method::POST, &format!("{path}/start"), none, |e| {
                    print_event(prefix, e)
                })
                .await
        }
        Verb::Restart => {
            client
                .stream_events(Method::POST, &format!("{path}/restart"), none, |e| {
                    print_event(prefix, e)
                })
                .await
        }
        Verb::Stop => {
            client
                .send(Method::POST, &format!("{path}/stop"), none)
                .await
        }
        Verb::Kill => {
            client
                .send(Method::POST, &format!("{path}/kill"), none)
                .await
        }
        Verb::Delete => client.send(Method::DELETE, &path, none).await,
    }
}

/// `vm start|stop|restart|delete|kill NAME...`: one request per name, all at
/// once; results in the order given; exit 1 if any failed.
pub async fn lifecycle_all(client: &Client, verb: Verb, names: &[String]) -> Result<ExitCode> {
    let several = names.len() > 1;
    let failed = run_in_order(
        names,
        |name| async move { lifecycle(client, verb, &name, several).await },
        |name, result| match result {
            Ok(_) => println!("{name}: {}", verb.done()),
            Err(e) => println!("{name}: error: {}", error_chain(&e)),
        },
    )
    .await;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `vm set`.
pub async fn set(client: &Client, a: SetArgs) -> Result<ExitCode> {
    let req = SetVmRequest {
        vcpus: a.shape.vcpu,
        memory_mib: a.shape.memory,
        disk_size: a.shape.disk_size,
    };
    let vm: VmView = client
        .send(Method::PATCH, &vm_path(&a.name), Some(&req))
        .await?;
    print!("{}", output::vm_details(&vm));
    Ok(ExitCode::SUCCESS)
}

/// `vm list`.
pub async fn list(client: &Client, json: bool) -> Result<ExitCode> {
    let vms: Vec<VmView> = client.get("/v1/vms").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        print!("{}", output::vm_table(&vms));
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm show`.
pub async fn show(client: &Client, name: &str, json: bool) -> Result<ExitCode> {
    let vm: VmView = client.get(&vm_path(name)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vm)?);
    } else {
        print!("{}", output::vm_details(&vm));
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm logs [-f]`: the serial console, raw, to stdout.
pub async fn logs(client: &Client, name: &str, follow: bool) -> Result<ExitCode> {
    let mut path = format!("{}/logs", vm_path(name));
    if follow {
        path.push_str("?follow=true");
    }
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    client
        .stream_raw(&path, |chunk| {
            match out.write_all(chunk).and_then(|()| out.flush()) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .await?;
    match write_err {
        // The reader went away (`| head`): that is a normal end.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Some(e) => Err(e).context("Writing the log to stdout"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `cap list`.
pub async fn cap_list(client: &Client, json: bool) -> Result<ExitCode> {
    let caps: Vec<CapView> = client.get("/v1/capabilities").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&caps)?);
    } else {
        print!("{}", output::cap_table(&caps));
    }
    Ok(ExitCode::SUCCESS)
}
