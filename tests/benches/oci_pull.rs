//! OCI image → bootable ext4, banger against a baseline pipeline on the same
//! image in the same run.
//!
//! The bench builds a realistic three-layer image (several thousand files of
//! mixed sizes, gzip layers, whiteouts, an opaque directory, symlinks,
//! hardlinks and a setuid binary), pushes it to a real `docker-registry` on
//! loopback and then measures, three times each in alternating order:
//!
//! - `banger-cold`: `banger_artifacts::images::pull_rootfs` with an empty layer
//!   cache (library level: the pipeline, not daemon or CLI overhead);
//! - `banger-cached`: the same pull again into a fresh staging dir with the
//!   warm layer cache but without the kept flattened image (layers applied
//!   and the ext4 built again);
//! - `banger-repull`: the same pull once more with the flattened image kept
//!   by the previous pull: a clone of it (what `image pull` of an image
//!   pulled before does);
//! - `baseline`: `skopeo copy` to an OCI layout + `umoci unpack --rootless` +
//!   `mkfs.ext4 -d` at the size banger chose.
//!
//! Both outputs are checked to hold the same bytes for a sample of files and
//! the same directory listings, so the comparison is of equal work.
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench oci_pull`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_artifacts::images::{PullEvent, PullOptions, PulledRootfs, pull_rootfs};
use test_infra::registry::{Entry, Registry, TestLayer};

mod common;

const REPO_TAG: &str = "bench/rootfs:v1";
const ROUNDS: usize = 3;

/// splitmix64: a deterministic generator, so every run benches the same image.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// A file size: mostly small, some medium, a few large, like a distro.
    fn size(&mut self) -> usize {
        let r = self.next() % 1000;
        (match r {
            0..800 => self.range(100, 4 << 10),
            800..980 => self.range(4 << 10, 32 << 10),
            980..998 => self.range(32 << 10, 256 << 10),
            _ => self.range(1 << 20, 2 << 20),
        }) as usize
    }

    /// Contents: text-like (compressible) for two thirds, random otherwise.
    fn content(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&[u8]; 16] = [
            b"the ",
            b"lib",
            b"config ",
            b"usr/share ",
            b"0x7f ",
            b"return ",
            b"value=",
            b"\n",
            b"int ",
            b"static ",
            b"# comment ",
            b"path ",
            b"error ",
            b"\t",
            b"42 ",
            b"banger ",
        ];
        let mut out = Vec::with_capacity(len + 16);
        if self.next() % 3 == 0 {
            while out.len() < len {
                out.extend_from_slice(&self.next().to_le_bytes());
            }
        } else {
            while out.len() < len {
                out.extend_from_slice(WORDS[(self.next() % 16) as usize]);
            }
        }
        out.truncate(len);
        out
    }
}

/// The image to push plus what the final tree must hold, for sanity checks.
struct Image {
    layers: Vec<TestLayer>,
    /// Final contents of sample paths (absolute, as debugfs wants them).
    expected: BTreeMap<String, Vec<u8>>,
    /// Paths that a whiteout or opaque dir must have removed.
    gone: Vec<String>,
    /// Directories whose listings must match between the two images.
    dirs: Vec<String>,
    files: usize,
    bytes: u64,
}

fn file(path: &str, content: Vec<u8>, mode: u32) -> Entry {
    Entry::File {
        path: path.to_string(),
        content,
        mode,
        uid: 0,
        gid: 0,
    }
}

/// Accumulates generated files and remembers a sample of final contents.
struct Gen {
    rng: Rng,
    expected: BTreeMap<String, Vec<u8>>,
    files: usize,
    bytes: u64,
}

impl Gen {
    fn add(&mut self, entries: &mut Vec<Entry>, path: String, mode: u32) {
        let len = self.rng.size();
        let content = self.rng.content(len);
        self.files += 1;
        self.bytes += content.len() as u64;
        let key = format!("/{path}");
        if self.rng.next() % 97 == 0 || content.len() > (1 << 20) {
            self.expected.insert(key, content.clone());
        } else {
            // An overwrite replaces what an earlier layer's sample said.
            self.expected.remove(&key);
        }
        entries.push(file(&path, content, mode));
    }
}

fn build_image() -> Image {
    let mut g = Gen {
        rng: Rng(0x0c1_b4e6),
        expected: BTreeMap::new(),
        files: 0,
        bytes: 0,
    };
    let mut gone = Vec::new();

    // Layer 1: the base system, 100 library dirs of 50 files.
    let mut l1 = vec![
        Entry::dir("usr", 0o755),
        Entry::dir("usr/bin", 0o755),
        Entry::dir("usr/lib", 0o755),
        Entry::dir("etc", 0o755),
        Entry::dir("tmp", 0o1777),
    ];
    for d in 0..100 {
        l1.push(Entry::dir(&format!("usr/lib/p{d}"), 0o755));
        for f in 0..50 {
            g.add(&mut l1, format!("usr/lib/p{d}/f{f}"), 0o644);
        }
    }
    for b in 0..200 {
        g.add(&mut l1, format!("usr/bin/tool{b}"), 0o755);
        l1.push(Entry::symlink(
            &format!("usr/bin/alias{b}"),
            &format!("tool{b}"),
        ));
    }
    for h in 0..50 {
        l1.push(Entry::hardlink(
            &format!("usr/bin/hard{h}"),
            &format!("usr/bin/tool{h}"),
        ));
    }
    let su = g.rng.content(40 << 10);
    g.expected.insert("/usr/bin/su".to_string(), su.clone());
    l1.push(file("usr/bin/su", su, 0o4755));
    l1.push(Entry::symlink("lib", "usr/lib"));

    // Layer 2: an application, overwrites, whiteouts and an opaque dir.
    let mut l2 = vec![Entry::dir("opt", 0o755), Entry::dir("opt/app", 0o755)];
    for d in 0..20 {
        l2.push(Entry::dir(&format!("opt/app/m{d}"), 0o755));
        for f in 0..60 {
            g.add(&mut l2, format!("opt/app/m{d}/f{f}"), 0o644);
        }
    }
    for d in 10..16 {
        for f in 0..50 {
            g.add(&mut l2, format!("usr/lib/p{d}/f{f}"), 0o644);
        }
    }
    for d in 20..24 {
        for f in 0..50 {
            let path = format!("usr/lib/p{d}/f{f}");
            g.expected.remove(&format!("/{path}"));
            l2.push(Entry::whiteout(&path));
            if f % 10 == 0 {
                gone.push(format!("/{path}"));
            }
        }
    }
    g.expected.retain(|p, _| !p.starts_with("/usr/lib/p7/"));
    gone.push("/usr/lib/p7/f0".to_string());
    l2.push(Entry::opaque("usr/lib/p7"));
    for f in 0..5 {
        g.add(&mut l2, format!("usr/lib/p7/new{f}"), 0o644);
    }

    // Layer 3: configuration and a removed directory.
    let mut l3 = vec![Entry::dir("etc/app", 0o755), Entry::dir("var", 0o755)];
    for f in 0..400 {
        g.add(&mut l3, format!("etc/app/conf{f}"), 0o644);
    }
    g.expected.retain(|p, _| !p.starts_with("/usr/lib/p9/"));
    l3.push(Entry::whiteout("usr/lib/p9"));
    gone.push("/usr/lib/p9".to_string());
    let motd = b"welcome to the benchmark image\n".to_vec();
    g.expected.insert("/etc/motd".to_string(), motd.clone());
    l3.push(file("etc/motd", motd, 0o644));

    let layers = [l1, l2, l3]
        .into_iter()
        .map(|entries| TestLayer {
            entries,
            gzip: true,
        })
        .collect();
    let dirs = [
        "/",
        "/usr/bin",
        "/usr/lib",
        "/usr/lib/p3",
        "/usr/lib/p7",
        "/usr/lib/p12",
        "/usr/lib/p25",
        "/opt/app/m5",
        "/etc/app",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    Image {
        layers,
        expected: g.expected,
        gone,
        dirs,
        files: g.files,
        bytes: g.bytes,
    }
}

/// Finds `tool` on PATH or in the sbin directories.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) {
    if let Err(e) = common::run(cmd) {
        panic!("{e}");
    }
}

/// One timed banger pull and where its time went.
struct Pull {
    total: Duration,
    /// Resolve + download (or cache lookup), until the first layer applies.
    fetch: Duration,
    /// Applying the layers into the staging tree.
    apply: Duration,
    /// `mkfs.ext4 -d`, the ownership pass and its verification.
    ext4: Duration,
    /// Layers the pull found in the cache.
    cached_layers: usize,
    /// Whether the pull cloned a kept flattened image.
    flat_hit: bool,
    staging: tempfile::TempDir,
    pulled: PulledRootfs,
}

fn banger_pull(host: &str, cache: &Path) -> Pull {
    let staging = tempfile::Builder::new()
        .prefix("bench-banger")
        .tempdir()
        .unwrap();
    let opts = PullOptions {
        insecure_registries: vec![host.to_string()],
        cache_dir: cache.to_path_buf(),
        docker_config: Some(staging.path().join("no-docker-config.json")),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let reference = format!("{host}/{REPO_TAG}");
    let (mut applying, mut building, mut cached_layers, mut flat_hit) = (None, None, 0, false);
    settle();
    let start = Instant::now();
    let pulled = rt
        .block_on(pull_rootfs(
            &reference,
            staging.path(),
            &opts,
            |e| match e {
                PullEvent::LayerCached { .. } => cached_layers += 1,
                PullEvent::Applying { .. } if applying.is_none() => applying = Some(Instant::now()),
                PullEvent::BuildingFilesystem { .. } => building = Some(Instant::now()),
                PullEvent::FlattenedCached { .. } => flat_hit = true,
                _ => {}
            },
        ))
        .unwrap();
    let end = Instant::now();
    // A clone of a kept image has no apply or build phase.
    let (applying, building) = (applying.unwrap_or(end), building.unwrap_or(end));
    Pull {
        total: end - start,
        fetch: applying - start,
        apply: building - applying,
        ext4: end - building,
        cached_layers,
        flat_hit,
        staging,
        pulled,
    }
}

struct Tools {
    skopeo: PathBuf,
    umoci: PathBuf,
    mkfs: PathBuf,
    debugfs: PathBuf,
}

fn baseline(tools: &Tools, host: &str, size_bytes: u64) -> (Duration, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("bench-baseline")
        .tempdir()
        .unwrap();
    let layout = format!("{}:v1", dir.path().join("layout").display());
    let bundle = dir.path().join("bundle");
    let image = dir.path().join("rootfs.ext4");
    settle();
    let start = Instant::now();
    run(Command::new(&tools.skopeo)
        .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/{REPO_TAG}"))
        .arg(format!("oci:{layout}")));
    run(Command::new(&tools.umoci)
        .args(["unpack", "--rootless", "--image", &layout])
        .arg(&bundle));
    run(Command::new(&tools.mkfs)
        .args(["-q", "-F", "-d"])
        .arg(bundle.join("rootfs"))
        .arg(&image)
        .arg(format!("{}k", size_bytes / 1024)));
    (start.elapsed(), dir)
}

/// Flushes the previous measurement's dirty pages so its writeback is not
/// billed to the next one.
fn settle() {
    run(&mut Command::new("sync"));
}

fn debugfs(tools: &Tools, image: &Path, request: &str) -> (Vec<u8>, String) {
    let out = Command::new(&tools.debugfs)
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Names in a directory, from `debugfs ls -p` (`/ino/mode/uid/gid/name/size/`).
fn listing(tools: &Tools, image: &Path, dir: &str) -> Vec<String> {
    let (out, _) = debugfs(tools, image, &format!("ls -p \"{dir}\""));
    let mut names: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != ".." && n != "lost+found")
        .collect();
    names.sort();
    names
}

/// Both images hold the image's content: sample files byte for byte,
/// whiteouts applied, and the same names in a set of directories.
fn check_equal_work(tools: &Tools, image: &Image, banger: &Path, base: &Path) {
    for (path, want) in &image.expected {
        for img in [banger, base] {
            let (got, _) = debugfs(tools, img, &format!("cat \"{path}\""));
            assert!(
                got == *want,
                "{path} in {} differs from the pushed content ({} vs {} bytes)",
                img.display(),
                got.len(),
                want.len()
            );
        }
    }
    for path in &image.gone {
        for img in [banger, base] {
            let (_, err) = debugfs(tools, img, &format!("stat \"{path}\""));
            assert!(
                err.contains("not found"),
                "{path} should be whited out in {}",
                img.display()
            );
        }
    }
    for dir in &image.dirs {
        let (a, b) = (listing(tools, banger, dir), listing(tools, base, dir));
        assert!(!a.is_empty(), "{dir} is empty in the banger image");
        assert_eq!(a, b, "{dir} lists differently in the two images");
    }
    let (stat, _) = debugfs(tools, banger, "stat /usr/bin/su");
    assert!(
        String::from_utf8_lossy(&stat).contains("Mode:  04755"),
        "the setuid bit on /usr/bin/su is lost in the banger image"
    );
}

fn show_runs(what: &str, v: &[Duration]) {
    let runs: Vec<String> = v
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    eprintln!("oci_pull/{what} runs (s): {}", runs.join(" "));
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

/// The 1/5/15-minute load averages: 2 shared cores make timings noisy.
fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn main() {
    let mut found = Vec::new();
    for name in ["skopeo", "umoci", "docker-registry", "mkfs.ext4", "debugfs"] {
        match tool(name) {
            Some(p) => found.push(p),
            None => {
                eprintln!("SKIPPED oci_pull: {name} not installed (scripts/bench installs it)");
                return;
            }
        }
    }
    let tools = Tools {
        skopeo: found[0].clone(),
        umoci: found[1].clone(),
        mkfs: found[3].clone(),
        debugfs: found[4].clone(),
    };
    let Some(registry) = Registry::start("oci_pull") else {
        eprintln!("SKIPPED oci_pull: docker-registry not installed (scripts/bench installs it)");
        return;
    };
    let host = registry.host().to_string();

    let image = build_image();
    let pushed = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(registry.push(REPO_TAG, "amd64", &image.layers));
    let compressed: u64 = pushed
        .layers
        .iter()
        .map(|d| std::fs::metadata(registry.blob_file(d)).unwrap().len())
        .sum();
    println!(
        "oci_pull/image: {} layers, {} files, {:.1} MiB uncompressed, {:.1} MiB gzip",
        image.layers.len(),
        image.files,
        image.bytes as f64 / (1 << 20) as f64,
        compressed as f64 / (1 << 20) as f64
    );

    let load_before = load_average();
    let (mut cold, mut cached, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut repull = Vec::new();
    let mut size = None;
    for round in 0..ROUNDS {
        let mut banger_round = || {
            let cache = tempfile::Builder::new()
                .prefix("bench-cache")
                .tempdir()
                .unwrap();
            let first = banger_pull(&host, cache.path());
            assert_eq!(first.cached_layers, 0, "the cold pull found cached layers");
            assert!(!first.flat_hit, "the cold pull found a flattened image");
            // The layer-cache case: the kept flattened image is removed.
            std::fs::remove_dir_all(cache.path().join("flat")).unwrap();
            let again = banger_pull(&host, cache.path());
            assert!(!again.flat_hit, "the flattened image was removed");
            assert_eq!(
                again.cached_layers,
                image.layers.len(),
                "the re-pull did not use the cache for every layer"
            );
            assert_eq!(first.pulled.digest, again.pulled.digest);
            let third = banger_pull(&host, cache.path());
            assert!(third.flat_hit, "the re-pull did not clone the kept image");
            assert_eq!(third.pulled.size, first.pulled.size);
            repull.push(third.total);
            let (staging, pulled) = (first.staging, first.pulled);
            cold.push((first.total, first.fetch, first.apply, first.ext4));
            cached.push((again.total, again.fetch, again.apply, again.ext4));
            (staging, pulled)
        };
        if round % 2 == 0 {
            let (staging, pulled) = banger_round();
            size = Some(pulled.size.0);
            let (t, dir) = baseline(&tools, &host, pulled.size.0);
            base.push(t);
            if round == 0 {
                check_equal_work(
                    &tools,
                    &image,
                    &pulled.rootfs,
                    &dir.path().join("rootfs.ext4"),
                );
            }
            drop(staging);
        } else {
            // The baseline goes first; it needs banger's size, known from round 0.
            let (t, _dir) = baseline(&tools, &host, size.unwrap());
            base.push(t);
            banger_round();
        }
    }

    let phases = |what: &str, runs: &[(Duration, Duration, Duration, Duration)]| {
        let pick = |f: fn(&(Duration, Duration, Duration, Duration)) -> Duration| {
            median(runs.iter().map(f).collect())
        };
        println!(
            "oci_pull/{what} phases: fetch {:.2} s, apply layers {:.2} s, ext4 {:.2} s (medians)",
            pick(|r| r.1),
            pick(|r| r.2),
            pick(|r| r.3)
        );
    };
    phases("banger-cold", &cold);
    phases("banger-cached", &cached);
    show_runs("banger-cold", &cold.iter().map(|r| r.0).collect::<Vec<_>>());
    show_runs(
        "banger-cached",
        &cached.iter().map(|r| r.0).collect::<Vec<_>>(),
    );
    show_runs("banger-repull", &repull);
    show_runs("baseline", &base);
    let (cold, cached, base, repull) = (
        median(cold.iter().map(|r| r.0).collect()),
        median(cached.iter().map(|r| r.0).collect()),
        median(base),
        median(repull),
    );
    println!(
        "oci_pull/load average: {load_before} before, {} after",
        load_average()
    );
    println!("oci_pull/banger-cold:   {cold:6.2} s (median of {ROUNDS})");
    println!(
        "oci_pull/baseline:      {base:6.2} s (skopeo copy + umoci unpack + mkfs.ext4 -d, median of {ROUNDS})"
    );
    println!("oci_pull/ratio baseline:banger  {:5.2}x", base / cold);
    println!(
        "oci_pull/banger-cached: {cached:6.2} s (layers cached, flattened again; median of {ROUNDS})"
    );
    println!(
        "oci_pull/banger-repull: {repull:6.2} s (the kept flattened image cloned; median of {ROUNDS})"
    );
    println!(
        "oci_pull/ratio cold:repull      {:5.2}x (target: repull <= 1 s)",
        cold / repull
    );
}
