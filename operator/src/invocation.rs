//! What each container of a pipeline's pod runs: command, arguments, environment. A pure
//! function of the pipeline and the paths where the pod's volumes are mounted, shared by the
//! Kubernetes rendering and by `kube-zerocopy local`, so both run exactly the same thing.

use std::path::{Path, PathBuf};

use kube_zerocopy_sidecar::config::{models_to_json, MODELS_ENV};

use crate::crd::{DeviceKind, InferencePipelineSpec};

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
}

impl Mounts {
    /// The paths inside a Kubernetes pod.
    pub fn in_pod() -> Self {
        Mounts {
            store: "/kzc/store".into(),
            bindings: "/kzc/bindings".into(),
            downloads: "/kzc/downloads".into(),
            sources: "/kzc/sources".into(),
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

/// A Task-mode worker. The shard index comes from `JOB_COMPLETION_INDEX`, which an Indexed
/// Job sets in each pod (and `kube-zerocopy local` sets per process).
pub fn task_worker(spec: &InferencePipelineSpec, mounts: &Mounts) -> Invocation {
    let mut env = common_env(spec, mounts);
    let folder = |d: &Option<crate::crd::DataLocation>| {
        d.as_ref()
            .map(|d| d.uri.trim_start_matches("file://").to_owned())
            .unwrap_or_default()
    };
    env.push(("KZC_INPUT".into(), folder(&spec.input)));
    env.push(("KZC_OUTPUT".into(), folder(&spec.output)));
    // The worker checks the input folder against it: a count that disagrees fails the Task.
    if let Some(shards) = spec.task.as_ref().and_then(|t| t.shards) {
        env.push(("KZC_SHARDS".into(), shards.to_string()));
    }
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

/// An Actor-mode worker: maps the models once, then serves batches over HTTP.
pub fn actor_worker(spec: &InferencePipelineSpec, mounts: &Mounts) -> Invocation {
    let mut env = common_env(spec, mounts);
    env.push(("KZC_DEVICE".into(), device(spec).into()));
    env.push(("KZC_LISTEN".into(), format!("0.0.0.0:{ACTOR_PORT}")));
    Invocation {
        command: vec![WORKER_BINARY.into(), "actor".into()],
        env,
    }
}

fn device(spec: &InferencePipelineSpec) -> &'static str {
    match spec.device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
    }
}
