//! The `InferencePipeline` custom resource.

use kube::CustomResource;
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

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    pub name: String,
    pub format: ModelFormat,
    pub source: ModelSourceSpec,
    /// Safetensors only: the built-in architecture the generic worker builds (Mlp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSourceSpec {
    /// file://, http:// or https://
    pub uri: String,
    /// The expected sha256 of the file, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct DataLocation {
    /// file:// folder, as mounted in the pod.
    pub uri: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSettings {
    /// How many shard pods run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<i32>,
    /// The number of shards (files in the input folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActorSettings {
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_per_pod: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
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
