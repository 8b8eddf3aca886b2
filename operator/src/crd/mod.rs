//! The `InferencePipeline` custom resource.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod status;
pub use status::*;

/// One format type for the resource and every binary that reads the models.
pub use kube_zerocopy_contract::models::ModelFormat;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "kube-zerocopy.io",
    version = "v1alpha1",
    kind = "InferencePipeline",
    namespaced,
    status = "InferencePipelineStatus",
    shortname = "ipl",
    // `kubectl get kube-zerocopy`: the pipelines and the nodes' stores.
    category = "kube-zerocopy",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    // Why it is not progressing (AsExpected when it is), without `describe`; -o wide adds what
    // it runs.
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#,
    printcolumn = r#"{"name":"Device","type":"string","jsonPath":".spec.device","priority":1}"#,
    printcolumn = r#"{"name":"Sharing","type":"string","jsonPath":".spec.sharing","priority":1}"#,
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".spec.models[*].name","priority":1}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A batch-inference pipeline: models loaded once per pod (or node) into shared memory and mapped by its workers, run as an Indexed Job (Task) or a Deployment (Actor).",
    // The pipeline's objects are named <name>-zerocopy; a Service name is a DNS-1035 label and
    // an Indexed Job's pods have the host name <job>-<index>: both at most 63 characters. (The
    // shards' rule leaves a name too long anyway to the rule before it: one reason, not two.)
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must start with a letter and hold only lowercase letters, digits and '-': the pipeline's Service and Job are named after it"),
    validation = Rule::new("self.metadata.name.size() <= 54").message("metadata.name may have at most 54 characters: the pipeline's objects are named <name>-zerocopy, at most 63"),
    validation = Rule::new("self.spec.mode != 'Actor' || !has(self.spec.input) || self.metadata.name.size() > 54 || self.metadata.name.size() <= 47").message("metadata.name may have at most 47 characters for an Actor pipeline with an input: its driver's Job is named <name>-zerocopy-driver, at most 63"),
    validation = Rule::new("self.spec.mode != 'Task' || !has(self.spec.task) || !has(self.spec.task.shards) || self.metadata.name.size() > 54 || self.metadata.name.size() + string(self.spec.task.shards - 1).size() <= 53").message("metadata.name is too long for this many shards: each pod's host name <name>-zerocopy-<shard index> must have at most 63 characters")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.models.all(m, self.models.exists_one(n, n.name == m.name))").message("spec.models: model names must be unique"))]
#[x_kube(validation = Rule::new("!has(self.task) || self.mode == 'Task'").message("spec.task applies only to mode Task; use spec.actor for mode Actor"))]
#[x_kube(validation = Rule::new("!has(self.actor) || self.mode == 'Actor'").message("spec.actor applies only to mode Actor; use spec.task for mode Task"))]
#[x_kube(validation = Rule::new("self.mode != 'Task' || (has(self.input) && has(self.output))").message("mode Task needs spec.input and spec.output (folders or s3:// prefixes of shard files)"))]
#[x_kube(validation = Rule::new("!has(self.input) || !has(self.output) || (self.input.uri != self.output.uri && self.input.uri + '/' != self.output.uri && self.input.uri != self.output.uri + '/')").message("spec.output must be another folder than spec.input: each output file is named after its shard and would replace it"))]
#[x_kube(validation = Rule::new("!has(self.sharing) || self.sharing != 'Node' || self.models.all(m, !has(m.source.caConfigMap))").message("sharing: Node: the node's agent takes a model's credentials from one Secret (the kubelet hands it over with the volume), not a caConfigMap: use sharing: Pod for a source behind a private CA"))]
#[x_kube(validation = Rule::new("!has(self.sharing) || self.sharing != 'Node' || self.models.all(m, (!m.source.uri.startsWith('s3://') || (has(m.source.s3) && has(m.source.s3.credentialsSecret))) && (!m.source.uri.startsWith('az://') || (has(m.source.azure) && has(m.source.azure.credentialsSecret))))").message("sharing: Node reads an s3:// or az:// source only with the pipeline's own credentials, never with the node's identity: name source.s3.credentialsSecret or source.azure.credentialsSecret, or use sharing: Pod"))]
#[x_kube(validation = Rule::new("self.models.all(m, !has(m.python)) || (has(self.template) && has(self.template.image))").message("a model run by Python code needs template.image: your image, built FROM the Python runtime image with your code installed"))]
#[x_kube(validation = Rule::new("self.mode != 'Actor' || has(self.actor)").message("mode Actor needs spec.actor with replicas"))]
#[x_kube(validation = Rule::new("self.mode != 'Actor' || has(self.input) == has(self.output)").message("mode Actor takes spec.input and spec.output together (a batch run: a driver streams the input through the replicas into the output) or neither (the replicas serve requests behind their Service)"))]
#[x_kube(validation = Rule::new("self.mode != 'Actor' || !has(self.actor) || !has(self.actor.inFlightPerReplica) || has(self.input)").message("actor.inFlightPerReplica applies only to a batch run (spec.input and spec.output)"))]
/// What the pipeline runs (its models, in order), how (mode, device, sharing) and on what
/// (input and output folders for Task, a Service for Actor).
pub struct InferencePipelineSpec {
    /// Task: an Indexed Job, one pod per input shard. Actor: a Deployment serving batches with
    /// the Open Inference Protocol; given an input and an output, a driver Job streams the
    /// input's shards through its replicas, and the replicas are scaled away once it is done.
    pub mode: Mode,
    /// cpu, or cuda: weights are copied once per replica from shared memory to the GPU (and
    /// the pods run the CUDA runtime image). Default: cpu.
    #[serde(default)]
    pub device: DeviceKind,
    /// Pod: one copy of the weights per pod, written by its weight server. Node: one copy per
    /// node, kept by the node's agent (the chart's DaemonSet) and mounted read-only into every
    /// pod that names the model, in any namespace; its sources are http(s) URLs, or file://
    /// paths of the node under the agent's nodeStore.fileSources. Default: Pod.
    #[serde(default)]
    pub sharing: Sharing,
    /// The models, run in order: the output of one is the input of the next.
    #[schemars(length(min = 1, max = 16))]
    pub models: Vec<ModelSpec>,
    /// A folder or s3:// prefix of safetensors shard files, each with a tensor named "input".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<DataLocation>,
    /// Where each shard's output is written (tensor "output", the shard's name), and, once
    /// every shard is written, manifest.json (each shard's input, output and sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<DataLocation>,
    /// Task mode only: how many shards, how many at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSettings>,
    /// Actor mode only: how many replicas, dynamic batching, and batches in flight per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<ActorSettings>,
    /// Holds the pipeline back: no pod runs while true. A Task's running Job is suspended (the
    /// shards already done stay done), an Actor's replicas are scaled to 0; setting it to false
    /// goes on where it stopped. A pipeline labelled kueue.x-k8s.io/queue-name is admitted by
    /// Kueue instead, and suspending it deactivates its Workload. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Seconds after the pipeline finished (Succeeded or Failed) when the operator deletes it,
    /// and with it its Jobs, pods and Service (the outputs stay). Kept when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("ttlSecondsAfterFinished must not be negative"))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Overrides for the pods: image, resources, placement, extra volumes (for the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodOverrides>,
}

/// What a pipeline may change in its pods. Everything else is the operator's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// The runtime image (weight server and worker); defaults to the operator's. Required when
    /// a model is run by Python code: an image built FROM the Python runtime image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The worker container's resources (activations; the weights are charged to the sidecar).
    /// Quantities the API server cannot parse block the pipeline with reason InvalidPipeline: a
    /// CEL rule over these maps costs more than the API server allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// The pods' nodeSelector: labels a node must have to run them (e.g. a GPU type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// The pods' tolerations (e.g. of GPU nodes' taints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Extra volumes, e.g. the input and output data. Names starting with kzc- are the
    /// operator's; hostPath volumes only where the operator's policy allows them
    /// (pipelinePolicy.allowHostPath).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<k8s_openapi::api::core::v1::Volume>>,
    /// Where the worker mounts the extra volumes. The weight server mounts them too, read-only,
    /// so that a file:// model on one of them (a PVC at /models) can be read. Paths under /kzc
    /// and the operator's own volumes (kzc-*) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<k8s_openapi::api::core::v1::VolumeMount>>,
    /// The pods' ServiceAccount (default: the namespace's default), e.g. for a data volume's
    /// access; only where the operator's policy allows it (pipelinePolicy.allowServiceAccount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// More environment for the worker (e.g. OMP_NUM_THREADS, or a Secret's key for the
    /// model's code). Names starting with KZC_ are the operator's and are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<k8s_openapi::api::core::v1::EnvVar>>,
    /// Secrets of the namespace that let the nodes pull template.image (a private registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
    /// The pods' PriorityClass; only those the operator's policy lists
    /// (pipelinePolicy.priorityClasses). Default: the cluster's default priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The pods' RuntimeClass (a sandboxed runtime such as gVisor or Kata, or a GPU runtime);
    /// only those the operator's policy lists (pipelinePolicy.runtimeClasses). Default: the
    /// nodes' default runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// The pods' affinity (e.g. nodes of one zone, replicas spread apart). With Node sharing
    /// the operator adds its preference for nodes that hold the models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// The pods' annotations (e.g. for a service mesh or the cluster autoscaler). Keys under
    /// kube-zerocopy.io/ are the operator's and are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    /// The labels of every pod the pipeline makes (e.g. a team or cost center for chargeback,
    /// a service mesh's app label). Refused: the operator's own (keys under kube-zerocopy.io/,
    /// and app.kubernetes.io/ name, instance, component and managed-by), and those the Job and
    /// Deployment controllers or Kueue set (batch.kubernetes.io/, job-name, controller-uid,
    /// pod-template-hash, kueue.x-k8s.io/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
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
#[x_kube(validation = Rule::new("!has(self.python) || self.format == 'Safetensors'").message("python applies only to format Safetensors (TorchScript archives carry their code)"))]
#[x_kube(validation = Rule::new("self.format != 'Safetensors' || has(self.architecture) || has(self.python)").message("a Safetensors model is named tensors with no code to run them: give python.entryPoint (your model's code, in an image built FROM the Python runtime image) or architecture (the built-in Mlp), or save the model as TorchScript"))]
#[x_kube(validation = Rule::new("!has(self.architecture) || !has(self.python)").message("give python or architecture, not both: python names your model's code, architecture a built-in one"))]
pub struct ModelSpec {
    /// Lowercase letters, digits and '-', like a DNS label.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("model name must be lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,
    /// Safetensors (named tensors, run by a built-in architecture) or TorchScript (a module
    /// saved with torch.jit.save).
    pub format: ModelFormat,
    /// Where the model file is and what it must be.
    pub source: ModelSourceSpec,
    /// Safetensors only: the built-in architecture the worker builds and binds the tensors to
    /// (Mlp: Linear layers with ReLU between them). A Safetensors model needs this or python.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Safetensors only: your model's Python code, which builds the model from its tensors
    /// (mapped read-only, without a copy) and runs each batch. The pipeline's image must be
    /// built FROM the Python runtime image. A Safetensors model needs this or architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonModel>,
}

/// A model run by the user's Python code.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PythonModel {
    /// `module:callable`, importable in the image (e.g. `my_models.classifier:build`). It is
    /// called once as `callable(weights, device)` with the model's tensors by name; what it
    /// returns is called with each batch (`{"input": tensor}`) and answers a tensor, or
    /// `{"output": tensor}`.
    #[schemars(length(min = 3, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*$')").message("python.entryPoint must be module:callable, e.g. my_models.classifier:build (dotted Python names)"))]
    pub entry_point: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.uri.startsWith('http') || !has(self.bearerTokenSecret)").message("bearerTokenSecret applies only to http(s) sources (s3:// takes source.s3.credentialsSecret)"))]
#[x_kube(validation = Rule::new("self.uri.startsWith('http') || self.uri.startsWith('s3://') || self.uri.startsWith('az://') || !has(self.caConfigMap)").message("caConfigMap applies only to http(s), s3:// and az:// sources"))]
#[x_kube(validation = Rule::new("self.uri.startsWith('s3://') || !has(self.s3)").message("source.s3 applies only to s3:// sources"))]
#[x_kube(validation = Rule::new("self.uri.startsWith('az://') == has(self.azure)").message("source.azure (the storage account) is needed by az:// sources and applies only to them"))]
pub struct ModelSourceSpec {
    /// file://, http://, https://, s3://<bucket>/<key> or az://<container>/<blob>. Credentials
    /// never go in the URI (it is in the pods' environment and logs): use bearerTokenSecret,
    /// s3.credentialsSecret or azure.credentialsSecret.
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('file:///') || self.startsWith('http://') || self.startsWith('https://') || self.startsWith('s3://') || self.startsWith('az://')").message("source.uri must start with file:///, http://, https://, s3:// or az://"))]
    #[x_kube(validation = Rule::new("!self.startsWith('az://') || self.matches('^az://[a-z0-9](-?[a-z0-9])+/[^?#]+$')").message("source.uri must be az://<container>/<blob>: a container name of 3 to 63 lowercase letters, digits and single '-', then the blob's name"))]
    #[x_kube(validation = Rule::new("!self.startsWith('s3://') || self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^?#]+$')").message("source.uri must be s3://<bucket>/<key>: a bucket name of 3 to 63 lowercase letters, digits, '.' and '-', then the object's key"))]
    #[x_kube(validation = Rule::new("!self.matches('^https?://[^/?#]*@')").message("source.uri must not carry credentials (user:password@): put a token in a Secret and name it in source.bearerTokenSecret"))]
    #[x_kube(validation = Rule::new("!self.matches('(?i)[?&#](x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|awsaccesskeyid|signature|sig|access_token|token)=')").message("source.uri must not carry a signature or token in its query (a presigned or SAS URL is a credential, and a source's URI is shown in logs, events and status): put a token in a Secret named in source.bearerTokenSecret, or use s3:// or az:// with source.credentialsSecret"))]
    pub uri: String,
    /// The model file's size as a quantity (e.g. 400Mi, 2Gi), or a little more: sizes each
    /// pod's shared-memory volume and the weight server's memory. Required with sharing: Pod
    /// (the operator refuses a pipeline without it); with sharing: Node it bounds what the node
    /// agent fetches, and by default nothing does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_quantity")]
    #[x_kube(validation = Rule::new("isQuantity(string(self))").message("source.size must be a quantity such as 400Mi or 2Gi"))]
    pub size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// The expected sha256 of the file, 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("source.sha256 must be 64 lowercase hex digits"))]
    pub sha256: Option<String>,
    /// http(s) only: a key of a Secret in the pipeline's namespace holding a token, sent as
    /// `Authorization: Bearer <token>` (not on redirects to another host). Only the weight
    /// server mounts it; with Node sharing the kubelet hands the Secret to the node's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<k8s_openapi::api::core::v1::SecretKeySelector>,
    /// https and s3 only: a key of a ConfigMap in the pipeline's namespace holding PEM
    /// certificates to trust besides the image's CA bundle (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<k8s_openapi::api::core::v1::ConfigMapKeySelector>,
    /// s3 only: which service holds the bucket and which credentials read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3SourceSpec>,
    /// az only (and needed there): which storage account holds the container, and which
    /// credentials read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSourceSpec>,
}

/// How an az:// source or data prefix is reached. Without credentialsSecret the identity of
/// the container that reads it is used (Azure workload identity, managed identity), as with
/// Azure's own tools.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSourceSpec {
    /// The storage account's name.
    #[schemars(length(min = 3, max = 24))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]+$')").message("azure.account must be 3 to 24 lowercase letters and digits"))]
    pub account: String,
    /// The account's blob endpoint, e.g. http://azurite.storage:10000/devstoreaccount1 for an
    /// emulator. Default: https://<account>.blob.core.windows.net.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+(/[^?#@]*)?$')").message("azure.endpoint must be http(s)://<host>[:<port>][/<path>], without credentials or a query"))]
    pub endpoint: Option<String>,
    /// The name of a Secret in the pipeline's namespace with the key AZURE_STORAGE_ACCOUNT_KEY
    /// (the account's access key). Only the containers that read the object mount it: the
    /// weight server for a model, the workers for data; with Node sharing the kubelet hands
    /// it to the node's agent (and it is required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

/// How an s3:// source or data prefix is reached. What is not set here comes from the
/// environment of the container that reads it, as with AWS's own tools: AWS_REGION, and the
/// pod's identity (web identity token, instance profile) when no Secret is named.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3SourceSpec {
    /// An S3-compatible service's address, e.g. http://minio.storage:9000. Default: AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+/?$')").message("s3.endpoint must be http(s)://<host>[:<port>], without a path or credentials"))]
    pub endpoint: Option<String>,
    /// The bucket's region. Default: the environment's AWS_REGION, else us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub region: Option<String>,
    /// The name of a Secret in the pipeline's namespace with the keys AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN). Only the containers that
    /// read the object mount it: the weight server for a model, the workers for data; with
    /// Node sharing the kubelet hands it to the node's agent (and it is required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

/// A quantity (an integer or a string such as 400Mi), as k8s-openapi's, with a maximum length:
/// without one the API server estimates the cost of a CEL rule on it too high to accept it.
fn bounded_quantity(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "maxLength": 64,
    })
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.uri.startsWith('s3://') || !has(self.s3)").message("s3 applies only to s3:// input and output prefixes"))]
#[x_kube(validation = Rule::new("self.uri.startsWith('az://') == has(self.azure)").message("azure (the storage account) is needed by az:// input and output prefixes and applies only to them"))]
pub struct DataLocation {
    /// A file:/// folder as mounted in the pod (a volume of spec.template), or an object
    /// storage prefix s3://<bucket>/<prefix>/ or az://<container>/<prefix>/.
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('file:///') || self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#]*)?$') || self.matches('^az://[a-z0-9](-?[a-z0-9])+(/[^?#]*)?$')").message("input and output must be file:/// folders mounted into the pod, s3://<bucket>/<prefix>/ (a bucket name of 3 to 63 lowercase letters, digits, '.' and '-') or az://<container>/<prefix>/"))]
    pub uri: String,
    /// s3 only: which service holds the bucket and which credentials read (input) or write
    /// (output) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3SourceSpec>,
    /// az only (and needed there): which storage account holds the container, and which
    /// credentials read (input) or write (output) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSourceSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSettings {
    /// How many shard pods run at once. Default: 1 (a Job's default). Changed on a running or
    /// finished pipeline, it applies in place: no shard runs again for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("task.parallelism must be at least 1"))]
    pub parallelism: Option<i32>,
    /// The number of shards (safetensors files in the input), if known: the Job's
    /// completions. Default: found by a short planning Job that lists the input (the count is
    /// then in status.plannedInput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("task.shards must be at least 1"))]
    pub shards: Option<i32>,
    /// How many times one failed shard runs again before it counts as failed; the others go
    /// on meanwhile. Default: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10").message("task.retriesPerShard must be 0 to 10"))]
    pub retries_per_shard: Option<i32>,
    /// How many shards may fail before the whole run stops (the Job's maxFailedIndexes). Not
    /// set: every shard runs, and the run fails at the end if any failed. The failed shards
    /// are listed in status.shards.failedIndexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("task.maxFailedShards must not be negative"))]
    pub max_failed_shards: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActorSettings {
    /// How many pods serve batches behind the pipeline's Service. Each runs one worker, whose
    /// libtorch uses the pod's cores; with Node sharing, replicas on one node share one copy
    /// of the weights.
    #[x_kube(validation = Rule::new("self >= 1").message("actor.replicas must be at least 1"))]
    pub replicas: i32,
    /// Dynamic batching: requests that arrive close together run as one forward pass. Off
    /// when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingSettings>,
    /// A batch run only: how many batches the driver sends one replica before its answers.
    /// Default: 2 (one running, one waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("actor.inFlightPerReplica must be 1 to 64"))]
    pub in_flight_per_replica: Option<i32>,
    /// A key of a Secret in the pipeline's namespace holding the token clients must send to
    /// the replicas as `Authorization: Bearer <token>` on the model's paths
    /// (`/v2/models/...`; health, /metrics and the server's metadata stay open to probes and
    /// Prometheus). A batch run's driver sends it. A changed Secret applies within a minute,
    /// without a restart. Not set: any pod the pipeline's NetworkPolicy admits may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<k8s_openapi::api::core::v1::SecretKeySelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSettings {
    /// The most rows of one forward pass (a larger request still runs, alone).
    #[x_kube(validation = Rule::new("self >= 1").message("actor.batching.maxRows must be at least 1"))]
    pub max_rows: i64,
    /// How long a request waits for others to join it, in milliseconds, while others are on
    /// their way (a lone request never waits). Default: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("actor.batching.maxDelayMillis must be 0 to 1000"))]
    pub max_delay_millis: Option<i64>,
}

/// The file names of a model's bearer token and CA bundle in its folder of source files, and
/// the folder of its S3 credentials there.
pub const SOURCE_TOKEN_FILE: &str = "token";
/// The file, under [`crate::invocation::Mounts::client_token`], of `actor.tokenSecret`.
pub const CLIENT_TOKEN_FILE: &str = "token";
pub const SOURCE_CA_FILE: &str = "ca.crt";
pub const SOURCE_S3_DIR: &str = "s3";
pub const SOURCE_AZURE_DIR: &str = "azure";

/// Where the models' credential files are, as the reader of [`ModelSource`]s finds them.
///
/// [`ModelSource`]: kube_zerocopy_contract::models::ModelSource
#[derive(Clone, Copy, Debug)]
pub enum CredentialFiles<'a> {
    /// The weight server's: each model's own folder under this one (see
    /// [`SOURCE_TOKEN_FILE`]), projected from its Secrets.
    PerModel(&'a std::path::Path),
    /// The node agent's: the keys of the volume's one Secret (see
    /// [`kube_zerocopy_contract::models::VOLUME_SECRET_DIR`]).
    VolumeSecret,
}

impl InferencePipelineSpec {
    /// The models as the sidecar, the workers (`KZC_MODELS`) and the node agent (the volume's
    /// `models` attribute) read them, their credentials at `credentials`.
    pub fn model_sources(
        &self,
        credentials: CredentialFiles,
    ) -> Vec<kube_zerocopy_contract::models::ModelSource> {
        use kube_zerocopy_contract::models::VOLUME_SECRET_DIR;
        self.models
            .iter()
            .map(|m| {
                let file = |name: &str| match credentials {
                    CredentialFiles::PerModel(sources) => sources
                        .join(&m.name)
                        .join(name)
                        .to_string_lossy()
                        .into_owned(),
                    CredentialFiles::VolumeSecret => VOLUME_SECRET_DIR.to_owned(),
                };
                let token_file =
                    |secret: &k8s_openapi::api::core::v1::SecretKeySelector| match credentials {
                        CredentialFiles::PerModel(_) => file(SOURCE_TOKEN_FILE),
                        CredentialFiles::VolumeSecret => {
                            format!("{VOLUME_SECRET_DIR}/{}", secret.key)
                        }
                    };
                kube_zerocopy_contract::models::ModelSource {
                    name: m.name.clone(),
                    format: m.format,
                    uri: m.source.uri.clone(),
                    sha256: m.source.sha256.clone(),
                    architecture: m.architecture.clone(),
                    python_entry_point: m.python.as_ref().map(|p| p.entry_point.clone()),
                    // An unparsable size fails the rendering before this is used.
                    max_bytes: m
                        .source
                        .size
                        .as_ref()
                        .and_then(|q| crate::quantity::to_bytes(&q.0).ok()),
                    bearer_token_file: m.source.bearer_token_secret.as_ref().map(token_file),
                    ca_file: m
                        .source
                        .ca_config_map
                        .as_ref()
                        .map(|_| file(SOURCE_CA_FILE)),
                    s3: m
                        .source
                        .s3
                        .as_ref()
                        .map(|s3| kube_zerocopy_contract::models::S3Access {
                            endpoint: s3.endpoint.clone(),
                            region: s3.region.clone(),
                            credentials_dir: s3
                                .credentials_secret
                                .as_ref()
                                .map(|_| file(SOURCE_S3_DIR)),
                        }),
                    azure: m
                        .source
                        .azure
                        .as_ref()
                        .map(|a| a.access(&file(SOURCE_AZURE_DIR))),
                }
            })
            .collect()
    }

    /// The one Secret that holds the models' credentials with Node sharing: the CSI volume's
    /// nodePublishSecretRef, which is one Secret (a CEL rule comparing the names exceeds the
    /// API server's cost budget: the operator blocks a pipeline that names several, and
    /// `render` says why).
    pub fn volume_secret(&self) -> anyhow::Result<Option<String>> {
        let mut names = self.models.iter().filter_map(|m| {
            let source = &m.source;
            source
                .bearer_token_secret
                .as_ref()
                .map(|s| s.name.clone())
                .or_else(|| source.s3.as_ref()?.credentials_secret.clone())
                .or_else(|| source.azure.as_ref()?.credentials_secret.clone())
        });
        let first = names.next();
        if let Some(other) = names.find(|n| Some(n) != first.as_ref()) {
            anyhow::bail!(
                "sharing: Node: the models' credentials (bearerTokenSecret, s3.credentialsSecret, \
                 azure.credentialsSecret) must all be keys of one Secret, the one the kubelet \
                 hands to the node's agent with the volume; they name {:?} and {other:?}",
                first.unwrap_or_default()
            );
        }
        Ok(first)
    }
}

impl AzureSourceSpec {
    /// The settings the sidecar or worker reads; the Secret's key is mounted in `dir`.
    pub fn access(&self, dir: &str) -> kube_zerocopy_contract::models::AzureAccess {
        kube_zerocopy_contract::models::AzureAccess {
            account: self.account.clone(),
            endpoint: self.endpoint.clone(),
            credentials_dir: self.credentials_secret.as_ref().map(|_| dir.to_owned()),
        }
    }
}

impl DataLocation {
    /// How the workers reach an az:// input or output; its Secret's key is mounted under
    /// `dir` (see [`SOURCE_AZURE_DIR`]).
    pub fn azure_access(
        &self,
        dir: &std::path::Path,
    ) -> Option<kube_zerocopy_contract::models::AzureAccess> {
        let dir = dir.join(SOURCE_AZURE_DIR);
        self.azure
            .as_ref()
            .map(|a| a.access(&dir.to_string_lossy()))
    }

    /// How the workers reach an s3:// input or output; its Secret's keys are mounted under
    /// `dir` (see [`SOURCE_S3_DIR`]).
    pub fn access(
        &self,
        dir: &std::path::Path,
    ) -> Option<kube_zerocopy_contract::models::S3Access> {
        if !self.uri.starts_with("s3://") {
            return None;
        }
        let s3 = self.s3.clone().unwrap_or(S3SourceSpec {
            endpoint: None,
            region: None,
            credentials_secret: None,
        });
        Some(kube_zerocopy_contract::models::S3Access {
            endpoint: s3.endpoint,
            region: s3.region,
            credentials_dir: s3
                .credentials_secret
                .map(|_| dir.join(SOURCE_S3_DIR).to_string_lossy().into_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::Value;

    /// Every property's path whose schema has no description (`kubectl explain` shows nothing
    /// there), and every defaulted one whose description does not state the default. An array's
    /// items and a map's values are described by their property.
    fn undescribed(schema: &Value, path: &str, found: &mut Vec<String>) {
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, property) in properties.into_iter().flatten() {
            let at = format!("{path}.{name}");
            let description = property.get("description").and_then(Value::as_str);
            match (description, property.get("default")) {
                (None | Some(""), _) => found.push(at.clone()),
                (Some(d), Some(default))
                    if !d.contains(&format!(
                        "Default: {}",
                        default.as_str().unwrap_or(&default.to_string())
                    )) =>
                {
                    found.push(format!("{at} (default {default} not stated)"))
                }
                _ => {}
            }
            undescribed(property, &at, found);
        }
        for nested in ["items", "additionalProperties"] {
            if let Some(inner) = schema.get(nested).filter(|s| s.is_object()) {
                undescribed(inner, &format!("{path}[]"), found);
            }
        }
    }

    #[test]
    fn every_property_of_the_crd_explains_itself() {
        let crd = serde_json::to_value(InferencePipeline::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut found = Vec::new();
        undescribed(schema, "", &mut found);
        // apiVersion, kind and metadata are described by the API server itself.
        found.retain(|p| ![".apiVersion", ".kind", ".metadata"].contains(&p.as_str()));
        assert!(found.is_empty(), "without a description: {found:#?}");
    }
}
