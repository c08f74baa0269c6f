//! The init role: PID 1 of banger's initramfs. Each step logs one line; a
//! failed step logs what failed and why, and the boot goes on as far as it
//! can so `banger vm logs` always has something to show.

mod drive;
pub(crate) mod files;
mod modules;
mod mounts;
pub(crate) mod net;
mod seed;
mod supervise;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use banger_guest_protocol::api::AGENT_PORT;
use banger_guest_protocol::bundle::GuestMount;
use banger_guest_protocol::drive::ConfigDrive;
use nix::unistd::{ForkResult, Pid};

use crate::{console, serve};

/// Where the root drive is mounted before the switch.
const NEW_ROOT: &str = "/newroot";
/// PATH for everything the agent starts when the kernel gave none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Root device when the config drive is missing.
const DEFAULT_ROOT_DEVICE: &str = "/dev/vda";
/// How long to wait for the config drive to appear: drivers loaded as
/// modules probe asynchronously, and TCG guests are slow. Only a VM without
/// a config drive waits this long.
const CONFIG_DRIVE_WAIT: Duration = Duration::from_secs(20);

/// Runs the whole boot and never returns: it ends in the image's init or
/// in the PID 1 supervisor.
pub fn run() -> ! {
    let pid1 = std::process::id() == 1;
    // The kernel starts init with only HOME and TERM; ssh-keygen, sshd and
    // guest.commands need a PATH.
    if std::env::var_os("PATH").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("PATH", DEFAULT_PATH) };
    }
    for e in mounts::mount_kernel_fs(Path::new("/")) {
        console::error("mount kernel filesystems", &e);
    }
    if pid1 {
        attach_console();
    }
    console::log(&format!(
        "banger-agent {} starting",
        env!("CARGO_PKG_VERSION")
    ));
    timeline("agent-start");

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    modules::load_listed(Path::new(modules::LOAD_LIST), &cmdline);
    timeline("modules");
    let config = match drive::discover_within(Path::new("/dev"), &cmdline, CONFIG_DRIVE_WAIT) {
        Ok((path, config)) => {
            console::log(&format!("read config drive {}", path.display()));
            Some(config)
        }
        Err(e) => {
            console::error("read config drive", &e);
            None
        }
    };
    timeline("config-drive");

    configure_network(config.as_ref());
    timeline("network");

    let switched = mount_and_switch(config.as_ref());
    timeline("mount-root");
    if let Some(c) = &config {
        write_guest_files(c);
        // The VM may be killed rather than shut down; keep what was written.
        nix::unistd::sync();
    }
    timeline("guest-files");

    let service = spawn_service(config.as_ref(), true);
    if switched {
        if let Some(init) = supervise::find_init(Path::new("/")) {
            timeline("exec-init");
            console::log(&format!("exec {}", init.display()));
            let e = supervise::exec_init(&init);
            console::log(&format!("exec {} FAILED: {e}", init.display()));
        }
    }
    supervise::supervise(service, || spawn_service(config.as_ref(), false))
}

/// Logs one boot timeline line, `timeline STAGE SECONDS`: the stage that
/// just ended and the time since the kernel booted (CLOCK_BOOTTIME), so a
/// console log shows where a boot's time went (tests/benches/boot.rs reads
/// these lines for banger's boots and the raw baseline's alike).
fn timeline(stage: &str) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        let secs = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
        console::log(&format!("timeline {stage} {secs:.3}"));
    }
}

/// Points stdin/stdout/stderr at /dev/console: the kernel may start /init
/// with none when the initramfs has no /dev/console node.
fn attach_console() {
    if let Ok(c) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which this
            // process owns; `c` stays open for the duration of the call.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
}

fn configure_network(config: Option<&ConfigDrive>) {
    match net::loopback_up() {
        Ok(()) => console::log("lo up"),
        Err(e) => console::error("bring lo up", &e),
    }
    let Some(config) = config else { return };
    let hostname = &config.guest.hostname;
    match nix::unistd::sethostname(hostname) {
        Ok(()) => console::log(&format!("hostname {hostname}")),
        Err(e) => console::error("set hostname", &e),
    }
    for (i, n) in config.guest.network.iter().enumerate() {
        let ifname = net::interface_name(i);
        match net::configure(&ifname, n) {
            Ok(()) => console::log(&format!("{ifname} ({}) {}", n.nic_id, n.address)),
            Err(e) => console::error(&format!("configure {ifname}"), &e),
        }
    }
}

/// Mounts the root drive and `guest.mounts`, then switches root. Returns
/// whether the switch happened.
fn mount_and_switch(config: Option<&ConfigDrive>) -> bool {
    let new_root = Path::new(NEW_ROOT);
    let root_device = config
        .and_then(|c| c.device_of("root"))
        .unwrap_or_else(|| DEFAULT_ROOT_DEVICE.to_string());
    if let Err(e) = mounts::mount_root(&root_device, new_root) {
        console::error(&format!("mount root {root_device}"), &e);
        console::log("staying in the initramfs");
        return false;
    }
    console::log(&format!("mounted root {root_device}"));
    for m in config
        .map(|c| c.guest.mounts.as_slice())
        .unwrap_or_default()
    {
        let step = format!("mount {} on {}", m.drive_id, m.mount_point.display());
        let Some(device) = config.and_then(|c| c.device_of(&m.drive_id)) else {
            console::log(&format!("{step} FAILED: drive not attached"));
            continue;
        };
        match mounts::mount_guest(new_root, &device, m) {
            Ok(()) => {
                console::log(&format!("mounted {device} on {}", m.mount_point.display()));
                prepare_mounted(new_root, m);
            }
            Err(e) => console::error(&step, &e),
        }
    }
    match mounts::switch_root(new_root) {
        Ok(()) => {
            console::log("switched root");
            true
        }
        Err(e) => {
            console::error("switch root", &e);
            false
        }
    }
}

/// After a writable mount: seeds a new disk from the image's directory at
/// the mount point, and gives `/root` its `0755 root:root`.
fn prepare_mounted(new_root: &Path, m: &GuestMount) {
    if m.read_only {
        return;
    }
    let at = m.mount_point.display();
    match seed::seed_new_mount(new_root, &m.mount_point, Path::new(seed::LOWER)) {
        Ok(Some(c)) => console::log(&format!(
            "seeded new disk on {at} from the image ({} entries, {} special files skipped)",
            c.entries, c.skipped
        )),
        Ok(None) => {}
        Err(e) => console::error(&format!("seed new disk on {at} from the image"), &e),
    }
    if m.mount_point == Path::new(seed::ROOT_HOME) {
        if let Err(e) = seed::normalise_home(&new_root.join("root")) {
            console::error("reset /root to 0755 root:root", &e);
        }
    }
}

/// Writes identity files, `guest.files` and authorized_keys in the
/// current root (the image after a successful switch).
fn write_guest_files(config: &ConfigDrive) {
    let root = Path::new("/");
    if let Err(e) = files::write_identity(root, &config.guest) {
        console::error("write hostname/hosts/resolv.conf", &e);
    }
    for f in &config.guest.files {
        match files::write_file(root, f) {
            Ok(()) => console::log(&format!("wrote {}", f.path.display())),
            Err(e) => console::error(&format!("write {}", f.path.display()), &e),
        }
    }
    match files::add_authorized_keys(root, &config.guest.authorized_keys) {
        Ok(()) if config.guest.authorized_keys.is_empty() => {}
        Ok(()) => console::log("wrote /root/.ssh/authorized_keys"),
        Err(e) => console::error("write authorized_keys", &e),
    }
}

/// Forks the service role; the first one also runs `guest.commands`.
fn spawn_service(config: Option<&ConfigDrive>, run_commands: bool) -> Option<Pid> {
    // SAFETY: the init role is single-threaded, so the child may run any
    // code after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { child }) => Some(child),
        Ok(ForkResult::Child) => {
            supervise::reset_signal_mask();
            let _ = nix::unistd::setsid();
            if run_commands {
                if let Some(c) = config.filter(|c| !c.guest.commands.is_empty()) {
                    let (commands, env) = (c.guest.commands.clone(), c.guest.env.clone());
                    std::thread::spawn(move || {
                        for (argv, r) in commands
                            .iter()
                            .zip(supervise::run_commands(&commands, &env))
                        {
                            match r {
                                Ok(s) => console::log(&format!("command {argv:?}: {s}")),
                                Err(e) => console::log(&format!("command {argv:?} FAILED: {e}")),
                            }
                        }
                    });
                }
            }
            // QEMU's migratable transport: the API over a virtio-serial
            // port instead of vsock (`docs/snapshots.md`).
            let serial = serve::find_serial_port(
                Path::new("/sys/class/virtio-ports"),
                Path::new("/sys/bus/virtio/devices"),
                serve::SERIAL_PORT_WAIT,
            );
            match serial {
                serve::SerialPort::Missing { vsock } => {
                    let hint = format!(
                        "no virtio-serial port {:?} appeared within {:?}: the kernel needs virtio_console (CONFIG_VIRTIO_CONSOLE) for QEMU's serial transport, or set qemu_agent_transport = \"vsock\"",
                        banger_guest_protocol::api::SERIAL_PORT_NAME,
                        serve::SERIAL_PORT_WAIT
                    );
                    if !vsock {
                        console::unreachable(&format!(
                            "{hint} (this VM has no vsock device either)"
                        ));
                        std::process::exit(1)
                    }
                    console::log(&format!("{hint}; trying vsock"));
                }
                serve::SerialPort::Found(device) => {
                    match serve::SerialServer::start(&device, Path::new("/")) {
                        Ok(server) => {
                            timeline("agent-listening");
                            console::log(&format!(
                                "agent API listening on the serial port {}",
                                device.display()
                            ));
                            let announcer = server.announcer();
                            std::thread::spawn(move || {
                                if let Err(e) = announcer.announce_ready() {
                                    console::log(&format!(
                                        "no host took the ready announcement: {e}"
                                    ));
                                }
                            });
                            server.run()
                        }
                        Err(e) => console::unreachable(&format!(
                            "cannot open the agent's serial port {}: {e}",
                            device.display()
                        )),
                    }
                    std::process::exit(1)
                }
                serve::SerialPort::NoDevice => {}
            }
            let result = serve::Server::bind(serve::Endpoint::Vsock(AGENT_PORT), Path::new("/"))
                .and_then(|s| {
                    timeline("agent-listening");
                    console::log(&format!("agent API listening on vsock port {AGENT_PORT}"));
                    std::thread::spawn(|| {
                        if let Err(e) = serve::announce_ready() {
                            console::log(&format!("no host took the ready announcement: {e}"));
                        }
                    });
                    s.run()
                });
            if let Err(e) = result {
                console::unreachable(&format!(
                    "the agent API on vsock port {AGENT_PORT}: {}",
                    console::chain(&e)
                ));
            }
            std::process::exit(1)
        }
        Err(e) => {
            console::error("fork the agent service", &e);
            None
        }
    }
}
