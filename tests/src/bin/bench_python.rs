//! `make bench-python`: what loading a Hugging Face model costs in Python, the zero-copy way
//! against transformers' own `from_pretrained`. A GPT-2-shaped model (GPT-2 small: 124M
//! parameters, f32, about 475 MiB) with seeded weights, written by `save_pretrained`, published
//! once by the real weight server; then new Python processes (`tests/python/kzc_bench_python.py`),
//! rounds alternating side by side in one run, medians:
//!
//! - the load step, measured inside each process after its imports: zero-copy is
//!   `load_state_dict` from the store, the model built from its config inside `empty_weights`,
//!   `bind`; the other `AutoModelForCausalLM.from_pretrained` of the folder;
//! - the process from its start to its first inference;
//! - USS per process with 4 of one kind alive at once.
//!
//! The last line is `python-load from_pretrained/zero-copy = X` (the median load steps' ratio).
//! `KZC_BENCH_SMOKE=1`: one round of a tiny model.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use kube_zerocopy::local::median;
use kube_zerocopy_e2e::{bench_smoke, mib, repo, source, Pod};
use kube_zerocopy_fetch::ModelFormat;
use kube_zerocopy_worker::memory::MemoryStats;

const ROUNDS: usize = 7;
const AT_ONCE: usize = 4;

fn python() -> Result<Command> {
    let venv = std::env::var("KZC_VENV").context("KZC_VENV (run through make)")?;
    let mut command = Command::new(format!("{venv}/bin/python"));
    command
        .arg(repo().join("tests/python/kzc_bench_python.py"))
        .env("PYTHONPATH", repo().join("python/src"))
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TQDM_DISABLE", "1");
    Ok(command)
}

/// One process's report (load step, first inference) and the whole process to that report;
/// the process itself when `hold`, alive until its stdin closes.
struct Run {
    load_ms: f64,
    first_infer_ms: f64,
    to_first_inference_ms: f64,
    held: Option<Child>,
}

fn run(args: &[&str], hold: bool) -> Result<Run> {
    let mut command = python()?;
    command.arg("load").args(args);
    if hold {
        command.arg("--hold");
    }
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let to_first_inference_ms = started.elapsed().as_secs_f64() * 1000.0;
    if line.trim().is_empty() {
        bail!("the process reported nothing: {:?}", child.wait()?);
    }
    let report: serde_json::Value = serde_json::from_str(&line)?;
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("{name} in {line}"))
    };
    let load_ms = field("load_ms")?;
    let first_infer_ms = field("first_infer_ms")?;
    let held = if hold {
        Some(child)
    } else {
        drop(child.stdin.take());
        ensure!(child.wait()?.success(), "the process failed");
        None
    };
    Ok(Run {
        load_ms,
        first_infer_ms,
        to_first_inference_ms,
        held,
    })
}

/// Median USS per process, MiB, with `AT_ONCE` of them alive.
fn uss_at_once(args: &[&str]) -> Result<f64> {
    let runs = (0..AT_ONCE)
        .map(|_| run(args, true))
        .collect::<Result<Vec<_>>>()?;
    let mut uss = Vec::new();
    for run in runs {
        let mut child = run.held.context("held")?;
        uss.push(mib(
            MemoryStats::of_process(&child.id().to_string())?.uss_kib
        ));
        drop(child.stdin.take());
        child.wait()?;
    }
    Ok(median(&uss))
}

fn main() -> Result<()> {
    let smoke = bench_smoke();
    let rounds = if smoke { 1 } else { ROUNDS };
    let pod = Pod::new();
    let folder = pod.dir.path().join("model");
    let made = python()?
        .args(["make", folder.to_str().context("a UTF-8 path")?])
        .arg(if smoke { "smoke" } else { "full" })
        .status()?;
    ensure!(made.success(), "making the model failed");
    let models = [source(
        "gpt2",
        ModelFormat::Safetensors,
        &folder.join("model.safetensors"),
    )];
    let out = pod.publish(&models);
    ensure!(
        out.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (digest, manifest) = pod.bindings().resolve(&pod.store(), "gpt2")?;
    let store = pod.store.to_str().context("a UTF-8 path")?.to_owned();
    let folder = folder.to_str().context("a UTF-8 path")?.to_owned();
    let zero_copy = [
        "zero-copy",
        store.as_str(),
        digest.as_str(),
        folder.as_str(),
    ];
    let from_pretrained = ["from-pretrained", folder.as_str()];
    println!(
        "bench-python: GPT-2-shaped model, {:.1} MiB of weights, {rounds} rounds of new processes",
        mib(manifest.tensors_bytes / 1024)
    );

    let (mut zero, mut pretrained) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate the order so that neither side always meets a warmer machine.
        if round % 2 == 0 {
            zero.push(run(&zero_copy, false)?);
            pretrained.push(run(&from_pretrained, false)?);
        } else {
            pretrained.push(run(&from_pretrained, false)?);
            zero.push(run(&zero_copy, false)?);
        }
    }
    let medians = |runs: &[Run]| {
        (
            median(&runs.iter().map(|r| r.load_ms).collect::<Vec<_>>()),
            median(&runs.iter().map(|r| r.first_infer_ms).collect::<Vec<_>>()),
            median(
                &runs
                    .iter()
                    .map(|r| r.to_first_inference_ms)
                    .collect::<Vec<_>>(),
            ),
        )
    };
    let (zero_load, zero_first, zero_total) = medians(&zero);
    let (pre_load, pre_first, pre_total) = medians(&pretrained);
    let zero_uss = uss_at_once(&zero_copy)?;
    let pre_uss = uss_at_once(&from_pretrained)?;
    println!(
        "  {:<16} {:>12} {:>18} {:>26} {:>22}",
        "",
        "load step ms",
        "first inference ms",
        "process to 1st inference ms",
        "USS, 4 at once (MiB)"
    );
    for (label, load, first, total, uss) in [
        ("zero-copy", zero_load, zero_first, zero_total, zero_uss),
        ("from_pretrained", pre_load, pre_first, pre_total, pre_uss),
    ] {
        println!("  {label:<16} {load:>12.1} {first:>18.1} {total:>26.0} {uss:>22.1}");
    }
    println!();
    println!(
        "python-load from_pretrained/zero-copy = {:.1}",
        pre_load / zero_load
    );
    Ok(())
}
