//! The `InferencePipeline` custom resource.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The model file format (mirrors the sidecar's, with a schema for the CRD).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelFormat {
    Safetensors,
    TorchScript,
}

impl From<ModelFormat> for kube_zerocopy_sidecar::ModelFormat {
    fn from(f: ModelFormat) -> Self {
        match f {
            ModelFormat::Safetensors => Self::Safetensors,
            ModelFormat::TorchScript => Self::TorchScript,
        }
    }
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "kube-zerocopy.io",
    version = "v1alpha1",
    kind = "InferencePipeline",
    namespaced,
    status = "InferencePipelineStatus",
    shortname = "ipl",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.models.all(m, self.models.exists_one(n, n.name == m.name))").message("spec.models: model names must be unique"))]
#[x_kube(validation = Rule::new("!has(self.task) || self.mode == 'Task'").message("spec.task applies only to mode Task; use spec.actor for mode Actor"))]
#[x_kube(validation = Rule::new("!has(self.actor) || self.mode == 'Actor'").message("spec.actor applies only to mode Actor; use spec.task for mode Task"))]
#[x_kube(validation = Rule::new("self.mode != 'Task' || (has(self.input) && has(self.output))").message("mode Task needs spec.input and spec.output (folders of shard files)"))]
#[x_kube(validation = Rule::new("self.mode != 'Actor' || has(self.actor)").message("mode Actor needs spec.actor with replicas"))]
#[x_kube(validation = Rule::new("self.mode != 'Task' || (has(self.task) && has(self.task.shards))").message("mode Task needs spec.task.shards: the number of shard files in the input folder"))]
pub struct InferencePipelineSpec {
    /// Task: an Indexed Job, one pod per input shard. Actor: a Deployment serving batches.
    pub mode: Mode,
    /// cpu, or cuda: weights are copied once per replica from shared memory to the GPU.
    #[serde(default)]
    pub device: DeviceKind,
    /// Pod: one copy of the weights per pod. Node: one copy per node, shared by its pods.
    #[serde(default)]
    pub sharing: Sharing,
    /// The models, run in order: the output of one is the input of the next.
    #[schemars(length(min = 1, max = 16))]
    pub models: Vec<ModelSpec>,
    /// A folder of safetensors shard files, each with a tensor named "input".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<DataLocation>,
    /// Where each shard's output file is written (tensor "output").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<DataLocation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<ActorSettings>,
    /// Overrides for the pods: image, resources, placement, extra volumes (for the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodOverrides>,
}

/// What a pipeline may change in its pods. Everything else is the operator's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// The runtime image (sidecar and worker); defaults to the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The worker container's resources (activations; the weights are charged to the sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Extra volumes, e.g. the input and output data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<k8s_openapi::api::core::v1::Volume>>,
    /// Where the worker mounts the extra volumes. The weight server mounts them too, read-only,
    /// so that a file:// model on one of them (a PVC at /models) can be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<k8s_openapi::api::core::v1::VolumeMount>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    Task,
    Actor,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Sharing {
    #[default]
    Pod,
    Node,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.architecture) || self.format == 'Safetensors'").message("architecture applies only to format Safetensors (TorchScript archives carry their code)"))]
pub struct ModelSpec {
    /// Lowercase letters, digits and '-', like a DNS label.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("model name must be lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,
    pub format: ModelFormat,
    pub source: ModelSourceSpec,
    /// Safetensors only: the built-in architecture the generic worker builds (Mlp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSourceSpec {
    /// file://, http:// or https://
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('file:///') || self.startsWith('http://') || self.startsWith('https://')").message("source.uri must start with file:///, http:// or https://"))]
    pub uri: String,
    /// The model file's size, e.g. 400Mi: sizes the shared-memory volume and the sidecar's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// The expected sha256 of the file, 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("source.sha256 must be 64 lowercase hex digits"))]
    pub sha256: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct DataLocation {
    /// file:// folder, as mounted in the pod.
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('file:///')").message("input and output must be file:/// folders mounted into the pod"))]
    pub uri: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSettings {
    /// How many shard pods run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("task.parallelism must be at least 1"))]
    pub parallelism: Option<i32>,
    /// The number of shards (files in the input folder): the Job's completions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("task.shards must be at least 1"))]
    pub shards: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActorSettings {
    #[x_kube(validation = Rule::new("self >= 1").message("actor.replicas must be at least 1"))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("actor.workersPerPod must be at least 1"))]
    pub workers_per_pod: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePipelineStatus {
    /// Pending, Running, Succeeded, Failed (Task); Pending, Progressing, Ready, Degraded (Actor);
    /// Blocked (both: the namespace's Pod Security level forbids the pods, see Degraded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Task: shards succeeded/total. Actor: replicas available/desired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardStatus>,
    /// WeightsReady, Progressing, Succeeded, Failed, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ShardStatus {
    pub total: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub active: i32,
}

impl InferencePipelineSpec {
    /// The models as the sidecar and the workers read them (`KZC_MODELS`).
    pub fn model_sources(&self) -> Vec<kube_zerocopy_sidecar::ModelSource> {
        self.models
            .iter()
            .map(|m| kube_zerocopy_sidecar::ModelSource {
                name: m.name.clone(),
                format: m.format.into(),
                uri: m.source.uri.clone(),
                sha256: m.source.sha256.clone(),
                architecture: m.architecture.clone(),
            })
            .collect()
    }
}
