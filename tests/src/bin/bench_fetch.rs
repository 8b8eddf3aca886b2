//! `make bench-fetch`: what publishing a model costs beyond copying its bytes. One safetensors
//! model of 1 GiB, rounds alternating side by side in one run:
//!
//! - `cp` of the file into /dev/shm (the page cache warm) against `kube-zerocopy-weight-server
//!   publish` of it as a `file://` source (its sha256 declared) into a store in /dev/shm;
//! - `curl` of it from a local http server into /dev/shm against publishing it from the same
//!   server (an http source, read by byte ranges);
//! - `curl` (SigV4) of it from a local S3 server (versitygw, `tests/env/src/s3.rs`) into /dev/shm
//!   against publishing it from there (an s3:// source).
//!
//! Each is timed as a whole process, start to exit; the store and the copies are removed
//! between rounds. The last line is `fetch-ratio cp/publish = X` (file://; near 1, publishing
//! costs no more than copying).

use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kube_zerocopy::local::median;
use kube_zerocopy_e2e::cluster::real::serve_folder_on;
use kube_zerocopy_e2e::s3::S3Server;
use kube_zerocopy_e2e::{bench_smoke, make_model, sha256_of, source, Pod};
use kube_zerocopy_fetch::{ModelFormat, ModelSource, S3Access};

const ROUNDS: usize = 5;
/// Linear(8192, 16384) + Linear(16384, 8192), f32: 1 GiB and 96 KiB of biases.
const SIZES: &str = "8192,16384,8192";
/// The smoke mode's: 2 MiB.
const SMOKE_SIZES: &str = "512,1024,512";

/// Seconds a command takes, start to exit; it must succeed.
fn timed(what: &str, command: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let out = command
        .output()
        .with_context(|| format!("running {what}"))?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(seconds)
}

/// Seconds `kube-zerocopy-weight-server publish` of `model` takes into a fresh store in /dev/shm.
fn publish(model: &ModelSource) -> Result<f64> {
    let pod = Pod::new();
    let mut command = pod.command("kube-zerocopy-weight-server", std::slice::from_ref(model));
    timed("publish", command.arg("publish"))
}

/// Seconds a copy into a fresh file in /dev/shm takes with `program` and `args` (the target's
/// path last).
fn copy(program: &str, args: &[&str]) -> Result<f64> {
    let target = tempfile::Builder::new()
        .prefix("kzc-bench-fetch-")
        .tempdir_in("/dev/shm")?;
    let mut command = Command::new(program);
    command.args(args).arg(target.path().join("model"));
    timed(program, &mut command)
}

fn report(label: &str, seconds: &[f64], bytes: u64) -> f64 {
    let m = median(seconds);
    println!(
        "  {label:<28} {m:>8.3} s {:>8.2} GiB/s",
        bytes as f64 / m / (1u64 << 30) as f64
    );
    m
}

fn main() -> Result<()> {
    let (rounds, sizes) = match bench_smoke() {
        true => (1, SMOKE_SIZES),
        false => (ROUNDS, SIZES),
    };
    let work = tempfile::Builder::new()
        .prefix("kzc-bench-fetch-")
        .tempdir()?;
    let file = work.path().join("model.safetensors");
    make_model(&[
        "mlp",
        file.to_str().context("a UTF-8 path")?,
        "--sizes",
        sizes,
    ]);
    let bytes = std::fs::metadata(&file)?.len();
    // Warm the page cache: the file:// rows read from memory, as a node's model cache would.
    std::fs::read(&file)?;
    let base = serve_folder_on(std::net::Ipv4Addr::LOCALHOST, work.path())?;
    let url = format!("{base}/model.safetensors");
    // Declared, as a pipeline that pins its model does (and as placement needs).
    let from_file = ModelSource {
        sha256: Some(sha256_of(&file)),
        ..source("bench", ModelFormat::Safetensors, &file)
    };
    let from_http = ModelSource {
        uri: url.clone(),
        ..from_file.clone()
    };
    let s3 = S3Server::start()?;
    s3.create_bucket("models")?;
    s3.put_file("models", "model.safetensors", &file)?;
    let creds = work.path().join("s3");
    std::fs::create_dir(&creds)?;
    std::fs::write(creds.join("AWS_ACCESS_KEY_ID"), &s3.access_key)?;
    std::fs::write(creds.join("AWS_SECRET_ACCESS_KEY"), &s3.secret_key)?;
    let from_s3 = ModelSource {
        uri: "s3://models/model.safetensors".into(),
        s3: Some(S3Access {
            endpoint: Some(s3.endpoint.clone()),
            region: Some(s3.region.clone()),
            credentials_dir: Some(creds.to_string_lossy().into_owned()),
        }),
        ..from_file.clone()
    };
    let s3_url = s3.url("models", "model.safetensors")?;
    let sigv4 = format!("aws:amz:{}:s3", s3.region);
    let user = format!("{}:{}", s3.access_key, s3.secret_key);
    let curl_s3 = [
        "-sSf",
        "--aws-sigv4",
        &sigv4,
        "--user",
        &user,
        "-H",
        "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        &s3_url,
        "-o",
    ];
    println!(
        "model: {:.2} GiB ({bytes} bytes), {rounds} rounds, each side by side",
        bytes as f64 / (1u64 << 30) as f64
    );

    let file_arg = file.to_str().context("a UTF-8 path")?;
    // Each source beside its plain copy: (the copy's program and arguments, the model), with
    // the seconds of each side per round.
    let curl_http = ["-sSf", url.as_str(), "-o"];
    let pairs: [(&str, &[&str], &ModelSource); 3] = [
        ("cp", &[file_arg], &from_file),
        ("curl", &curl_http, &from_http),
        ("curl", &curl_s3, &from_s3),
    ];
    let mut seconds = vec![(Vec::new(), Vec::new()); pairs.len()];
    for round in 0..rounds {
        for ((program, args, model), (copies, publishes)) in pairs.iter().zip(&mut seconds) {
            // Alternate the order so that neither side always runs on a warmer machine.
            if round % 2 == 0 {
                copies.push(copy(program, args)?);
                publishes.push(publish(model)?);
            } else {
                publishes.push(publish(model)?);
                copies.push(copy(program, args)?);
            }
        }
    }
    let [(cp, published_file), (curl, published_http), (curl_from_s3, published_s3)] =
        <[_; 3]>::try_from(seconds).expect("three pairs");
    println!("  {:<28} {:>10} {:>14}", "", "median", "rate");
    let cp = report("cp file -> /dev/shm", &cp, bytes);
    let published_file = report("publish file://", &published_file, bytes);
    let curl = report("curl http -> /dev/shm", &curl, bytes);
    let published_http = report("publish http://", &published_http, bytes);
    let curl_from_s3 = report("curl s3 -> /dev/shm", &curl_from_s3, bytes);
    let published_s3 = report("publish s3://", &published_s3, bytes);
    println!();
    println!(
        "fetch-ratio curl/publish (http) = {:.2}",
        curl / published_http
    );
    println!(
        "fetch-ratio curl/publish (s3) = {:.2}",
        curl_from_s3 / published_s3
    );
    println!("fetch-ratio cp/publish = {:.2}", cp / published_file);
    Ok(())
}
