//! What each container of a pipeline's pod runs: command, arguments, environment. A pure
//! function of the pipeline and the paths where the pod's volumes are mounted, shared by the
//! Kubernetes rendering and by `kube-zerocopy local`, so both run exactly the same thing.

use std::path::{Path, PathBuf};

use kube_zerocopy_sidecar::config::{models_to_json, MODELS_ENV};

use crate::crd::{
    DataLocation, DeviceKind, InferencePipelineSpec, PlannedInput, CLIENT_TOKEN_FILE,
};

pub const SIDECAR_BINARY: &str = "kube-zerocopy-sidecar";
pub const WORKER_BINARY: &str = "kube-zerocopy-worker";

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

fn common_env(spec: &InferencePipelineSpec, mounts: &Mounts) -> Vec<(String, String)> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        (
            MODELS_ENV.to_owned(),
            models_to_json(&spec.model_sources(&mounts.sources)),
        ),
        ("KZC_STORE".to_owned(), path(&mounts.store)),
        ("KZC_BINDINGS".to_owned(), path(&mounts.bindings)),
    ]
}

/// The weight server (Pod sharing: its pod's own store).
pub fn sidecar(spec: &InferencePipelineSpec, mounts: &Mounts, listen: &str) -> Invocation {
    let mut env = common_env(spec, mounts);
    env.push((
        "KZC_DOWNLOAD_DIR".into(),
        mounts.downloads.to_string_lossy().into_owned(),
    ));
    env.push(("KZC_LISTEN".into(), listen.to_owned()));
    Invocation {
        command: vec![SIDECAR_BINARY.into(), "serve".into()],
        env,
    }
}

/// The startup probe's command: succeeds once every model is published and bound.
pub fn probe(spec: &InferencePipelineSpec, mounts: &Mounts) -> Invocation {
    Invocation {
        command: vec![SIDECAR_BINARY.into(), "probe".into()],
        env: common_env(spec, mounts),
    }
}

/// Where the input or output is (`KZC_INPUT`, a folder or an s3:// or az:// prefix) and how
/// it is reached (`KZC_INPUT_S3`, `KZC_INPUT_AZURE`); its credentials are under
/// `mounts.data`/<field>/.
fn data_env(
    field: &str,
    location: Option<&DataLocation>,
    mounts: &Mounts,
) -> Vec<(String, String)> {
    let Some(location) = location else {
        return vec![];
    };
    let var = format!("KZC_{}", field.to_uppercase());
    let mut env = vec![(
        var.clone(),
        location.uri.trim_start_matches("file://").to_owned(),
    )];
    let dir = mounts.data.join(field);
    if let Some(access) = location.access(&dir) {
        env.push((
            format!("{var}_S3"),
            serde_json::to_string(&access).expect("S3 settings serialize"),
        ));
    }
    if let Some(access) = location.azure_access(&dir) {
        env.push((
            format!("{var}_AZURE"),
            serde_json::to_string(&access).expect("Azure settings serialize"),
        ));
    }
    env
}

/// Lists a Task pipeline's input once (see [`crate::plan`]).
pub fn planner(spec: &InferencePipelineSpec, mounts: &Mounts) -> Invocation {
    Invocation {
        command: vec![WORKER_BINARY.into(), "plan".into()],
        env: data_env("input", spec.input.as_ref(), mounts),
    }
}

/// A Task-mode worker. The shard index comes from `JOB_COMPLETION_INDEX`, which an Indexed
/// Job sets in each pod (and `kube-zerocopy local` sets per process). `plan` is what planning
/// found when the pipeline does not say how many shards; `run` names this run's records.
pub fn task_worker(
    spec: &InferencePipelineSpec,
    mounts: &Mounts,
    plan: Option<&PlannedInput>,
    run: &str,
) -> Invocation {
    let mut env = common_env(spec, mounts);
    env.extend(data_env("input", spec.input.as_ref(), mounts));
    env.extend(data_env("output", spec.output.as_ref(), mounts));
    // The worker checks the input against them: a count or a listing that disagrees fails
    // the Task.
    let declared = spec.task.as_ref().and_then(|t| t.shards);
    if let Some(shards) = declared.or(plan.map(|p| p.shards)) {
        env.push(("KZC_SHARDS".into(), shards.to_string()));
    }
    if let Some(plan) = plan {
        env.push(("KZC_INPUT_DIGEST".into(), plan.input_digest.clone()));
    }
    env.push(("KZC_RUN".into(), run.to_owned()));
    env.push(("KZC_DEVICE".into(), device(spec).into()));
    Invocation {
        command: vec![WORKER_BINARY.into(), "task".into()],
        env,
    }
}

/// The port an Actor worker serves batches on.
pub const ACTOR_PORT: i32 = 8080;
/// The sidecar's health port (/readyz, /livez).
pub const SIDECAR_PORT: i32 = 8471;

/// An Actor-mode worker: maps the models once, then serves batches with the Open Inference
/// Protocol, the pipeline being its one model, `name`.
pub fn actor_worker(spec: &InferencePipelineSpec, name: &str, mounts: &Mounts) -> Invocation {
    let mut env = common_env(spec, mounts);
    env.push(("KZC_DEVICE".into(), device(spec).into()));
    env.push(("KZC_LISTEN".into(), format!("0.0.0.0:{ACTOR_PORT}")));
    env.push(("KZC_MODEL_NAME".into(), name.to_owned()));
    if let Some(batching) = spec.actor.as_ref().and_then(|a| a.batching.as_ref()) {
        env.push(("KZC_MAX_BATCH_ROWS".into(), batching.max_rows.to_string()));
        if let Some(delay) = batching.max_delay_millis {
            env.push(("KZC_MAX_BATCH_DELAY_MS".into(), delay.to_string()));
        }
    }
    env.extend(client_token_env(spec, mounts));
    Invocation {
        command: vec![WORKER_BINARY.into(), "actor".into()],
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
) -> Invocation {
    let mut env = data_env("input", spec.input.as_ref(), mounts);
    env.extend(data_env("output", spec.output.as_ref(), mounts));
    env.push(("KZC_SERVICE".into(), service.to_owned()));
    env.push(("KZC_MODEL_NAME".into(), name.to_owned()));
    env.push(("KZC_PIPELINE".into(), name.to_owned()));
    env.push(("KZC_RUN".into(), run.to_owned()));
    if let Some(n) = spec.actor.as_ref().and_then(|a| a.in_flight_per_replica) {
        env.push(("KZC_IN_FLIGHT_PER_REPLICA".into(), n.to_string()));
    }
    env.extend(client_token_env(spec, mounts));
    Invocation {
        command: vec![WORKER_BINARY.into(), "drive".into()],
        env,
    }
}

/// Where the replicas and the driver find `actor.tokenSecret`, when it is set.
fn client_token_env(spec: &InferencePipelineSpec, mounts: &Mounts) -> Option<(String, String)> {
    spec.actor.as_ref()?.token_secret.as_ref()?;
    let file = mounts.client_token.join(CLIENT_TOKEN_FILE);
    Some((
        "KZC_CLIENT_TOKEN_FILE".into(),
        file.to_string_lossy().into_owned(),
    ))
}

fn device(spec: &InferencePipelineSpec) -> &'static str {
    match spec.device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
    }
}
