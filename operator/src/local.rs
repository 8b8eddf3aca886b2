//! `kube-zerocopy local run`: a pipeline on this machine, as its pods would run it. One real
//! sidecar process publishes the weights into a real /dev/shm folder; worker processes, as
//! many at once as the Job's parallelism, each map them and run one shard. The containers'
//! commands and environment come from [`crate::invocation`], the same as in the cluster.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::crd::{InferencePipeline, Mode, PlannedInput, Sharing};
use crate::invocation::{self, Invocation, Mounts};

pub struct Options {
    pub file: PathBuf,
    /// Overrides `spec.task.parallelism`.
    pub parallelism: Option<usize>,
    /// Where the sidecar and worker binaries are (default: next to this binary).
    pub bin_dir: Option<PathBuf>,
    /// The shared-memory folder that plays the node's /dev/shm.
    pub shm_dir: PathBuf,
    /// Print the summary as JSON instead of a table.
    pub json: bool,
}

/// What one worker process reported (see `kube-zerocopy-worker task`).
#[derive(Clone, Debug, Deserialize)]
pub struct WorkerReport {
    pub shard: usize,
    pub load_ms: f64,
    pub infer_ms: f64,
    pub total_ms: f64,
    pub memory: Memory,
}

#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub uss_kib: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub pipeline: String,
    pub shards: usize,
    pub succeeded: usize,
    pub failed: Vec<(usize, String)>,
    pub publish_secs: f64,
    pub wall_secs: f64,
    pub median_load_ms: f64,
    pub median_infer_ms: f64,
    pub median_worker_ms: f64,
    pub median_memory: Option<Memory>,
    pub output: String,
}

/// Reads a pipeline from YAML (or JSON) and checks it as the API server would.
pub fn load_pipeline(file: &Path) -> Result<InferencePipeline> {
    checked(file, read_object(file)?)
}

/// Every InferencePipeline in `path`, each checked as the API server would: a file's YAML
/// documents (other kinds beside them, such as the ConfigMap a model is in, are skipped), a
/// folder's `.yaml` and `.yml` files by name, or `-` for standard input. None is an error.
pub fn load_pipelines(path: &Path) -> Result<Vec<InferencePipeline>> {
    let files = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        vec![(PathBuf::from("(standard input)"), text)]
    } else if path.is_dir() {
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let file = entry?.path();
            if file.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                names.push(file);
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|file| {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                Ok((file, text))
            })
            .collect::<Result<_>>()?
    } else {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        vec![(path.to_owned(), text)]
    };
    let mut pipelines = Vec::new();
    for (file, text) in files {
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let object = serde_json::Value::deserialize(document)
                .with_context(|| format!("{} (document {}) is not YAML", file.display(), i + 1))?;
            if object.is_null() || object["kind"] != "InferencePipeline" {
                continue;
            }
            let label = PathBuf::from(format!("{} (document {})", file.display(), i + 1));
            pipelines.push(checked(&label, object)?);
        }
    }
    if pipelines.is_empty() {
        bail!("{} holds no InferencePipeline", path.display());
    }
    Ok(pipelines)
}

fn read_object(file: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", file.display()))
}

fn checked(file: &Path, object: serde_json::Value) -> Result<InferencePipeline> {
    crate::validation::validate(&object).with_context(|| {
        format!(
            "{}: the API server would refuse this pipeline",
            file.display()
        )
    })?;
    serde_json::from_value(object)
        .with_context(|| format!("{} is not a valid InferencePipeline", file.display()))
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    match xs.len() {
        0 => 0.0,
        n if n.is_multiple_of(2) => (xs[mid - 1] + xs[mid]) / 2.0,
        _ => xs[mid],
    }
}

fn spawn(
    inv: &Invocation,
    bin_dir: &Path,
    extra_env: &[(&str, String)],
    stderr: File,
) -> Result<Child> {
    let program = bin_dir.join(&inv.command[0]);
    let mut cmd = Command::new(&program);
    cmd.args(&inv.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    cmd.envs(inv.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Ends the sidecar as the kubelet would: SIGTERM, then wait.
fn terminate(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

pub fn run(opts: &Options) -> Result<Summary> {
    let pipeline = checked(&opts.file, read_object(&opts.file)?)?;
    let spec = &pipeline.spec;
    let name = pipeline
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "pipeline".into());
    if spec.mode != Mode::Task {
        bail!(
            "local run supports mode Task; pipeline {name:?} is {:?}",
            spec.mode
        );
    }
    let input = spec
        .input
        .as_ref()
        .context("a Task pipeline needs spec.input")?;
    let output = spec
        .output
        .as_ref()
        .context("a Task pipeline needs spec.output")?;
    // A local run has no cluster to read Secrets from: object stores' credentials come from
    // the environment, as the clouds' own tools take them.
    let from_the_environment = "give object stores' credentials in the environment \
        (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_ACCOUNT_KEY)";
    let names_a_secret = |s3: Option<&crate::crd::S3SourceSpec>,
                          azure: Option<&crate::crd::AzureSourceSpec>| {
        s3.is_some_and(|s| s.credentials_secret.is_some())
            || azure.is_some_and(|a| a.credentials_secret.is_some())
    };
    if let Some(m) = spec.models.iter().find(|m| {
        m.source.bearer_token_secret.is_some()
            || m.source.ca_config_map.is_some()
            || names_a_secret(m.source.s3.as_ref(), m.source.azure.as_ref())
    }) {
        bail!(
            "model {:?} names a Secret or ConfigMap (bearerTokenSecret, caConfigMap, \
             s3.credentialsSecret, azure.credentialsSecret): a local run has no cluster to read \
             them from; {from_the_environment}",
            m.name
        );
    }
    if [input, output]
        .iter()
        .any(|d| names_a_secret(d.s3.as_ref(), d.azure.as_ref()))
    {
        bail!(
            "input or output names a credentialsSecret: a local run has no cluster to read it \
             from; {from_the_environment}"
        );
    }
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no folder")?
            .to_owned(),
    };

    // The pod's volumes. Node sharing: the store outlives the run, as on a node.
    let pod_dir = opts
        .shm_dir
        .join(format!("kube-zerocopy-local/{name}-{}", std::process::id()));
    std::fs::create_dir_all(&pod_dir).with_context(|| format!("creating {}", pod_dir.display()))?;
    let mounts = Mounts {
        store: match spec.sharing {
            Sharing::Pod => pod_dir.join("store"),
            Sharing::Node => opts.shm_dir.join("kube-zerocopy/store"),
        },
        bindings: pod_dir.join("bindings"),
        downloads: std::env::temp_dir()
            .join(format!("kube-zerocopy-downloads-{}", std::process::id())),
        sources: pod_dir.join("sources"),
        data: pod_dir.join("data"),
        client_token: pod_dir.join("client-token"),
    };
    let logs = pod_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let result = plan_input(&pipeline, &mounts, &bin_dir).and_then(|plan| {
        run_pod(
            opts,
            &name,
            &pipeline,
            &mounts,
            &bin_dir,
            &logs,
            &plan,
            &output.uri,
        )
    });
    if result.is_ok() || spec.sharing == Sharing::Node {
        let _ = std::fs::remove_dir_all(&pod_dir);
    } else {
        eprintln!("logs kept in {}", logs.display());
    }
    let _ = std::fs::remove_dir_all(&mounts.downloads);
    result
}

/// Lists the input as the planning Job would (`kube-zerocopy-worker plan`, with this process's
/// environment for S3 credentials): its shard count, and the listing's digest that each shard
/// checks.
fn plan_input(
    pipeline: &InferencePipeline,
    mounts: &Mounts,
    bin_dir: &Path,
) -> Result<PlannedInput> {
    let planner = invocation::planner(&pipeline.spec, mounts)?;
    let program = bin_dir.join(&planner.command[0]);
    let out = Command::new(&program)
        .args(&planner.command[1..])
        .envs(planner.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", program.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "planning the input failed: {}",
            stderr.trim().trim_start_matches("error: ")
        );
    }
    let plan: PlannedInput =
        serde_json::from_slice(&out.stdout).context("the planner's answer is not a plan")?;
    Ok(plan)
}

#[allow(clippy::too_many_arguments)]
fn run_pod(
    opts: &Options,
    name: &str,
    pipeline: &InferencePipeline,
    mounts: &Mounts,
    bin_dir: &Path,
    logs: &Path,
    plan: &PlannedInput,
    output: &str,
) -> Result<Summary> {
    let spec = &pipeline.spec;
    let declared = spec.task.as_ref().and_then(|t| t.shards);
    let shard_count = declared.unwrap_or(plan.shards) as usize;
    // As in the cluster: a declared count is checked by each shard, a planned one also by
    // the listing's digest.
    let plan = declared.is_none().then_some(plan);
    let started = Instant::now();
    let sidecar_log = logs.join("sidecar.log");
    let mut sidecar = spawn(
        &invocation::sidecar(spec, mounts, "127.0.0.1:0"),
        bin_dir,
        &[],
        File::create(&sidecar_log)?,
    )?;

    let spinner = ProgressBar::new_spinner().with_message("publishing weights into shared memory");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let probe = invocation::probe(spec, mounts);
    loop {
        if let Some(status) = sidecar.try_wait()? {
            spinner.finish_and_clear();
            bail!(
                "the weight server exited ({status}) before the weights were ready:\n{}",
                tail(&sidecar_log, 5)
            );
        }
        let ok = Command::new(bin_dir.join(&probe.command[0]))
            .args(&probe.command[1..])
            .envs(probe.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let publish_secs = started.elapsed().as_secs_f64();
    spinner.finish_and_clear();

    let parallelism = opts
        .parallelism
        .or(spec
            .task
            .as_ref()
            .and_then(|t| t.parallelism)
            .map(|p| p.max(1) as usize))
        .unwrap_or(1)
        .min(shard_count);
    let bar = ProgressBar::new(shard_count as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} shards {pos}/{len} [{bar:30}] {elapsed_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let run = format!(
        "local-{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        std::process::id()
    );
    let worker = invocation::task_worker(spec, mounts, plan, &run)?;
    let mut pending: VecDeque<usize> = (0..shard_count).collect();
    let mut running: Vec<(usize, Child)> = Vec::new();
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < parallelism {
            let Some(shard) = pending.pop_front() else {
                break;
            };
            let log = File::create(logs.join(format!("worker-{shard}.log")))?;
            let child = spawn(
                &worker,
                bin_dir,
                &[("JOB_COMPLETION_INDEX", shard.to_string())],
                log,
            )?;
            running.push((shard, child));
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (shard, mut child) = running.swap_remove(i);
                    let mut stdout = String::new();
                    child
                        .stdout
                        .take()
                        .map(|mut s| s.read_to_string(&mut stdout));
                    let report = stdout
                        .lines()
                        .last()
                        .and_then(|l| serde_json::from_str::<WorkerReport>(l).ok());
                    match (status.success(), report) {
                        (true, Some(r)) => reports.push(r),
                        _ => {
                            let why = tail(&logs.join(format!("worker-{shard}.log")), 1);
                            bar.println(format!("shard {shard} failed ({status}): {why}"));
                            failed.push((shard, why));
                        }
                    }
                    bar.inc(1);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bar.finish_and_clear();
    terminate(&mut sidecar);

    let mut by_memory: Vec<Memory> = reports.iter().map(|r| r.memory).collect();
    by_memory.sort_by_key(|m| m.pss_kib);
    Ok(Summary {
        pipeline: name.to_owned(),
        shards: shard_count,
        succeeded: reports.len(),
        failed,
        publish_secs,
        wall_secs: started.elapsed().as_secs_f64(),
        median_load_ms: median(&reports.iter().map(|r| r.load_ms).collect::<Vec<_>>()),
        median_infer_ms: median(&reports.iter().map(|r| r.infer_ms).collect::<Vec<_>>()),
        median_worker_ms: median(&reports.iter().map(|r| r.total_ms).collect::<Vec<_>>()),
        median_memory: by_memory.get(by_memory.len() / 2).copied(),
        output: output.to_owned(),
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pipeline {}: {}/{} shards succeeded",
            self.pipeline, self.succeeded, self.shards
        )?;
        for (shard, why) in &self.failed {
            writeln!(f, "  shard {shard} failed: {why}")?;
        }
        writeln!(f, "  weights published in  {:.2} s", self.publish_secs)?;
        writeln!(f, "  whole run             {:.2} s", self.wall_secs)?;
        writeln!(
            f,
            "  per worker (median)   load {:.1} ms, inference {:.1} ms, process {:.1} ms",
            self.median_load_ms, self.median_infer_ms, self.median_worker_ms
        )?;
        if let Some(m) = &self.median_memory {
            writeln!(f, "  memory per worker     RSS {:.1} MiB, PSS {:.1} MiB, USS {:.1} MiB (median, from /proc)",
                m.rss_kib as f64 / 1024.0, m.pss_kib as f64 / 1024.0, m.uss_kib as f64 / 1024.0)?;
        }
        write!(f, "  outputs in {}", self.output)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }
}
