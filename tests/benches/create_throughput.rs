//! Host-side create throughput against the fake firecracker: the same number
//! of `banger vm create`s issued one at a time and 32 at a time, through the
//! real CLI and daemon. Prints creates/s for both and their ratio (the
//! baseline is the sequential run, measured in the same process).
//!
//! `cargo build --release --workspace && cargo bench -p banger-tests --bench create_throughput`

use std::time::Instant;

use test_infra::BangerEnv;

const CREATES: usize = 32;

fn run(env: &BangerEnv, concurrency: usize, round: usize) -> f64 {
    let per_thread = CREATES / concurrency;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..concurrency {
            s.spawn(move || {
                for i in 0..per_thread {
                    let name = format!("b{round}-{t}-{i}");
                    env.create(&name, &[]).ok();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    // Clean up outside the timed region.
    let names: Vec<String> = env
        .list()
        .into_iter()
        .map(|v| v.record.name.to_string())
        .collect();
    let mut args = vec!["vm", "delete"];
    args.extend(names.iter().map(String::as_str));
    env.banger(&args).ok();
    CREATES as f64 / secs
}

fn main() {
    let env = BangerEnv::new();
    env.banger(&["daemon", "start"]).ok();
    // Warm-up: first create pays for page cache and daemon start-up.
    env.create("warmup", &[]).ok();
    env.banger(&["vm", "delete", "warmup"]).ok();

    let sequential = run(&env, 1, 0);
    let concurrent = run(&env, 32, 1);
    println!("create_throughput/1-concurrent:  {sequential:8.2} creates/s ({CREATES} creates)");
    println!("create_throughput/32-concurrent: {concurrent:8.2} creates/s ({CREATES} creates)");
    println!(
        "create_throughput/ratio 32:1:    {:8.2}x",
        concurrent / sequential
    );
}
