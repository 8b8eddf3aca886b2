//! What each container of a pipeline's pod runs: command, arguments, environment. A pure
//! function of the pipeline and the paths where the pod's volumes are mounted, shared by the
//! Kubernetes rendering and by `kube-zerocopy local`, so both run exactly the same thing.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kube_zerocopy_contract::pod::{self, to_env};

use crate::crd::{
    CredentialFiles, DataLocation, DeviceKind, InferencePipelineSpec, PlannedInput,
    CLIENT_TOKEN_FILE,
};

pub const SIDECAR_BINARY: &str = "kube-zerocopy-weight-server";
pub const WORKER_BINARY: &str = "kube-zerocopy-worker";
/// The worker with an embedded Python interpreter, in the Python runtime image.
pub const PYTHON_WORKER_BINARY: &str = "kube-zerocopy-python-worker";

/// The worker that runs the pipeline's models: the Python worker when one is Python code.
fn model_worker(spec: &InferencePipelineSpec) -> &'static str {
    if spec.models.iter().any(|m| m.python.is_some()) {
        PYTHON_WORKER_BINARY
    } else {
        WORKER_BINARY
    }
}

/// Where a pod's volumes are mounted.
#[derive(Clone, Debug, PartialEq)]
pub struct Mounts {
    /// The store: the pod's own (Pod sharing) or the node agent's view of the node's store,
    /// holding only the pod's models (Node sharing).
    pub store: PathBuf,
    /// This pod's bindings (model name -> digest).
    pub bindings: PathBuf,
    /// Scratch space on disk for http downloads.
    pub downloads: PathBuf,
    /// The models' bearer tokens and CA bundles, one folder per model (weight server only).
    pub sources: PathBuf,
    /// The input's and output's S3 credentials, under input/ and output/ (workers only).
    pub data: PathBuf,
    /// The token an Actor's clients send (its replicas and its batch run's driver only).
    pub client_token: PathBuf,
}

impl Mounts {
    /// The paths inside a Kubernetes pod.
    pub fn in_pod() -> Self {
        Mounts {
            store: "/kzc/store".into(),
            bindings: "/kzc/bindings".into(),
            downloads: "/kzc/downloads".into(),
            sources: "/kzc/sources".into(),
            data: "/kzc/data".into(),
            client_token: "/kzc/client-token".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The store, bindings and models, as the weight server and the workers read them.
fn pod_models(spec: &InferencePipelineSpec, mounts: &Mounts) -> pod::PodModels {
    pod::PodModels {
        models: Some(pod::Models(
            spec.model_sources(CredentialFiles::PerModel(&mounts.sources)),
        )),
        store: mounts.store.clone(),
        bindings: mounts.bindings.clone(),
    }
}

/// The weight server (Pod sharing: its pod's own store).
pub fn sidecar(spec: &InferencePipelineSpec, mounts: &Mounts, listen: &str) -> Invocation {
    let mut env = to_env(&pod_models(spec, mounts));
    env.extend(to_env(&pod::WeightServer {
        download_dir: mounts.downloads.clone(),
    }));
    env.extend(to_env(&pod::Serve {
        listen: listen.to_owned(),
    }));
    Invocation {
        command: vec![SIDECAR_BINARY.into(), "serve".into()],
        env,
    }
}

/// The startup probe's command: succeeds once every model is published and bound.
pub fn probe(spec: &InferencePipelineSpec, mounts: &Mounts) -> Invocation {
    Invocation {
        command: vec![SIDECAR_BINARY.into(), "probe".into()],
        env: to_env(&pod_models(spec, mounts)),
    }
}

/// Where the input is and how it is reached; its credentials are under `mounts.data`/input/.
fn input(location: &DataLocation, mounts: &Mounts) -> pod::Input {
    let dir = mounts.data.join("input");
    pod::Input {
        input: location.uri.trim_start_matches("file://").to_owned(),
        input_s3: location.access(&dir),
        input_azure: location.azure_access(&dir),
    }
}

/// Where the output is, as [`input`], under `mounts.data`/output/.
fn output(location: &DataLocation, mounts: &Mounts) -> pod::Output {
    let dir = mounts.data.join("output");
    pod::Output {
        output: location.uri.trim_start_matches("file://").to_owned(),
        output_s3: location.access(&dir),
        output_azure: location.azure_access(&dir),
    }
}

/// A pipeline's input and output (a Task, a batch run: both are required there).
fn input_output(
    spec: &InferencePipelineSpec,
    mounts: &Mounts,
) -> Result<(pod::Input, pod::Output)> {
    match (&spec.input, &spec.output) {
        (Some(i), Some(o)) => Ok((input(i, mounts), output(o, mounts))),
        _ => bail!("spec.input and spec.output are needed here"),
    }
}

/// Lists a Task pipeline's input once (see [`crate::plan`]).
pub fn planner(spec: &InferencePipelineSpec, mounts: &Mounts) -> Result<Invocation> {
    let location = spec.input.as_ref().context("planning needs spec.input")?;
    Ok(Invocation {
        command: vec![WORKER_BINARY.into(), "plan".into()],
        env: to_env(&input(location, mounts)),
    })
}

/// A Task-mode worker. The shard index comes from `JOB_COMPLETION_INDEX`, which an Indexed
/// Job sets in each pod (and `kube-zerocopy local` sets per process). `plan` is what planning
/// found when the pipeline does not say how many shards; `run` names this run's records.
pub fn task_worker(
    spec: &InferencePipelineSpec,
    mounts: &Mounts,
    plan: Option<&PlannedInput>,
    run: &str,
) -> Result<Invocation> {
    let (input, output) = input_output(spec, mounts)?;
    // The worker checks the input against them: a count or a listing that disagrees fails
    // the Task.
    let declared = spec.task.as_ref().and_then(|t| t.shards);
    let shards = declared.or(plan.map(|p| p.shards));
    let task = pod::Task {
        input,
        output,
        shards: shards.map(|n| n.max(0) as usize),
        input_digest: plan.map(|p| p.input_digest.clone()),
        run: run.to_owned(),
    };
    let mut env = to_env(&pod_models(spec, mounts));
    env.extend(to_env(&task));
    env.extend(to_env(&device(spec)));
    Ok(Invocation {
        command: vec![model_worker(spec).into(), "task".into()],
        env,
    })
}

/// The port an Actor worker serves batches on.
pub const ACTOR_PORT: i32 = 8080;
/// The sidecar's health port (/readyz, /livez).
pub const SIDECAR_PORT: i32 = 8471;

/// An Actor-mode worker: maps the models once, then serves batches with the Open Inference
/// Protocol, the pipeline being its one model, `name`.
pub fn actor_worker(spec: &InferencePipelineSpec, name: &str, mounts: &Mounts) -> Invocation {
    let batching = spec.actor.as_ref().and_then(|a| a.batching.as_ref());
    let actor = pod::Actor {
        listen: format!("0.0.0.0:{ACTOR_PORT}"),
        model_name: name.to_owned(),
        max_batch_rows: batching.map(|b| b.max_rows),
        max_batch_delay_ms: batching
            .and_then(|b| b.max_delay_millis)
            .map(|ms| ms.max(0) as u64),
        client_token_file: client_token_file(spec, mounts),
    };
    let mut env = to_env(&pod_models(spec, mounts));
    env.extend(to_env(&device(spec)));
    env.extend(to_env(&actor));
    Invocation {
        command: vec![model_worker(spec).into(), "actor".into()],
        env,
    }
}

/// The driver of an Actor's batch run: streams the input through the replicas behind
/// `service`, the pipeline `name` being their model, and reports into the pipeline's status.
pub fn driver(
    spec: &InferencePipelineSpec,
    name: &str,
    service: &str,
    run: &str,
    mounts: &Mounts,
) -> Result<Invocation> {
    let (input, output) = input_output(spec, mounts)?;
    let driver = pod::Driver {
        input,
        output,
        service: Some(service.to_owned()),
        pipeline: Some(name.to_owned()),
        model_name: name.to_owned(),
        in_flight_per_replica: spec
            .actor
            .as_ref()
            .and_then(|a| a.in_flight_per_replica)
            .map(|n| n.max(1) as usize),
        run: run.to_owned(),
        client_token_file: client_token_file(spec, mounts),
    };
    Ok(Invocation {
        command: vec![WORKER_BINARY.into(), "drive".into()],
        env: to_env(&driver),
    })
}

/// Where the replicas and the driver find `actor.tokenSecret`, when it is set.
fn client_token_file(spec: &InferencePipelineSpec, mounts: &Mounts) -> Option<PathBuf> {
    spec.actor.as_ref()?.token_secret.as_ref()?;
    Some(mounts.client_token.join(CLIENT_TOKEN_FILE))
}

fn device(spec: &InferencePipelineSpec) -> pod::Device {
    let device = match spec.device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
    };
    pod::Device {
        device: device.to_owned(),
    }
}
