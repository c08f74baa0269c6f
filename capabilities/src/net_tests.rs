//! Tests of `network`, `nat` and `dns` through the capability trait, with a
//! real SQLite lease store and recorded host operations.

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_api::config::NetworkConfig;
use banger_api::guest::GuestConfig;
use banger_api::machine::MachineSpec;
use banger_api::model::{
    ByteSize, CapOptions, EnabledCap, VmName, VmRecord, VmSpec, VmState, VmmKind,
};
use banger_core::capability::{
    Capability, DaemonCtx, HookCtx, HookLog, RunningVm, TeardownReason, builtins,
};
use banger_core::store::Store;
use banger_host::hostops::{HostOps, RecordingHostOps};

use crate::dns::{Dns, server as dns};
use crate::nat::Nat;
use crate::network::{HostNetwork, NetIdentity, Network, NicState, host_network};
use crate::test_env::TestEnv;

struct Quiet;

impl HookLog for Quiet {
    fn info(&self, _: &str) {}
    fn warn(&self, _: &str) {}
}

fn vm(name: &str) -> VmRecord {
    let mut vm = VmRecord::new(
        VmName::parse(name).unwrap(),
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            disk_size: ByteSize(1 << 20),
            kernel: "/k".into(),
            initrd: None,
            rootfs_source: "/r".into(),
            extra_boot_args: None,
            vmm: VmmKind::Firecracker,
        },
        vec![],
        0,
    );
    vm.state = VmState::Starting;
    vm
}

fn machine() -> MachineSpec {
    MachineSpec {
        kernel: "/k".into(),
        initrd: None,
        boot_args: String::new(),
        vcpus: 1,
        memory_mib: 256,
        drives: vec![],
        nics: vec![],
        vsock: None,
        serial_log: "/s".into(),
        pci_devices: Vec::new(),
    }
}

struct Env {
    dir: tempfile::TempDir,
    net: Arc<HostNetwork>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
    let net = Arc::new(HostNetwork::new(
        NetworkConfig {
            bridge: "bgunit0".into(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            ..NetworkConfig::default()
        },
        store,
        dir.path(),
        1000,
    ));
    Env { dir, net }
}

impl Env {
    fn vm_dir(&self, vm: &VmRecord) -> std::path::PathBuf {
        self.dir.path().join("vms").join(vm.id.as_str())
    }

    fn run<R>(&self, vm: &VmRecord, host: &dyn HostOps, f: impl FnOnce(&HookCtx<'_>) -> R) -> R {
        let dir = self.vm_dir(vm);
        std::fs::create_dir_all(&dir).unwrap();
        let options = CapOptions::new();
        let config =
            banger_api::config::Config::defaults(std::path::Path::new("/nonexistent/config.toml"));
        let ctx = HookCtx {
            vm,
            vm_dir: &dir,
            options: &options,
            host,
            config: &config,
            log: &Quiet,
        };
        f(&ctx)
    }
}

#[test]
fn network_leases_attaches_and_configures_the_guest() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Network::with(e.net.clone());
    let a = vm("a");
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    let tap0 = format!("{}0", e.net.taps().prefix());
    let calls = host.calls();
    assert_eq!(calls[0], "ensure_bridge bgunit0 10.77.0.1/24");
    // The guard goes on the VM's own tap, MAC and address.
    assert!(
        calls.contains(&format!(
            "add_guest {} bgunit0 {tap0} 10.77.0.2 06:00:0a:4d:00:02",
            a.id
        )),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("attach_to_bridge {tap0} bgunit0")),
        "{calls:?}"
    );

    let mut m = machine();
    e.run(&a, &host, |c| cap.configure_machine(c, &mut m))
        .unwrap();
    assert_eq!(m.nics.len(), 1);
    assert_eq!(m.nics[0].tap, tap0);
    assert_eq!(m.nics[0].mac, "06:00:0a:4d:00:02");

    let mut g = GuestConfig::new("a");
    e.run(&a, &host, |c| cap.guest_config(c, &mut g)).unwrap();
    assert_eq!(g.network.len(), 1);
    let n = &g.network[0];
    assert_eq!(n.nic_id, m.nics[0].id);
    assert_eq!(n.address, "10.77.0.2/24");
    assert_eq!(n.gateway.as_deref(), Some("10.77.0.1"));
    assert_eq!(n.nameservers, vec!["10.77.0.1"]);
    assert_eq!(n.mtu, Some(1500));
    // A second contribution for the same NIC is refused, not duplicated.
    assert!(e.run(&a, &host, |c| cap.guest_config(c, &mut g)).is_err());

    // A second VM gets its own address and tap.
    let b = vm("b");
    e.run(&b, &host, |c| cap.prepare_host(c)).unwrap();
    let mut mb = machine();
    e.run(&b, &host, |c| cap.configure_machine(c, &mut mb))
        .unwrap();
    assert_ne!(mb.nics[0].tap, tap0);
    assert_eq!(mb.nics[0].mac, "06:00:0a:4d:00:03");
}

#[test]
fn network_keeps_the_address_across_stop_and_frees_it_on_delete() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Network::with(e.net.clone());
    let a = vm("a");
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    let first = e.net.leases().get(&a.id).unwrap().unwrap();

    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Stop))
        .unwrap();
    assert_eq!(e.net.leases().get(&a.id).unwrap(), Some(first.clone()));
    assert!(!e.vm_dir(&a).join("network.json").exists());
    // The configure hook now has nothing to attach: it says so.
    let err = e
        .run(&a, &host, |c| cap.configure_machine(c, &mut machine()))
        .unwrap_err();
    assert!(err.to_string().contains("no tap"), "{err}");

    // Another VM arriving meanwhile does not take a's address.
    let b = vm("b");
    e.run(&b, &host, |c| cap.prepare_host(c)).unwrap();
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    assert_eq!(e.net.leases().get(&a.id).unwrap(), Some(first.clone()));

    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Delete))
        .unwrap();
    assert_eq!(e.net.leases().get(&a.id).unwrap(), None);
    // Teardown tolerates what is already gone.
    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Delete))
        .unwrap();
    let c_vm = vm("c");
    assert_eq!(e.net.lease(&c_vm.id).unwrap().ip, first.ip);
}

#[test]
fn network_gives_views_the_leased_address_only() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Network::with(e.net.clone());
    let a = vm("a");
    assert_eq!(cap.guest_address(&a.id), None);
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    assert_eq!(cap.guest_address(&a.id), Some(Ipv4Addr::new(10, 77, 0, 2)));
    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Delete))
        .unwrap();
    assert_eq!(cap.guest_address(&a.id), None);
}

#[test]
fn nat_adds_rules_for_the_vm_address_and_always_removes_them() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Nat::with(e.net.clone());
    let a = vm("a");
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    let ip = e.net.leases().get(&a.id).unwrap().unwrap().ip;
    assert_eq!(host.calls(), vec![format!("add_nat {} bgunit0 {ip}", a.id)]);
    for reason in [TeardownReason::Rollback, TeardownReason::Stop] {
        e.run(&a, &host, |c| cap.teardown(c, reason)).unwrap();
        assert_eq!(
            host.calls().last().unwrap(),
            &format!("remove_nat {}", a.id)
        );
    }
    assert!(e.net.leases().get(&a.id).unwrap().is_some());
    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Delete))
        .unwrap();
    assert!(e.net.leases().get(&a.id).unwrap().is_none());
}

#[test]
fn dns_publishes_the_record_by_post_start_and_withdraws_it() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Dns::with(e.net.clone());
    let a = vm("web");
    e.run(&a, &host, |c| cap.prepare_host(c)).unwrap();
    e.run(&a, &host, |c| cap.post_start(c)).unwrap();
    let records = dns::read_records(&dns::records_path(e.dir.path())).unwrap();
    assert_eq!(records.get("web"), Some(&Ipv4Addr::new(10, 77, 0, 2)));
    e.run(&a, &host, |c| cap.teardown(c, TeardownReason::Stop))
        .unwrap();
    assert!(dns::read_records(e.net.dns_records()).unwrap().is_empty());
}

#[test]
fn dns_withdraws_a_record_still_being_published_when_the_start_rolls_back() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Dns::with(e.net.clone());
    for name in ["r1", "r2", "r3"] {
        let v = vm(name);
        // No post_start: the rollback's teardown comes right after.
        e.run(&v, &host, |c| cap.prepare_host(c)).unwrap();
        e.run(&v, &host, |c| cap.teardown(c, TeardownReason::Rollback))
            .unwrap();
        let left = dns::read_records(e.net.dns_records()).unwrap();
        assert!(left.is_empty(), "{name}: {left:?}");
    }
}

#[test]
fn dns_daemon_start_rewrites_the_records_from_the_running_vms_leases() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
    // A free loopback port for the server this hook starts.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let net = Arc::new(HostNetwork::new(
        NetworkConfig {
            bridge: "bgunit1".into(),
            subnet: "10.78.0.0/24".parse().unwrap(),
            dns_port: port,
            ..NetworkConfig::default()
        },
        store,
        dir.path(),
        1000,
    ));
    let records = net.dns_records().to_path_buf();
    let with_dns = |name: &str| {
        let mut v = vm(name);
        v.caps = vec![EnabledCap {
            name: crate::dns::NAME.into(),
            options: Default::default(),
        }];
        v
    };
    // Running with the capability and a lease; running without the
    // capability; stopped behind the daemon's back (no teardown).
    let (up, plain, gone) = (with_dns("up"), vm("plain"), with_dns("gone"));
    let up_ip = net.lease(&up.id).unwrap().ip;
    let gone_ip = net.lease(&gone.id).unwrap().ip;
    dns::set_record(&records, "up", Some(up_ip)).unwrap();
    dns::set_record(&records, "gone", Some(gone_ip)).unwrap();
    let running = [
        RunningVm {
            vm: up,
            vm_dir: dir.path().join("up"),
        },
        RunningVm {
            vm: plain,
            vm_dir: dir.path().join("plain"),
        },
    ];
    // The daemon's runtime: worker threads drive the server's tasks.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let host = RecordingHostOps::default();
    let ctx = DaemonCtx {
        host: &host,
        running: &running,
        runtime: rt.handle().clone(),
    };
    let cap = Dns::with(net.clone());
    let start_leaves_only_up = || {
        cap.daemon_start(&ctx).unwrap();
        let left = dns::read_records(&records).unwrap();
        assert_eq!(
            left.into_iter().collect::<Vec<_>>(),
            [("up".to_string(), up_ip)]
        );
        cap.daemon_stop(&ctx);
    };
    start_leaves_only_up();

    // Records are written unsynced: a power loss may cut the file short.
    // The next start rewrites it whole from the running VMs' leases.
    std::fs::write(&records, b"{\"version\": 1, \"rec").unwrap();
    assert!(dns::read_records(&records).is_err());
    start_leaves_only_up();
    // After a power loss nothing runs: a damaged file becomes an empty one.
    std::fs::write(&records, b"").unwrap();
    let none = DaemonCtx {
        running: &[],
        ..ctx
    };
    cap.daemon_start(&none).unwrap();
    assert!(dns::read_records(&records).unwrap().is_empty());
    cap.daemon_stop(&none);
}

#[test]
fn built_ins_share_one_host_network_whose_daemon_hooks_adopt_prune_and_drain() {
    let t = TestEnv::new();
    let (dir, recording) = (&t.dir, &t.recording);
    let host = &t.host;
    let env = t.env();
    let (caps, errors) = builtins(&env);
    assert!(errors.is_empty(), "{errors:?}");
    // network, dns and nat asked for it while being made: one value.
    assert!(Arc::ptr_eq(&host_network(&env), &host_network(&env)));
    let network = caps.iter().find(|c| c.name() == "network").unwrap();

    // Unset in config: this daemon's own names, derived from its state dir.
    let net = host_network(&env);
    let me = NetIdentity::for_state_dir(&t.paths.state_dir);
    let (bridge, p) = (me.bridge(), me.tap_prefix.clone());
    assert_eq!(net.config().bridge, bridge);
    assert_eq!(net.config().subnet, me.subnet());
    assert_ne!(bridge, "banger0");

    // A lease of a VM with no row, and a VM that kept running on tap 0.
    net.leases()
        .acquire(&vm("gone").id, &net.config().subnet)
        .unwrap();
    let survivor = RunningVm {
        vm: vm("up"),
        vm_dir: dir.path().join("up"),
    };
    let ip = net.config().subnet.vm_hosts().nth(7).unwrap();
    NicState {
        tap: format!("{p}0"),
        ip,
        mac: banger_api::net::MacAddr::for_ip(ip).to_string(),
    }
    .save(&survivor.vm_dir)
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let running = [survivor];
    let ctx = DaemonCtx {
        host: host.as_ref(),
        running: &running,
        runtime: rt.handle().clone(),
    };
    network.daemon_start(&ctx).unwrap();
    assert!(net.leases().list().unwrap().is_empty());
    let calls = recording.calls();
    let gw = net.gateway();
    assert_eq!(calls[0], format!("ensure_bridge {bridge} {gw}/24"));
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with(&format!("create_tap {p}1 "))),
        "{calls:?}"
    );
    // The survivor's tap is not remade, but its guard is put back.
    let tap0 = format!("{p}0");
    let touching: Vec<&String> = calls.iter().filter(|c| c.contains(&tap0)).collect();
    assert_eq!(
        touching,
        [&format!(
            "add_guest {} {bridge} {tap0} {ip} {}",
            running[0].vm.id,
            banger_api::net::MacAddr::for_ip(ip)
        )],
        "{calls:?}"
    );
    let warm: Vec<String> = (1..=crate::network::DEFAULT_WARM)
        .map(|i| format!("{p}{i}"))
        .collect();
    assert_eq!(net.taps().free(), warm);

    network.daemon_stop(&ctx);
    let calls = recording.calls();
    let mut last: Vec<String> = warm.iter().map(|t| format!("delete_link {t}")).collect();
    last.push(format!("unroute_dns {bridge}"));
    assert_eq!(calls[calls.len() - last.len()..], last);
    assert!(host_network(&env).taps().free().is_empty());
}

#[test]
fn network_takes_only_peers_and_nat_only_an_allow_list() {
    let e = env();
    let (network, nat) = (Network::with(e.net.clone()), Nat::with(e.net.clone()));
    let opts = |pairs: &[(&str, &str)]| -> CapOptions {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    network.validate_options(&opts(&[])).unwrap();
    network
        .validate_options(&opts(&[("peers", "true")]))
        .unwrap();
    for (bad, why) in [
        (opts(&[("peers", "yes")]), "peers=true"),
        (opts(&[("bridge", "x")]), "unknown option \"bridge\""),
    ] {
        let err = network.validate_options(&bad).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
    nat.validate_options(&opts(&[("allow", "10.1.0.0/16,192.0.2.7/32")]))
        .unwrap();
    for (bad, why) in [
        (opts(&[("allow", "10.1.0.1/16")]), "\"10.1.0.1/16\""),
        (opts(&[("allow", "10.0.0.0/8,nope")]), "\"nope\""),
        (opts(&[("deny", "10.0.0.0/8")]), "allow=CIDR"),
    ] {
        let err = nat.validate_options(&bad).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn network_guards_the_tap_with_peers_as_asked_and_unguards_it_on_every_teardown() {
    let e = env();
    let host = RecordingHostOps::default();
    let cap = Network::with(e.net.clone());
    let a = vm("a");
    let dir = e.vm_dir(&a);
    std::fs::create_dir_all(&dir).unwrap();
    let mut options = CapOptions::new();
    options.insert("peers".into(), "true".into());
    let config =
        banger_api::config::Config::defaults(std::path::Path::new("/nonexistent/config.toml"));
    let ctx = HookCtx {
        vm: &a,
        vm_dir: &dir,
        options: &options,
        host: &host,
        config: &config,
        log: &Quiet,
    };
    cap.prepare_host(&ctx).unwrap();
    let guard = host
        .calls()
        .into_iter()
        .find(|c| c.starts_with("add_guest"))
        .unwrap();
    assert!(guard.ends_with(" peers"), "{guard}");
    for reason in [TeardownReason::Rollback, TeardownReason::Stop] {
        cap.teardown(&ctx, reason).unwrap();
        assert!(
            host.calls().contains(&format!("remove_guest {}", a.id)),
            "{:?}",
            host.calls()
        );
    }
}
