//! `make bench-load`: the load step of a 400 MiB model in new worker processes, zero-copy map
//! against tch's copying loaders, side by side in one run on one machine.
//!
//! For each format, rounds of fresh processes alternate between the loaders; each reports its
//! load step (opening the model to ready for inference), libtorch's own start-up (apart), its
//! first inference, and the process's time to that first inference is measured from outside.
//! Then 4 workers of each kind run at once and their PSS/USS is read from /proc.
//! The last line is `load-ratio varstore_load/zero_copy = X` (ratio of the median load steps).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use kube_zerocopy::local::median;
use kube_zerocopy_e2e::{bench_smoke, make_model, mib, source, Pod};
use kube_zerocopy_fetch::{ModelFormat, ModelSource};
use kube_zerocopy_worker::memory::MemoryStats;

const WORKERS: usize = 4;

/// Rounds of new processes: 7, one in the smoke mode.
fn rounds() -> usize {
    if bench_smoke() {
        1
    } else {
        7
    }
}

/// The model's widths, the first its input's features: 4 x Linear(5120, 5120) + Linear(5120,
/// 128), f32, 402.5 MiB; 0.3 MiB in the smoke mode.
fn sizes() -> (&'static str, &'static str) {
    if bench_smoke() {
        ("256,256,256,16", "256")
    } else {
        ("5120,5120,5120,5120,5120,128", "5120")
    }
}

#[derive(Default)]
struct Samples {
    load_ms: Vec<f64>,
    first_infer_ms: Vec<f64>,
    to_first_inference_ms: Vec<f64>,
}

struct Variant {
    label: &'static str,
    loader: &'static str,
    prefault: bool,
}

fn measure(
    pod: &Pod,
    models: &[ModelSource],
    input: &Path,
    variants: &[Variant],
    work: &Path,
) -> Result<Vec<Samples>> {
    let mut samples: Vec<Samples> = variants.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds() {
        // Alternate the order so neither side always runs on a warmer machine.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let v = &variants[i];
            let mut env = pod.env(models);
            if v.prefault {
                env.push(("KZC_PREFAULT".into(), "true".into()));
            }
            let started = Instant::now();
            let out = std::process::Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
                .envs(env)
                .args(["inspect", "--loader", v.loader, "--input-file"])
                .arg(input)
                .arg("--output-file")
                .arg(work.join("bench-out.safetensors"))
                .output()?;
            let wall = started.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(
                out.status.success(),
                "{}: {}",
                v.label,
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let s = &mut samples[i];
            s.load_ms.push(report["load_ms"].as_f64().unwrap());
            s.first_infer_ms
                .push(report["first_infer_ms"].as_f64().unwrap());
            // The report is printed after the first inference: the process's wall time up to
            // it, minus the output write and exit, which are the same for every loader.
            s.to_first_inference_ms.push(wall);
        }
    }
    Ok(samples)
}

/// PSS and USS per worker, with `WORKERS` of one loader alive at once.
fn memory(
    pod: &Pod,
    models: &[ModelSource],
    input: &Path,
    loader: &str,
    work: &Path,
) -> Result<(f64, f64)> {
    let workers = (0..WORKERS)
        .map(|i| {
            pod.spawn_inspect(
                models,
                loader,
                input,
                &work.join(format!("mem-{loader}-{i}.safetensors")),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let stats = workers
        .iter()
        .map(|w| MemoryStats::of_process(&w.pid()))
        .collect::<Result<Vec<_>>>()?;
    for w in workers {
        w.finish();
    }
    let pss: Vec<f64> = stats.iter().map(|s| mib(s.pss_kib)).collect();
    let uss: Vec<f64> = stats.iter().map(|s| mib(s.uss_kib)).collect();
    Ok((median(&pss), median(&uss)))
}

fn bench(
    format: ModelFormat,
    file: &Path,
    input: &Path,
    baseline: &'static str,
    work: &Path,
) -> Result<f64> {
    let pod = Pod::new();
    let models = vec![source("bench", format, file)];
    let out = pod.publish(&models);
    anyhow::ensure!(
        out.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, manifest) = pod.bindings().resolve(&pod.store(), "bench")?;
    println!(
        "\n{format:?} model: {:.1} MiB of weights ({}), {} rounds of new processes",
        manifest.tensors_bytes as f64 / (1 << 20) as f64,
        file.display(),
        rounds()
    );
    let variants = [
        Variant {
            label: "zero_copy",
            loader: "shared",
            prefault: false,
        },
        Variant {
            label: "zero_copy+prefault",
            loader: "shared",
            prefault: true,
        },
        Variant {
            label: baseline,
            loader: "copy",
            prefault: false,
        },
    ];
    let samples = measure(&pod, &models, input, &variants, work)?;
    println!(
        "  {:<20} {:>12} {:>18} {:>24}",
        "loader", "load step ms", "first inference ms", "process to 1st infer ms"
    );
    for (v, s) in variants.iter().zip(&samples) {
        println!(
            "  {:<20} {:>12.1} {:>18.1} {:>24.1}",
            v.label,
            median(&s.load_ms),
            median(&s.first_infer_ms),
            median(&s.to_first_inference_ms)
        );
    }
    for loader in ["shared", "copy"] {
        let (pss, uss) = memory(&pod, &models, input, loader, work)?;
        let label = if loader == "shared" {
            "zero_copy"
        } else {
            baseline
        };
        println!("  {WORKERS} workers at once, {label:<14}: PSS {pss:.1} MiB, USS {uss:.1} MiB per worker (median)");
    }
    let ratio = median(&samples[2].load_ms) / median(&samples[0].load_ms);
    println!(
        "  process-to-first-inference ratio {baseline}/zero_copy = {:.2}",
        median(&samples[2].to_first_inference_ms) / median(&samples[0].to_first_inference_ms)
    );
    Ok(ratio)
}

/// The store on a tmpfs of its own, mounted with `huge=<huge>` (the node agent mounts its store
/// with within_size): the zero-copy worker's first inference with the weights on small pages
/// against transparent huge pages. Needs root (mount); skipped otherwise.
fn huge_pages(file: &Path, input: &Path, work: &Path) -> Result<()> {
    // /proc/self belongs to the process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    if !root {
        println!("\nstore pages: skipped (mounting a tmpfs needs root)");
        return Ok(());
    }
    let models = vec![source("bench", ModelFormat::Safetensors, file)];
    let zero_copy = [Variant {
        label: "zero_copy",
        loader: "shared",
        prefault: false,
    }];
    println!(
        "\nSafetensors model on a tmpfs store of its own, by the tmpfs's huge= option ({} rounds of new processes):",
        rounds()
    );
    println!(
        "  {:<22} {:>16} {:>18} {:>24}",
        "store", "ShmemHugePages", "first inference ms", "process to 1st infer ms"
    );
    let mut first = Vec::new();
    for huge in ["never", "within_size"] {
        let mount = tempfile::tempdir_in(work)?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size=2g,huge={huge}"),
                "tmpfs",
            ])
            .arg(mount.path())
            .status()?;
        anyhow::ensure!(status.success(), "mounting a tmpfs with huge={huge}");
        let measured = (|| -> Result<(u64, Samples)> {
            let before = meminfo("ShmemHugePages")?;
            let pod = Pod::in_dir(mount.path());
            let out = pod.publish(&models);
            anyhow::ensure!(
                out.status.success(),
                "publish: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let huge_kib = meminfo("ShmemHugePages")?.saturating_sub(before);
            let samples = measure(&pod, &models, input, &zero_copy, work)?;
            Ok((huge_kib, samples.into_iter().next().unwrap()))
        })();
        let _ = std::process::Command::new("umount")
            .arg(mount.path())
            .status();
        let (huge_kib, samples) = measured?;
        println!(
            "  {:<22} {:>12.1} MiB {:>18.1} {:>24.1}",
            format!("huge={huge}"),
            huge_kib as f64 / 1024.0,
            median(&samples.first_infer_ms),
            median(&samples.to_first_inference_ms)
        );
        first.push((
            median(&samples.first_infer_ms),
            median(&samples.to_first_inference_ms),
        ));
    }
    println!(
        "  first-inference huge=never/within_size = {:.2}; process to first inference = {:.2}",
        first[0].0 / first[1].0,
        first[0].1 / first[1].1
    );
    Ok(())
}

/// A /proc/meminfo field, in KiB.
fn meminfo(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/meminfo"))
}

fn main() -> Result<()> {
    let work = tempfile::tempdir()?;
    let w = work.path();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    println!("bench-load on {cores} cores, {mem}");
    let mlp = w.join("mlp.safetensors");
    let script = w.join("net.pt");
    let (sizes, features) = sizes();
    make_model(&["mlp", mlp.to_str().unwrap(), "--sizes", sizes]);
    make_model(&["script", script.to_str().unwrap(), "--sizes", sizes]);
    make_model(&[
        "inputs",
        w.join("in").to_str().unwrap(),
        "--shards",
        "1",
        "--batch",
        "8",
        "--features",
        features,
    ]);
    let input = w.join("in/shard-00000.safetensors");
    // libtorch's own start-up, apart from any load: a worker process that loads libtorch (a
    // linked library) and exits at once.
    let startup: Vec<f64> = (0..rounds())
        .map(|_| {
            let t = Instant::now();
            let ok = std::process::Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
                .arg("--version")
                .output()
                .map(|o| o.status.success());
            assert!(
                matches!(ok, Ok(true)),
                "kube-zerocopy-worker --version failed"
            );
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "libtorch start-up (a worker process that loads libtorch and exits): {:.1} ms median",
        median(&startup)
    );
    let cmodule = bench(ModelFormat::TorchScript, &script, &input, "cmodule_load", w)?;
    let varstore = bench(ModelFormat::Safetensors, &mlp, &input, "varstore_load", w)?;
    huge_pages(&mlp, &input, w)?;
    println!();
    println!("load-ratio cmodule_load/zero_copy = {cmodule:.1}");
    println!("load-ratio varstore_load/zero_copy = {varstore:.1}");
    Ok(())
}
