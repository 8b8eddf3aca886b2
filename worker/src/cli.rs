//! The worker's command line: maps the pod's published models and runs them. The
//! `kube-zerocopy-worker` binary is this alone; the Python worker registers its model
//! builder first ([`crate::model::register_python`]), then runs the same commands.
//!
//! - `plan`: list a Task pipeline's input once; its shard count and listing digest as JSON
//!   (stdout, and the termination message, which the operator reads).
//! - `task`: one shard of the input (Task mode, one pod per completion index).
//! - `actor`: map once, serve batches with the Open Inference Protocol (Actor mode).
//! - `drive`: stream an input's shard files through actor replicas into an output.
//! - `inspect`: load, run one input, report load time, pointers and memory as JSON; `--hold`
//!   keeps the process alive until stdin closes, so that /proc can be read while it runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actor::{Batching, Limits, Settings};
use crate::memory::MemoryStats;
use crate::{task, LoadedModel, Pipeline};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kube_zerocopy_batch::client_token::ClientToken;
use kube_zerocopy_batch::data::Store;
use kube_zerocopy_batch::{driver, shards};
use kube_zerocopy_contract::models::ModelSource;
use kube_zerocopy_contract::pod;
use kube_zerocopy_runtime::process::Permanent;
use kube_zerocopy_store::{Bindings, Store as ModelStore};
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(name = "kube-zerocopy-worker", version, about)]
struct Cli {
    #[command(flatten)]
    pod: pod::PodModels,
    #[command(flatten)]
    device: pod::Device,
    #[command(flatten)]
    mapping: pod::Mapping,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Loader {
    /// Map the published layout (zero-copy).
    Shared,
    /// VarStore::load / CModule::load from the source file (the copying baseline).
    Copy,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// List the input once: how many shards, and the digest of the listing.
    Plan {
        #[command(flatten)]
        input: pod::Input,
    },
    /// Run one shard of the input through the models, in order.
    Task {
        /// The shard: the Indexed Job's completion index.
        #[arg(long, env = "JOB_COMPLETION_INDEX")]
        shard_index: usize,
        #[command(flatten)]
        task: pod::Task,
    },
    /// Load the models once, then serve batches with the Open Inference Protocol (v2, REST).
    Actor {
        #[command(flatten)]
        actor: pod::Actor,
        #[command(flatten)]
        limits: pod::ActorLimits,
    },
    /// Stream the input's shard files through actor replicas, writing each answer as output.
    Drive {
        #[command(flatten)]
        driver: pod::Driver,
        #[command(flatten)]
        limits: pod::DriverLimits,
    },
    /// Load the models, run one input, print a JSON report.
    Inspect {
        #[arg(long, value_enum, default_value = "shared")]
        loader: Loader,
        /// A safetensors file with tensor "input".
        #[arg(long)]
        input_file: PathBuf,
        /// Where the output tensor is written (safetensors, tensor "output").
        #[arg(long)]
        output_file: Option<PathBuf>,
        /// Stay alive after the report until stdin closes.
        #[arg(long)]
        hold: bool,
    },
}

/// Opens a pipeline's input or output where it is.
fn open_input(input: &pod::Input) -> Result<Store> {
    Store::open(
        &input.input,
        input.input_s3.as_ref(),
        input.input_azure.as_ref(),
        "input",
    )
}

fn open_output(output: &pod::Output) -> Result<Store> {
    Store::open(
        &output.output,
        output.output_s3.as_ref(),
        output.output_azure.as_ref(),
        "output",
    )
}

fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => bail!("device {other:?}: use cpu, cuda or cuda:N"),
        },
    })
}

/// Parses the command line and runs it; exits with the error's code on failure.
pub fn main() {
    kube_zerocopy_runtime::process::init_logs();
    kube_zerocopy_runtime::process::exit_on_error(
        run(kube_zerocopy_runtime::process::parse_args()),
    );
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn run(cli: Cli) -> Result<()> {
    // Planning lists the input: no models, no libtorch.
    if let Command::Plan { input } = &cli.command {
        let plan = serde_json::to_string(&shards::plan(&open_input(input)?)?)?;
        println!("{plan}");
        kube_zerocopy_runtime::process::write_termination_message(&plan);
        return Ok(());
    }
    // Driving sends files' bytes as they are: no models, no libtorch either.
    if let Command::Drive { .. } = &cli.command {
        return drive(cli.command);
    }
    let started = Instant::now();
    let device = parse_device(&cli.device.device)?;
    if device.is_cuda() {
        crate::cuda::load_backend()?;
    }
    let models = cli.pod.models()?.to_vec();
    let store = ModelStore::new(&cli.pod.store);
    let bindings = Bindings::new(&cli.pod.bindings);
    // libtorch's own start-up (thread pools, allocator), measured apart from the load.
    let init = Instant::now();
    let _ = Tensor::zeros([1], (Kind::Float, device));
    let libtorch_init_ms = ms(init);

    match cli.command {
        Command::Plan { .. } | Command::Drive { .. } => unreachable!("done above"),
        Command::Task {
            shard_index,
            task:
                pod::Task {
                    input,
                    output,
                    shards,
                    input_digest,
                    run,
                },
        } => {
            let input = open_input(&input)?;
            let output = open_output(&output)?;
            let load = Instant::now();
            let pipeline =
                Pipeline::load_shared(&store, &bindings, &models, device, cli.mapping.prefault)?;
            let load_ms = ms(load);
            let infer = Instant::now();
            let shard = shards::Shard {
                input: &input,
                output: &output,
                index: shard_index,
                expected: shards,
                planned: input_digest.as_deref(),
                run: &run,
            };
            let (record, manifest) = task::run_shard(&pipeline, &shard)?;
            let report = json!({
                "shard": shard_index,
                "output": format!("{}{}", output.uri(), record.output),
                "sha256": record.sha256,
                "wrote_manifest": manifest,
                "libtorch_init_ms": libtorch_init_ms,
                "load_ms": load_ms,
                "infer_ms": ms(infer),
                "total_ms": ms(started),
                "memory": MemoryStats::of_process("self")?,
            });
            println!("{report}");
            Ok(())
        }
        Command::Actor {
            actor:
                pod::Actor {
                    listen,
                    model_name,
                    max_batch_rows,
                    max_batch_delay_ms,
                    client_token_file,
                },
            limits:
                pod::ActorLimits {
                    max_body_bytes,
                    body_timeout,
                    queued_batches,
                    drain_seconds,
                },
        } => {
            let client_token = client_token_file
                .map(|path| ClientToken::open(&path).map(Arc::new))
                .transpose()
                .map_err(|e| Permanent(format!("{e:#}")))?;
            let settings = Settings {
                model: model_name,
                limits: Limits {
                    max_body_bytes,
                    body_timeout: Duration::from_secs(body_timeout),
                    queued_batches,
                    ..Limits::default()
                },
                batching: max_batch_rows.map(|max_rows| Batching {
                    max_rows,
                    max_delay: Duration::from_millis(max_batch_delay_ms.unwrap_or(5)),
                }),
                drain: Duration::from_secs(drain_seconds),
                client_token,
            };
            let prefault = cli.mapping.prefault;
            let load = move || Pipeline::load_shared(&store, &bindings, &models, device, prefault);
            crate::actor::serve(load, &listen, settings)
        }
        Command::Inspect {
            loader,
            input_file,
            output_file,
            hold,
        } => {
            let load = Instant::now();
            let loaded = models
                .iter()
                .map(|m| match loader {
                    Loader::Shared => {
                        LoadedModel::load_shared(&store, &bindings, m, device, cli.mapping.prefault)
                    }
                    Loader::Copy => LoadedModel::load_copying(&source_path(m)?, m, device),
                })
                .collect::<Result<Vec<_>>>()?;
            let load_ms = ms(load);
            let x = task::read_input(&input_file)?.to_device(device);
            let infer = Instant::now();
            let mut y = x;
            for m in &loaded {
                y = m.forward(&y)?;
            }
            let infer_ms = ms(infer);
            if let Some(path) = &output_file {
                let dir = path.parent().unwrap_or(Path::new("."));
                task::write_output(dir, &path.file_name().unwrap().to_string_lossy(), &y)?;
            }
            let report = json!({
                "libtorch_init_ms": libtorch_init_ms,
                "load_ms": load_ms,
                "first_infer_ms": infer_ms,
                "since_start_ms": ms(started),
                "models": loaded.iter().map(pointer_report).collect::<Result<Vec<_>>>()?,
                "memory": MemoryStats::of_process("self")?,
            });
            println!("{report}");
            std::io::stdout().flush()?;
            if hold {
                let mut line = String::new();
                while std::io::stdin().read_line(&mut line)? > 0 {}
            }
            Ok(())
        }
    }
}

fn drive(command: Command) -> Result<()> {
    let Command::Drive {
        driver:
            pod::Driver {
                input,
                output,
                service,
                pipeline,
                model_name,
                in_flight_per_replica,
                run,
                client_token_file,
            },
        limits:
            pod::DriverLimits {
                replicas,
                max_attempts,
                request_timeout,
                max_request_bytes,
                input_digest,
            },
    } = command
    else {
        unreachable!("called for drive only")
    };
    let settings = driver::Settings {
        model: model_name,
        in_flight_per_replica: in_flight_per_replica.unwrap_or(2).max(1),
        max_attempts: max_attempts.max(1),
        request_timeout: Duration::from_secs(request_timeout),
        max_request_bytes: max_request_bytes.max(1),
        run,
        planned: input_digest,
        client_token: client_token_file
            .map(|path| ClientToken::open(&path).map(Arc::new))
            .transpose()
            .map_err(|e| Permanent(format!("{e:#}")))?,
    };
    let (input, output) = (open_input(&input)?, open_output(&output)?);
    let summary = match service {
        Some(service) => {
            let cluster = driver::InCluster::new(&service, pipeline.as_deref())?;
            driver::drive(&input, &output, &cluster, &cluster, &settings)?
        }
        None => driver::drive(
            &input,
            &output,
            &driver::FixedReplicas(replicas),
            &driver::Quiet,
            &settings,
        )?,
    };
    let report = serde_json::to_string(&summary)?;
    println!("{report}");
    kube_zerocopy_runtime::process::write_termination_message(&report);
    if let Some(first) = summary.failed.first() {
        return Err(Permanent(format!(
            "{} of {} batches failed; the first, {}: {}",
            summary.failed.len(),
            summary.batches,
            first.input,
            first.reason
        ))
        .into());
    }
    Ok(())
}

fn source_path(m: &ModelSource) -> Result<PathBuf> {
    m.uri
        .strip_prefix("file://")
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "the copying loader needs a file:// source, model {:?} has {}",
                m.name, m.uri
            )
        })
}

/// Where each parameter and buffer's data lies relative to the model's shared mapping.
fn pointer_report(m: &LoadedModel) -> Result<serde_json::Value> {
    let tensors = m.tensors()?;
    let mapping = m.shared.as_ref().map(|s| s.mapping_path().to_owned());
    // Every mapping of the model's file: a Python model's tensors lie in the Python package's.
    let ranges = match &mapping {
        Some(path) => crate::memory::mapped_ranges("self", path)?,
        None => Vec::new(),
    };
    let mut devices: Vec<String> = tensors
        .iter()
        .map(|(_, t)| format!("{:?}", t.device()))
        .collect();
    devices.sort();
    devices.dedup();
    // Only host tensors can lie in the mapping; on cuda every tensor is a device copy.
    let outside: Vec<&str> = tensors
        .iter()
        .filter(|(_, t)| t.device() == Device::Cpu)
        .filter(|(_, t)| {
            let p = t.data_ptr() as usize;
            let end = p + t.numel() * t.kind().elt_size_in_bytes();
            let inside = ranges.iter().any(|r| r.contains(&p) && end <= r.end);
            t.numel() > 0 && !inside
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let mapping_memory = match &mapping {
        Some(p) => Some(MemoryStats::of_mapping("self", p)?),
        None => None,
    };
    Ok(json!({
        "name": m.name,
        "tensors": tensors.len(),
        "tensor_bytes": tensors.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum::<usize>(),
        "outside_mapping": outside,
        "devices": devices,
        "mapping": mapping,
        "mapping_memory": mapping_memory,
    }))
}

#[cfg(test)]
mod tests {
    /// clap checks a command line's definition in debug builds only, when it parses: a clash
    /// (two argument groups of one name) would end the debug binary at its first run.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
