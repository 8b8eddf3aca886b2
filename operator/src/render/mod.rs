//! A pipeline rendered into the objects that run it: pure functions, no IO.
//!
//! Task mode becomes an Indexed Job (one completion per shard, [`task`]); Actor mode a
//! Deployment, a Service and a NetworkPolicy ([`actor`]) and, with data to run through it, a
//! batch run's driver ([`driver`]). A Task pipeline whose shard count is not known yet becomes
//! the Job that plans its input ([`planning`]). Every pod ([`pod`], [`volumes`]) has the weight
//! server as a native sidecar (an init container with `restartPolicy: Always`) whose startup
//! probe passes only once every model is published, so the workers start only then; the
//! workers mount the shared store read-only. What a pipeline may not ask for is refused first
//! ([`validate`]).

mod actor;
mod driver;
mod planning;
mod pod;
mod task;
mod validate;
mod volumes;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{InferencePipeline, Mode, PlannedInput};
use crate::invocation::{self};
use crate::policy::PipelinePolicy;
use crate::quantity;
use driver::batch_run;
use kube_zerocopy_contract::names;
use planning::plan_job;
use pod::pod_template;
pub use validate::{validate, Error};
use volumes::volumes;
pub use volumes::{
    BINDINGS_VOLUME, CLIENT_TOKEN_VOLUME, DOWNLOADS_VOLUME, MODELS_VOLUME, NODE_MODELS_MOUNT,
    RUN_AS, SOURCE_VOLUME_PREFIX, STORE_VOLUME,
};

/// What the operator itself decides, not the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The runtime image: kube-zerocopy-weight-server and kube-zerocopy-worker with libtorch's CPU
    /// libraries.
    pub runtime_image: String,
    /// The runtime image of `device: cuda` pipelines: the same, with libtorch's CUDA backend
    /// and the CUDA libraries it loads (several GB, hence a separate image).
    pub cuda_runtime_image: String,
    /// What a pipeline's template may add to its pods.
    pub policy: PipelinePolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runtime_image: format!("kube-zerocopy/runtime:{}", env!("CARGO_PKG_VERSION")),
            cuda_runtime_image: format!("kube-zerocopy/runtime-cuda:{}", env!("CARGO_PKG_VERSION")),
            policy: PipelinePolicy::default(),
        }
    }
}

/// The objects of one pipeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Rendered {
    Task {
        job: Box<Job>,
    },
    /// A Task pipeline whose shards are not known yet: the Job that plans its input first.
    Plan {
        job: Box<Job>,
    },
    Actor {
        deployment: Box<Deployment>,
        service: Box<Service>,
        /// Who may reach the replicas: the pods of the pipeline's namespace.
        network_policy: Box<NetworkPolicy>,
        /// With an input and an output: the driver that runs it through the replicas.
        run: Option<Box<BatchRun>>,
    },
}

/// An Actor's batch run: the driver's Job, and the identity that lets it find the replicas
/// (list EndpointSlices) and report (patch its pipeline's status), and nothing else.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRun {
    pub job: Job,
    pub account: ServiceAccount,
    pub role: Role,
    pub binding: RoleBinding,
}

impl Rendered {
    /// Every object, as YAML documents (what `kube-zerocopy render` prints).
    pub fn to_yaml(&self) -> Result<String> {
        let docs = match self {
            Rendered::Task { job } | Rendered::Plan { job } => vec![serde_yaml::to_string(job)?],
            Rendered::Actor {
                deployment,
                service,
                network_policy,
                run,
            } => {
                let mut docs = vec![
                    serde_yaml::to_string(deployment)?,
                    serde_yaml::to_string(service)?,
                    serde_yaml::to_string(network_policy)?,
                ];
                if let Some(run) = run {
                    docs.push(serde_yaml::to_string(&run.account)?);
                    docs.push(serde_yaml::to_string(&run.role)?);
                    docs.push(serde_yaml::to_string(&run.binding)?);
                    docs.push(serde_yaml::to_string(&run.job)?);
                }
                docs
            }
        };
        Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
    }
}

/// The name of every object a pipeline owns.
pub fn object_name(pipeline: &InferencePipeline) -> String {
    format!(
        "{}-zerocopy",
        pipeline.metadata.name.as_deref().unwrap_or("pipeline")
    )
}

pub fn labels(pipeline: &InferencePipeline) -> BTreeMap<String, String> {
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    let component = match pipeline.spec.mode {
        Mode::Task => "task",
        Mode::Actor => "actor",
    };
    BTreeMap::from([
        (names::NAME_LABEL.into(), "kube-zerocopy".into()),
        (names::INSTANCE_LABEL.into(), name.clone()),
        (names::COMPONENT_LABEL.into(), component.into()),
        (names::MANAGED_BY_LABEL.into(), "kube-zerocopy".into()),
        (names::PIPELINE_LABEL.into(), name),
    ])
}

/// The labels that select a pipeline's pods (stable across spec changes).
pub fn selector_labels(pipeline: &InferencePipeline) -> BTreeMap<String, String> {
    BTreeMap::from([(
        names::PIPELINE_LABEL.into(),
        pipeline.metadata.name.clone().unwrap_or_default(),
    )])
}

fn metadata(pipeline: &InferencePipeline) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(pipeline)),
        namespace: pipeline.metadata.namespace.clone(),
        labels: Some(labels(pipeline)),
        owner_references: owner_reference(pipeline).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The controller reference, when the pipeline came from a cluster (it has a uid).
fn owner_reference(pipeline: &InferencePipeline) -> Option<OwnerReference> {
    pipeline.controller_owner_ref(&())
}

/// The most the models of one pipeline may add up to: far above any node's memory, and far
/// enough below 2^64 that the volume and memory sizes computed from it cannot overflow.
const MAX_MODEL_BYTES: u64 = 1 << 60;

/// Bytes of all models, when every model gives its size.
pub fn total_model_bytes(pipeline: &InferencePipeline) -> Result<Option<u64>> {
    let mut total = 0u64;
    for m in &pipeline.spec.models {
        let Some(q) = &m.source.size else {
            return Ok(None);
        };
        let size = quantity::to_bytes(&q.0).with_context(|| format!("model {:?}: size", m.name))?;
        total = total
            .checked_add(size)
            .filter(|&t| t <= MAX_MODEL_BYTES)
            .with_context(|| {
                format!(
                    "the models' sizes add up to more than 1Ei (model {:?})",
                    m.name
                )
            })?;
    }
    Ok(Some(total))
}

/// Renders a pipeline. Pure: the same pipeline and settings always give the same objects. A
/// Task pipeline that does not say how many shards it has becomes the Job that plans them.
pub fn render(pipeline: &InferencePipeline, settings: &Settings) -> Result<Rendered, Error> {
    render_planned(pipeline, settings, None)
}

/// [`render`], given what planning found when the pipeline does not say how many shards.
pub fn render_planned(
    pipeline: &InferencePipeline,
    settings: &Settings,
    plan: Option<&PlannedInput>,
) -> Result<Rendered, Error> {
    validate(pipeline, settings)?;
    Ok(build(pipeline, settings, plan)?)
}

/// The objects of a pipeline that [`validate`] passed.
pub fn build(
    pipeline: &InferencePipeline,
    settings: &Settings,
    plan: Option<&PlannedInput>,
) -> Result<Rendered> {
    let spec = &pipeline.spec;
    // A declared count needs no plan: the workers check the count alone.
    let plan = plan.filter(|_| crate::plan::needed(spec));
    if crate::plan::needed(spec) && plan.is_none() {
        return Ok(Rendered::Plan {
            job: Box::new(plan_job(pipeline, settings)?),
        });
    }
    let model_bytes = total_model_bytes(pipeline)?;
    let (volumes, mounts) = volumes(pipeline, model_bytes);
    let worker = match spec.mode {
        Mode::Task => invocation::task_worker(spec, &mounts, plan, &run_name(pipeline))?,
        Mode::Actor => invocation::actor_worker(spec, &pipeline.name_any(), &mounts),
    };
    let template = pod_template(pipeline, settings, worker, &mounts, volumes, model_bytes);
    match spec.mode {
        Mode::Task => Ok(Rendered::Task {
            job: Box::new(task::job(pipeline, template, plan)?),
        }),
        Mode::Actor => actor::objects(pipeline, settings, template),
    }
}

/// The name of a pipeline's run: its records and manifest are the run's (see the worker's
/// task module). One generation of one pipeline (its uid: one re-created under the same name
/// is another).
pub fn run_name(pipeline: &InferencePipeline) -> String {
    let uid = pipeline.metadata.uid.as_deref().unwrap_or("local");
    format!(
        "{}-{}",
        uid.split('-').next().unwrap_or(uid),
        pipeline.metadata.generation.unwrap_or(0)
    )
}

#[cfg(test)]
mod tests;
