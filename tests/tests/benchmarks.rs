//! Every benchmark that runs without a real node, in its smoke mode (one round, a small model):
//! a change that breaks a benchmark fails here, not when someone next measures. The figures
//! are not checked (they mean nothing at this size); that each benchmark runs to its last
//! line, the one its make target is read by, is.

use std::process::Command;

use kube_zerocopy_e2e::{bin, BENCH_SMOKE_ENV};

/// Runs a benchmark in its smoke mode; its output, once it succeeded.
fn smoke(benchmark: &str) -> String {
    let out = Command::new(bin(benchmark))
        .env(BENCH_SMOKE_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{benchmark}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    stdout
}

/// The last line, `<name> = <number>`.
fn last_figure(stdout: &str, name: &str) -> f64 {
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let figure = last
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix(" = "))
        .unwrap_or_else(|| panic!("the last line is not `{name} = X`: {last:?}"));
    figure
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{last:?}: {e}"))
}

#[test]
fn bench_load_runs() {
    let stdout = smoke("bench_load");
    assert!(last_figure(&stdout, "load-ratio varstore_load/zero_copy") > 0.0);
}

#[test]
fn bench_fetch_runs() {
    let stdout = smoke("bench_fetch");
    assert!(last_figure(&stdout, "fetch-ratio cp/publish") > 0.0);
    assert!(stdout.contains("fetch-ratio curl/publish (http) = "));
    assert!(stdout.contains("fetch-ratio curl/publish (s3) = "));
}

#[test]
fn bench_actor_runs() {
    let stdout = smoke("bench_actor");
    assert!(stdout.contains("pool-vs-task rows/s pool/task = "));
    assert!(last_figure(&stdout, "actor-batching rows/s on/off") > 0.0);
}

#[test]
fn bench_python_runs() {
    let stdout = smoke("bench_python");
    assert!(last_figure(&stdout, "python-load from_pretrained/zero-copy") > 0.0);
}

#[test]
fn bench_operator_runs() {
    let stdout = smoke("bench_operator");
    assert!(last_figure(&stdout, "reconcile-efficiency operator/raw_apply") > 0.0);
}
