//! `make bench-actor`: an actor replica's throughput (rows/s) and latency (p50, p99) against
//! concurrency and request batch size, with dynamic batching on and off in the same run; then
//! an actor pool driven over an input against Task mode over the same input.
//!
//! One Mlp (512 -> 1024 -> 1024 -> 64, f32) published once; two replicas of it serve at once,
//! one with dynamic batching (at most 256 rows a pass, 2 ms delay), one without. Each round
//! measures every (batch size, concurrency) on both, alternating, with closed-loop clients
//! (each sends its next request when the last is answered) over the binary extension. Rows/s
//! and latencies are medians over KZC_BENCH_ROUNDS rounds (default 3).
//!
//! Pool against Task: KZC_BENCH_SHARDS shard files (default 24) of 512 rows; Task mode is
//! `kube-zerocopy local run` (a worker process per shard, 2 at a time: the machine's cores);
//! the pool is 2 replicas, already ready, fed by `kube-zerocopy-worker drive`. Both write the
//! same outputs. The last line is `actor-batching rows/s on/off = X` for single-row requests
//! at the highest concurrency, where merging requests matters.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kube_zerocopy::local::median;
use kube_zerocopy_e2e::{bench_smoke, bin, make_model, source, start_actor, Pod};
use kube_zerocopy_fetch::ModelFormat;
use kube_zerocopy_worker::oip;

const MODEL: &str = "bench";
const FEATURES: i64 = 512;
const BATCH_SIZES: [i64; 2] = [1, 32];
const CONCURRENCY: [usize; 3] = [1, 8, 32];

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// One measurement: rows per second, and the requests' latencies in ms (sorted).
struct Load {
    rows_per_second: f64,
    latencies_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `requests` requests of `rows` rows from `concurrency` closed-loop clients.
fn load(base: &str, rows: i64, concurrency: usize, requests: usize) -> Result<Load> {
    let input = tch::Tensor::randn([rows, FEATURES], tch::kind::FLOAT_CPU);
    let (body, json_length) = oip::encode_request(&input)?;
    let url = format!("{base}/v2/models/{MODEL}/infer");
    let left = AtomicUsize::new(requests);
    let started = Instant::now();
    let latencies = std::thread::scope(|scope| -> Result<Vec<f64>> {
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<f64>> {
                    let agent = ureq::Agent::new_with_defaults();
                    let mut latencies = Vec::new();
                    while left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let sent = Instant::now();
                        let mut answer = agent
                            .post(&url)
                            .header(oip::HEADER_LENGTH, json_length.to_string())
                            .send(&body[..])?;
                        answer.body_mut().read_to_vec()?;
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for client in clients {
            all.extend(client.join().expect("a client thread")?);
        }
        Ok(all)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies_ms = latencies;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Load {
        rows_per_second: (requests as i64 * rows) as f64 / seconds,
        latencies_ms,
    })
}

fn main() -> Result<()> {
    // The smoke mode: one round, few requests and shards.
    let smoke = bench_smoke();
    let rounds = if smoke {
        1
    } else {
        env_number("KZC_BENCH_ROUNDS", 3)?.max(1)
    };
    let shards = if smoke {
        4
    } else {
        env_number("KZC_BENCH_SHARDS", 24)?.max(1)
    };
    let dir = tempfile::Builder::new()
        .prefix("kzc-bench-actor-")
        .tempdir()?;
    let d = dir.path();
    let model = d.join("mlp.safetensors");
    make_model(&[
        "mlp",
        model.to_str().context("a UTF-8 path")?,
        "--sizes",
        &format!("{FEATURES},1024,1024,64"),
    ]);
    let models = [source("mlp", ModelFormat::Safetensors, &model)];
    let pod = Pod::new();
    ensure!(pod.publish(&models).status.success(), "publishing failed");
    let name = ["--model-name", MODEL];
    let batching = [
        "--max-batch-rows",
        "256",
        "--max-batch-delay-ms",
        "2",
        "--queued-batches",
        "64",
    ];
    let (_on, on) = start_actor(&pod, &models, &[&name[..], &batching].concat());
    let (_off, off) = start_actor(
        &pod,
        &models,
        &[&name[..], &["--queued-batches", "64"]].concat(),
    );

    // (batch size, concurrency, on?) -> one Load per round.
    let mut measured: std::collections::BTreeMap<(i64, usize, bool), Vec<Load>> =
        Default::default();
    for round in 0..rounds {
        for &rows in &BATCH_SIZES {
            for &concurrency in &CONCURRENCY {
                let requests = match (smoke, rows) {
                    (true, _) => 2 * concurrency,
                    (false, 1) => 600.max(4 * concurrency),
                    (false, _) => 120.max(4 * concurrency),
                };
                // Alternating which goes first, so that neither always meets a warmer machine.
                let order = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for batching in order {
                    let base = if batching { &on } else { &off };
                    let result = load(base, rows, concurrency, requests)?;
                    measured
                        .entry((rows, concurrency, batching))
                        .or_default()
                        .push(result);
                }
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!("one replica, {rounds} rounds, medians:");
    println!(
        "  {:>5} {:>11} {:>8} {:>10} {:>8} {:>8}",
        "rows", "concurrency", "batching", "rows/s", "p50 ms", "p99 ms"
    );
    let summary = |loads: &[Load]| {
        let rows: Vec<f64> = loads.iter().map(|l| l.rows_per_second).collect();
        let p50: Vec<f64> = loads
            .iter()
            .map(|l| percentile(&l.latencies_ms, 0.5))
            .collect();
        let p99: Vec<f64> = loads
            .iter()
            .map(|l| percentile(&l.latencies_ms, 0.99))
            .collect();
        (median(&rows), median(&p50), median(&p99))
    };
    for ((rows, concurrency, batching), loads) in &measured {
        let (rows_per_second, p50, p99) = summary(loads);
        println!(
            "  {rows:>5} {concurrency:>11} {:>8} {rows_per_second:>10.0} {p50:>8.2} {p99:>8.2}",
            if *batching { "on" } else { "off" }
        );
    }

    // The pool against Task mode, over the same input.
    make_model(&[
        "inputs",
        d.join("in").to_str().context("a UTF-8 path")?,
        "--shards",
        &shards.to_string(),
        "--batch",
        "512",
        "--features",
        &FEATURES.to_string(),
    ]);
    let total_rows = (shards * 512) as f64;
    let (_pool_a, a) = start_actor(&pod, &models, &name);
    let (_pool_b, b) = start_actor(&pod, &models, &name);
    let (mut task_rates, mut pool_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let task_out = d.join(format!("task-{round}"));
        let pipeline = d.join("task.yaml");
        std::fs::write(
            &pipeline,
            format!(
                "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: bench}}\n\
                 spec:\n  mode: Task\n  models:\n    - {{name: mlp, format: Safetensors, architecture: Mlp, source: {{uri: 'file://{}'}}}}\n  \
                 input: {{uri: 'file://{}'}}\n  output: {{uri: 'file://{}'}}\n  task: {{parallelism: 2}}\n",
                model.display(),
                d.join("in").display(),
                task_out.display()
            ),
        )?;
        let started = Instant::now();
        let task = Command::new(bin("kube-zerocopy"))
            .args(["local", "run", "--json", "-f"])
            .arg(&pipeline)
            .output()?;
        ensure!(task.status.success(), "the Task run failed");
        task_rates.push(total_rows / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let drive = Command::new(bin("kube-zerocopy-worker"))
            .args([
                "drive",
                "--model-name",
                MODEL,
                "--run",
                &format!("r{round}"),
            ])
            .arg("--input")
            .arg(d.join("in"))
            .arg("--output")
            .arg(d.join(format!("pool-{round}")))
            .args(["--replicas", &format!("{a},{b}")])
            .output()?;
        ensure!(drive.status.success(), "the driver failed");
        pool_rates.push(total_rows / started.elapsed().as_secs_f64());
        for shard in kube_zerocopy_batch::shards::list_shards(&d.join("in"))? {
            let name = shard.file_name().context("a shard name")?;
            ensure!(
                std::fs::read(task_out.join(name))?
                    == std::fs::read(d.join(format!("pool-{round}")).join(name))?,
                "the pool's output {name:?} differs from the Task's"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (task, pool) = (median(&task_rates), median(&pool_rates));
    println!(
        "over {shards} shards of 512 rows, medians: Task mode {task:.0} rows/s, actor pool of 2 \
         (ready) {pool:.0} rows/s; pool/task = {:.2}",
        pool / task
    );
    println!("pool-vs-task rows/s pool/task = {:.2}", pool / task);
    let single = |batching| summary(&measured[&(1, CONCURRENCY[2], batching)]).0;
    println!(
        "actor-batching rows/s on/off = {:.2}",
        single(true) / single(false)
    );
    Ok(())
}
