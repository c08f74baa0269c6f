//! Loading the boot modules: a distribution kernel builds virtio-mmio,
//! virtio-blk, vsock and friends as modules, so banger's initramfs carries
//! them (decompressed) with `/banger/modules.load`, one absolute path a line,
//! dependencies first. Each is loaded with `finit_module(2)`, with the
//! `<module>.<param>=` arguments of the kernel command line (what modprobe
//! would pass: e.g. `virtio_mmio.device=` on Firecracker). A module that
//! fails is logged and the boot goes on; the drive lookup then says what is
//! missing.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// The load list in the initramfs.
pub const LOAD_LIST: &str = "/banger/modules.load";

/// What happened to one listed module.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel took it.
    Loaded,
    /// It was loaded already (EEXIST).
    AlreadyLoaded,
    /// Opening or loading it failed.
    Failed(String),
}

/// Loads every module in the list at `list` (none when it is missing) with
/// the kernel's `finit_module`, logging each.
pub fn load_listed(list: &Path, cmdline: &str) {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            crate::console::error(&format!("read {}", list.display()), &e);
            return;
        }
    };
    let load = |f: &File, params: &CStr| finit_module(f, params, ModuleInitFlags::empty());
    for (name, outcome) in load_each(&text, cmdline, load) {
        crate::console::log(&match outcome {
            Outcome::Loaded => format!("loaded module {name}"),
            Outcome::AlreadyLoaded => format!("module {name} already loaded"),
            Outcome::Failed(why) => format!("load module {name} FAILED: {why}"),
        });
    }
}

/// Opens and loads each path of `list` in order with `load`, returning
/// each module's name and outcome.
fn load_each(
    list: &str,
    cmdline: &str,
    mut load: impl FnMut(&File, &CStr) -> Result<(), Errno>,
) -> Vec<(String, Outcome)> {
    let args = kernel_args(cmdline);
    let mut out = Vec::new();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = module_name(path);
        let outcome = match File::open(path) {
            Err(e) => Outcome::Failed(format!("cannot open {path}: {e}")),
            Ok(f) => match CString::new(params_for(&name, &args)) {
                Err(_) => Outcome::Failed("its kernel arguments contain a NUL byte".into()),
                Ok(params) => match load(&f, &params) {
                    Ok(()) => Outcome::Loaded,
                    Err(Errno::EEXIST) => Outcome::AlreadyLoaded,
                    Err(e) => Outcome::Failed(format!("{path}: {}", e.desc())),
                },
            },
        };
        out.push((name, outcome));
    }
    out
}

/// `/lib/modules/v/kernel/net/vmw_vsock/vmw-vsock.ko` → `vmw_vsock`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.strip_suffix(".ko").unwrap_or(file).replace('-', "_")
}

/// The kernel command line split like the kernel does: on spaces outside
/// double quotes, quotes kept (finit_module parses them again), stopping at
/// `--` (what follows is for init).
fn kernel_args(cmdline: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    args.into_iter().take_while(|a| a != "--").collect()
}

/// The `name.param=value` arguments for module `name`, without the
/// `name.` prefix, space-separated.
fn params_for(name: &str, args: &[String]) -> String {
    args.iter()
        .filter_map(|a| {
            let (module, rest) = a.split_once('.')?;
            let names_param = !module.contains('=') && module.replace('-', "_") == name;
            names_param.then_some(rest)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn passes_each_module_its_own_kernel_arguments() {
        let args = kernel_args(
            r#"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 foo.bar="a b" x=virtio_mmio.no -- virtio_mmio.init=1"#,
        );
        assert_eq!(
            params_for("virtio_mmio", &args),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(params_for("foo", &args), r#"bar="a b""#);
        assert_eq!(params_for("evdev", &args), "");
    }

    #[test]
    fn loads_in_listed_order_and_keeps_going_past_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut list = String::new();
        for m in ["vsock", "vmw-vsock-virtio-transport", "busy", "broken"] {
            let p = dir.path().join(format!("{m}.ko"));
            std::fs::write(&p, m).unwrap();
            list.push_str(&format!("{}\n", p.display()));
        }
        list.push_str(&format!("\n{}/missing.ko\n", dir.path().display()));
        let mut calls = Vec::new();
        let outcomes = load_each(&list, "vsock.x=1", |f, params| {
            let mut content = String::new();
            (&*f).read_to_string(&mut content).unwrap();
            calls.push((content.clone(), params.to_str().unwrap().to_owned()));
            match content.as_str() {
                "busy" => Err(Errno::EEXIST),
                "broken" => Err(Errno::ENOEXEC),
                _ => Ok(()),
            }
        });
        assert_eq!(
            calls,
            [
                ("vsock".into(), "x=1".into()),
                ("vmw-vsock-virtio-transport".into(), String::new()),
                ("busy".into(), String::new()),
                ("broken".into(), String::new()),
            ]
        );
        let names: Vec<&str> = outcomes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "vsock",
                "vmw_vsock_virtio_transport",
                "busy",
                "broken",
                "missing"
            ]
        );
        assert_eq!(outcomes[0].1, Outcome::Loaded);
        assert_eq!(outcomes[2].1, Outcome::AlreadyLoaded);
        assert!(
            matches!(&outcomes[3].1, Outcome::Failed(w) if w.contains("broken.ko") && w.contains("Exec format")),
            "{:?}",
            outcomes[3]
        );
        assert!(
            matches!(&outcomes[4].1, Outcome::Failed(w) if w.contains("cannot open") && w.contains("missing.ko")),
            "{:?}",
            outcomes[4]
        );
    }
}
