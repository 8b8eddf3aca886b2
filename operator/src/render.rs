//! A pipeline rendered into the objects that run it: pure functions, no IO.
//!
//! Task mode becomes an Indexed Job (one completion per shard); Actor mode a Deployment and a
//! Service. Every pod has the weight server as a native sidecar (an init container with
//! `restartPolicy: Always`) whose startup probe passes only once every model is published, so
//! the workers start only then; the workers mount the shared store read-only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, Capabilities, ConfigMapProjection, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, ExecAction, HTTPGetAction, KeyToPath, LocalObjectReference,
    NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, PodSecurityContext, PodSpec,
    PodTemplateSpec, PreferredSchedulingTerm, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretProjection, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use kube_zerocopy_contract::models::{
    models_to_json, MODELS_ATTRIBUTE, NODE_STORE_DRIVER, VIEW_BINDINGS_DIR,
};
use kube_zerocopy_runtime::process::EXIT_PERMANENT;

use crate::crd::{
    CredentialFiles, DeviceKind, InferencePipeline, InferencePipelineSpec, Mode, PlannedInput,
    PodOverrides, Sharing, CLIENT_TOKEN_FILE, SOURCE_AZURE_DIR, SOURCE_CA_FILE, SOURCE_S3_DIR,
    SOURCE_TOKEN_FILE,
};
use crate::invocation::{self, Invocation, Mounts, ACTOR_PORT, SIDECAR_PORT};
use crate::node_store::held_label;
use crate::policy::{self, PipelinePolicy};
use crate::quantity;

/// The uid and gid every container runs as (not root).
pub const RUN_AS: i64 = 65532;
/// Where a Node-sharing pod's workers see the node agent's volume of their models.
pub const NODE_MODELS_MOUNT: &str = "/kzc/models";
/// Memory the sidecar process needs beyond the weights it writes.
const SIDECAR_OVERHEAD: u64 = 128 << 20;

// Every name starts with policy::RESERVED_VOLUME_PREFIX and every path in Mounts::in_pod
// lies under policy::RESERVED_MOUNT_ROOT: a template may use neither.
pub const STORE_VOLUME: &str = "kzc-store";
pub const BINDINGS_VOLUME: &str = "kzc-bindings";
pub const DOWNLOADS_VOLUME: &str = "kzc-downloads";
/// Node sharing's one volume: the node agent's read-only view of the pod's models.
pub const MODELS_VOLUME: &str = "kzc-models";
/// A model's token and CA bundle: kzc-source-<index of the model>.
pub const SOURCE_VOLUME_PREFIX: &str = "kzc-source-";
pub const CLIENT_TOKEN_VOLUME: &str = "kzc-client-token";
/// The input's or output's S3 credentials: kzc-input-credentials, kzc-output-credentials.
const DATA_CREDENTIALS_SUFFIX: &str = "-credentials";

/// What the operator itself decides, not the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The runtime image: kube-zerocopy-sidecar and kube-zerocopy-worker with libtorch's CPU
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

/// The worker's resources must be quantities: the API server does not check them inside a
/// pipeline, and would refuse the Job with an internal error.
fn check_resources(resources: Option<&ResourceRequirements>) -> Result<()> {
    let Some(r) = resources else { return Ok(()) };
    for (kind, list) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, value) in list.iter().flatten() {
            if !quantity::is_quantity(&value.0) {
                bail!(
                    "template.resources.{kind}.{name}: {:?} is not a quantity (such as 500m, 2 or 4Gi)",
                    value.0
                );
            }
        }
    }
    Ok(())
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

/// Extended resources (GPUs, MIG slices: names with a domain) cannot be overcommitted: the API
/// server refuses a request other than the limit. The template may give either: both get it
/// (the limit when it gives both).
fn equal_extended_resources(resources: &mut ResourceRequirements) {
    let extended: std::collections::BTreeSet<String> = [&resources.limits, &resources.requests]
        .into_iter()
        .flatten()
        .flat_map(|amounts| amounts.keys())
        .filter(|name| name.contains('/'))
        .cloned()
        .collect();
    if extended.is_empty() {
        return;
    }
    let limits = resources.limits.get_or_insert_with(BTreeMap::new);
    let requests = resources.requests.get_or_insert_with(BTreeMap::new);
    for name in extended {
        let amount = limits.get(&name).or_else(|| requests.get(&name)).cloned();
        if let Some(amount) = amount {
            limits.insert(name.clone(), amount.clone());
            requests.insert(name, amount);
        }
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
        ("app.kubernetes.io/name".into(), "kube-zerocopy".into()),
        ("app.kubernetes.io/instance".into(), name.clone()),
        ("app.kubernetes.io/component".into(), component.into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "kube-zerocopy".into(),
        ),
        ("kube-zerocopy.io/pipeline".into(), name),
    ])
}

/// The labels that select a pipeline's pods (stable across spec changes).
pub fn selector_labels(pipeline: &InferencePipeline) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "kube-zerocopy.io/pipeline".into(),
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

fn env(inv: &Invocation) -> Vec<EnvVar> {
    inv.env
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            ..Default::default()
        })
        .collect()
}

/// A probe that GETs `path` on the named container port every `period` seconds.
fn http_probe(path: &str, port: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &Path, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.to_string_lossy().into_owned(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn memory(bytes: u64) -> BTreeMap<String, Quantity> {
    BTreeMap::from([("memory".to_string(), Quantity(quantity::mebibytes(bytes)))])
}

/// The pod's volumes and where the containers see them.
///
/// Pod sharing: the weight server writes the pod's own store (memory), its bindings and its
/// downloads. Node sharing: one read-only volume of the node agent's CSI driver holding
/// exactly the pod's models and their bindings; the agent fetches and publishes them into the
/// node's store, which no pod can write, before the pod's containers start.
fn volumes(pipeline: &InferencePipeline, model_bytes: Option<u64>) -> (Vec<Volume>, Mounts) {
    let in_pod = Mounts::in_pod();
    let (mut all, mounts) = match pipeline.spec.sharing {
        Sharing::Pod => {
            // Room for alignment padding and TorchScript skeletons beyond the model files.
            let store_limit =
                model_bytes.map(|b| Quantity(quantity::mebibytes(b + b / 20 + (16 << 20))));
            let small_memory = EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            };
            let mut own = vec![
                Volume {
                    name: STORE_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        size_limit: store_limit,
                    }),
                    ..Default::default()
                },
                Volume {
                    name: BINDINGS_VOLUME.into(),
                    empty_dir: Some(small_memory),
                    ..Default::default()
                },
                Volume {
                    name: DOWNLOADS_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: model_bytes.map(|b| Quantity(quantity::mebibytes(b))),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ];
            own.extend(source_volumes(&pipeline.spec).into_iter().map(|(v, _)| v));
            (own, in_pod)
        }
        Sharing::Node => {
            let models =
                models_to_json(&pipeline.spec.model_sources(CredentialFiles::VolumeSecret));
            let volume = Volume {
                name: MODELS_VOLUME.into(),
                csi: Some(CSIVolumeSource {
                    driver: NODE_STORE_DRIVER.into(),
                    read_only: Some(true),
                    volume_attributes: Some(BTreeMap::from([(
                        MODELS_ATTRIBUTE.to_owned(),
                        models,
                    )])),
                    // The kubelet reads it in the pod's namespace and hands it to the agent.
                    // Checked to be one Secret before rendering (see render_planned).
                    node_publish_secret_ref: pipeline
                        .spec
                        .volume_secret()
                        .ok()
                        .flatten()
                        .map(|name| LocalObjectReference { name }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let view = PathBuf::from(NODE_MODELS_MOUNT);
            let mounts = Mounts {
                bindings: view.join(VIEW_BINDINGS_DIR),
                store: view,
                ..in_pod
            };
            (vec![volume], mounts)
        }
    };
    all.extend(data_volumes(&pipeline.spec).into_iter().map(|(v, _)| v));
    all.extend(client_token_volume(&pipeline.spec));
    if let Some(extra) = pipeline
        .spec
        .template
        .as_ref()
        .and_then(|t| t.volumes.clone())
    {
        all.extend(extra);
    }
    (all, mounts)
}

/// The object store credentials of a model or data location, from the Secrets its `s3` and
/// `azure` settings name: S3's under [`SOURCE_S3_DIR`], Azure's under [`SOURCE_AZURE_DIR`].
fn store_credentials(
    s3: Option<&crate::crd::S3SourceSpec>,
    azure: Option<&crate::crd::AzureSourceSpec>,
) -> Vec<VolumeProjection> {
    let s3 = s3
        .and_then(|s3| s3.credentials_secret.as_deref())
        .map(s3_credentials)
        .unwrap_or_default();
    let azure = azure
        .and_then(|a| a.credentials_secret.as_deref())
        .map(azure_credentials);
    s3.into_iter().chain(azure).collect()
}

/// An Azure credentials Secret's account key under [`SOURCE_AZURE_DIR`].
fn azure_credentials(secret: &str) -> VolumeProjection {
    use kube_zerocopy_contract::models::ACCOUNT_KEY_FILE;
    VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_owned(),
            items: Some(vec![KeyToPath {
                key: ACCOUNT_KEY_FILE.to_owned(),
                path: format!("{SOURCE_AZURE_DIR}/{ACCOUNT_KEY_FILE}"),
                ..Default::default()
            }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// An S3 credentials Secret's keys under [`SOURCE_S3_DIR`]: the key id and secret required,
/// a session token only when the Secret has one.
fn s3_credentials(secret: &str) -> Vec<VolumeProjection> {
    use kube_zerocopy_contract::models::{
        ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE, SESSION_TOKEN_FILE,
    };
    let keys = |keys: &[&str], optional: bool| VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_owned(),
            items: Some(
                keys.iter()
                    .map(|key| KeyToPath {
                        key: (*key).to_owned(),
                        path: format!("{SOURCE_S3_DIR}/{key}"),
                        ..Default::default()
                    })
                    .collect(),
            ),
            optional: Some(optional),
        }),
        ..Default::default()
    };
    vec![
        keys(&[ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE], false),
        keys(&[SESSION_TOKEN_FILE], true),
    ]
}

/// Each model's bearer token and CA bundle (when it names them) as one projected volume, with
/// the name of the model whose folder under [`Mounts::sources`] it is mounted on. Only the
/// weight server mounts them; the files are readable by the pods' group only.
fn source_volumes(spec: &InferencePipelineSpec) -> Vec<(Volume, String)> {
    spec.models
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let token = m
                .source
                .bearer_token_secret
                .as_ref()
                .map(|s| secret_key(s, SOURCE_TOKEN_FILE));
            let ca = m.source.ca_config_map.as_ref().map(|c| VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: c.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: c.key.clone(),
                        path: SOURCE_CA_FILE.into(),
                        ..Default::default()
                    }]),
                    optional: Some(false),
                }),
                ..Default::default()
            });
            let stores = store_credentials(m.source.s3.as_ref(), m.source.azure.as_ref());
            let sources: Vec<_> = token.into_iter().chain(ca).chain(stores).collect();
            (!sources.is_empty()).then(|| {
                let volume = Volume {
                    name: format!("{SOURCE_VOLUME_PREFIX}{i}"),
                    projected: Some(ProjectedVolumeSource {
                        sources: Some(sources),
                        default_mode: Some(0o440),
                    }),
                    ..Default::default()
                };
                (volume, m.name.clone())
            })
        })
        .collect()
}

/// One key of a Secret, as the file `path` of a projected volume; the pod does not start
/// without it.
fn secret_key(selector: &SecretKeySelector, path: &str) -> VolumeProjection {
    VolumeProjection {
        secret: Some(SecretProjection {
            name: selector.name.clone(),
            items: Some(vec![KeyToPath {
                key: selector.key.clone(),
                path: path.to_owned(),
                ..Default::default()
            }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// `actor.tokenSecret`, when set, as a volume: the replicas mount it to check their clients'
/// token, the driver to send it. The kubelet updates it when the Secret changes.
fn client_token_volume(spec: &InferencePipelineSpec) -> Option<Volume> {
    let secret = spec.actor.as_ref()?.token_secret.as_ref()?;
    Some(Volume {
        name: CLIENT_TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![secret_key(secret, CLIENT_TOKEN_FILE)]),
            default_mode: Some(0o440),
        }),
        ..Default::default()
    })
}

/// The input's and output's credentials (when they name a Secret) as projected volumes, with
/// the field whose folder under [`Mounts::data`] each is mounted on. Only the containers that
/// read or write the data mount them (the workers, and the planner the input's).
fn data_volumes(spec: &InferencePipelineSpec) -> Vec<(Volume, &'static str)> {
    [("input", &spec.input), ("output", &spec.output)]
        .into_iter()
        .filter_map(|(field, location)| {
            let location = location.as_ref()?;
            let sources = store_credentials(location.s3.as_ref(), location.azure.as_ref());
            if sources.is_empty() {
                return None;
            }
            let volume = Volume {
                name: format!("kzc-{field}{DATA_CREDENTIALS_SUFFIX}"),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(sources),
                    default_mode: Some(0o440),
                }),
                ..Default::default()
            };
            Some((volume, field))
        })
        .collect()
}

fn data_mounts(volumes: &[(Volume, &str)], mounts: &Mounts) -> Vec<VolumeMount> {
    volumes
        .iter()
        .map(|(v, field)| mount(&v.name, &mounts.data.join(field), true))
        .collect()
}

/// The weight server's mounts: its own three, writable, then every mount of the pipeline's
/// template, read-only. A `file://` model lives on one of the template's volumes (a PVC at
/// /models), so the sidecar, which reads it, needs them as the worker does; it only reads
/// sources (and may need e.g. a CA bundle mounted for https), so its copies are forced
/// read-only whatever the template says. A `file://` source under no mount is left alone: it
/// can only be in a custom image, and the sidecar says so if it is not.
fn sidecar_mounts(spec: &InferencePipelineSpec, mounts: &Mounts) -> Vec<VolumeMount> {
    let mut all = vec![
        mount(STORE_VOLUME, &mounts.store, false),
        mount(BINDINGS_VOLUME, &mounts.bindings, false),
        mount(DOWNLOADS_VOLUME, &mounts.downloads, false),
    ];
    all.extend(
        source_volumes(spec)
            .iter()
            .map(|(v, model)| mount(&v.name, &mounts.sources.join(model), true)),
    );
    let overrides = spec.template.clone().unwrap_or_default();
    all.extend(
        overrides
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| VolumeMount {
                read_only: Some(true),
                ..m.clone()
            }),
    );
    all
}

/// Pod sharing's weight server: a native sidecar (an init container that keeps running) that
/// publishes the pod's models into its store; its startup probe holds the workers back until
/// every model is published.
fn weight_server(
    spec: &InferencePipelineSpec,
    mounts: &Mounts,
    image: &str,
    model_bytes: Option<u64>,
) -> Container {
    let sidecar_inv = invocation::sidecar(spec, mounts, &format!("0.0.0.0:{SIDECAR_PORT}"));
    let probe_inv = invocation::probe(spec, mounts);
    // tmpfs pages are charged to the container that writes them: the sidecar.
    let sidecar_resources = model_bytes.map(|b| {
        let m = memory(b + SIDECAR_OVERHEAD);
        ResourceRequirements {
            requests: Some(m.clone()),
            limits: Some(m),
            ..Default::default()
        }
    });
    Container {
        name: crate::status::SIDECAR_CONTAINER.into(),
        image: Some(image.to_owned()),
        command: Some(sidecar_inv.command.clone()),
        env: Some(env(&sidecar_inv)),
        restart_policy: Some("Always".into()),
        ports: Some(vec![ContainerPort {
            name: Some("health".into()),
            container_port: SIDECAR_PORT,
            ..Default::default()
        }]),
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(probe_inv.command.clone()),
            }),
            period_seconds: Some(2),
            // Large models take a while: up to an hour.
            failure_threshold: Some(1800),
            ..Default::default()
        }),
        liveness_probe: Some(http_probe("/livez", "health", 10)),
        resources: sidecar_resources,
        security_context: Some(restricted()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(sidecar_mounts(spec, mounts)),
        ..Default::default()
    }
}

/// The pod template shared by both modes.
fn pod_template(
    pipeline: &InferencePipeline,
    settings: &Settings,
    worker: Invocation,
    mounts: &Mounts,
    volumes: Vec<Volume>,
    model_bytes: Option<u64>,
) -> PodTemplateSpec {
    let spec = &pipeline.spec;
    let overrides = spec.template.clone().unwrap_or_default();
    let image = runtime_image(spec, settings);
    let (mut worker_mounts, init_containers) = match spec.sharing {
        Sharing::Pod => (
            vec![
                mount(STORE_VOLUME, &mounts.store, true),
                mount(BINDINGS_VOLUME, &mounts.bindings, true),
            ],
            Some(vec![weight_server(spec, mounts, &image, model_bytes)]),
        ),
        // The kubelet starts the containers once the agent has mounted the models: no
        // weight server in the pod, and the weights are the agent's memory, not the pod's.
        Sharing::Node => (vec![mount(MODELS_VOLUME, &mounts.store, true)], None),
    };
    worker_mounts.extend(data_mounts(&data_volumes(spec), mounts));
    if let Some(token) = client_token_volume(spec) {
        worker_mounts.push(mount(&token.name, &mounts.client_token, true));
    }
    worker_mounts.extend(overrides.volume_mounts.clone().unwrap_or_default());
    let mut resources = overrides.resources.clone().unwrap_or_default();
    // One GPU unless the template names NVIDIA's devices itself (several GPUs, a MIG slice).
    let names_gpus = |r: &Option<BTreeMap<String, Quantity>>| {
        r.iter()
            .flatten()
            .any(|(name, _)| name.starts_with("nvidia.com/"))
    };
    if spec.device == DeviceKind::Cuda
        && !names_gpus(&resources.limits)
        && !names_gpus(&resources.requests)
    {
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), Quantity("1".into()));
    }
    equal_extended_resources(&mut resources);
    let is_actor = spec.mode == Mode::Actor;
    let worker = Container {
        name: crate::status::WORKER_CONTAINER.into(),
        image: Some(image),
        command: Some(worker.command.clone()),
        env: Some(env(&worker)),
        ports: is_actor.then(|| {
            vec![ContainerPort {
                name: Some("http".into()),
                container_port: ACTOR_PORT,
                ..Default::default()
            }]
        }),
        readiness_probe: is_actor.then(|| http_probe("/v2/health/ready", "http", 5)),
        // Answered by the actor's HTTP runtime, never behind a batch: a replica that stops
        // answering it is stuck, and is restarted. It counts only once the models are loaded
        // (the startup probe: up to 10 minutes, for copies to a GPU).
        liveness_probe: is_actor.then(|| http_probe("/v2/health/live", "http", 10)),
        startup_probe: is_actor.then(|| Probe {
            failure_threshold: Some(300),
            ..http_probe("/v2/health/ready", "http", 2)
        }),
        resources: Some(resources),
        security_context: Some(restricted()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(worker_mounts),
        ..Default::default()
    };

    let mut labels = labels(pipeline);
    labels.extend(selector_labels(pipeline));
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            init_containers,
            containers: vec![worker],
            volumes: Some(volumes),
            restart_policy: Some(if is_actor { "Always" } else { "Never" }.into()),
            service_account_name: overrides.service_account_name.clone(),
            automount_service_account_token: Some(false),
            node_selector: overrides.node_selector.clone(),
            affinity: prefer_nodes_holding(spec),
            tolerations: overrides.tolerations.clone(),
            security_context: Some(pod_security()),
            ..Default::default()
        }),
    }
}

/// Every pod's: not root, the runtime's seccomp profile (Pod Security `restricted`).
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The image a pipeline's pods run.
fn runtime_image(spec: &InferencePipelineSpec, settings: &Settings) -> String {
    let overrides = spec.template.clone().unwrap_or_default();
    overrides.image.unwrap_or_else(|| match spec.device {
        DeviceKind::Cpu => settings.runtime_image.clone(),
        DeviceKind::Cuda => settings.cuda_runtime_image.clone(),
    })
}

/// The Job that plans a Task pipeline's input (see [`crate::plan`]): one pod, no models, the
/// template's volumes for a folder and the input's credentials for a prefix; tried 3 times,
/// at once given up when retrying cannot help (an input without shard files), and never
/// longer than 10 minutes.
pub fn plan_job(pipeline: &InferencePipeline, settings: &Settings) -> Result<Job> {
    let spec = &pipeline.spec;
    policy::check(spec, &settings.policy)?;
    let overrides = spec.template.clone().unwrap_or_default();
    let mounts = Mounts::in_pod();
    let planner = invocation::planner(spec, &mounts)?;
    let credentials: Vec<_> = data_volumes(spec)
        .into_iter()
        .filter(|(_, field)| *field == "input")
        .collect();
    let mut volume_mounts = data_mounts(&credentials, &mounts);
    volume_mounts.extend(
        overrides
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| VolumeMount {
                read_only: Some(true),
                ..m.clone()
            }),
    );
    let mut volumes: Vec<Volume> = credentials.into_iter().map(|(v, _)| v).collect();
    volumes.extend(overrides.volumes.clone().unwrap_or_default());
    let container = helper_container(
        crate::plan::PLAN_CONTAINER,
        &planner,
        runtime_image(spec, settings),
        volume_mounts,
        ("50m", "64Mi", 256 << 20),
    );
    let mut labels = labels(pipeline);
    labels.insert(
        crate::plan::STEP_LABEL.into(),
        crate::plan::PLAN_STEP.into(),
    );
    // Queued as the pipeline's Job is: where Kueue manages every Job, an unlabelled one would
    // wait in no queue of the pipeline's.
    let queued = crate::queue::queue_name(pipeline).is_some();
    let mut job_labels = labels.clone();
    job_labels.extend(crate::queue::kueue_labels(pipeline));
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(crate::plan::job_name(pipeline)),
            labels: Some(job_labels),
            ..metadata(pipeline)
        },
        spec: Some(JobSpec {
            suspend: queued.then_some(true),
            backoff_limit: Some(2),
            active_deadline_seconds: Some(600),
            pod_failure_policy: Some(fail_at_once_on_permanent(crate::plan::PLAN_CONTAINER)),
            template: helper_pod(
                labels,
                container,
                volumes,
                &overrides,
                (overrides.service_account_name.clone(), false),
            ),
            ..Default::default()
        }),
        status: None,
    })
}

/// A restricted container of the runtime image that runs `invocation` beside the models (the
/// planner, the driver), with its requests (cpu, memory) and memory limit.
fn helper_container(
    name: &str,
    invocation: &Invocation,
    image: String,
    volume_mounts: Vec<VolumeMount>,
    (cpu, requested, limit): (&str, &str, u64),
) -> Container {
    Container {
        name: name.into(),
        image: Some(image),
        command: Some(invocation.command.clone()),
        env: Some(env(invocation)),
        security_context: Some(restricted()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(volume_mounts),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity(cpu.into())),
                ("memory".into(), Quantity(requested.into())),
            ])),
            limits: Some(memory(limit)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod of a helper Job (the planner, the driver): its one container, run once, placed as
/// the pipeline's pods are, under `account` (a ServiceAccount, and whether its token is
/// mounted).
fn helper_pod(
    labels: BTreeMap<String, String>,
    container: Container,
    volumes: Vec<Volume>,
    overrides: &PodOverrides,
    (account, automount): (Option<String>, bool),
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            service_account_name: account,
            automount_service_account_token: Some(automount),
            node_selector: overrides.node_selector.clone(),
            tolerations: overrides.tolerations.clone(),
            security_context: Some(pod_security()),
            ..Default::default()
        }),
    }
}

/// The driver of an Actor's batch run ([`crate::batch_run`]): one restricted container running
/// `kube-zerocopy-worker drive` with the template's volumes (file:// data) and the data's
/// credentials, under a ServiceAccount of its own. Restarted up to 3 times (it resumes after
/// the batches its run committed); failed at once when retrying cannot help (exit code 3:
/// the input changed, batches refused).
pub fn batch_run(pipeline: &InferencePipeline, settings: &Settings) -> Result<BatchRun> {
    use crate::batch_run::{driver_name, run_name, DRIVER_CONTAINER, DRIVE_STEP, RUN_ANNOTATION};
    let spec = &pipeline.spec;
    let overrides = spec.template.clone().unwrap_or_default();
    let mounts = Mounts::in_pod();
    let name = driver_name(pipeline);
    let driver = invocation::driver(
        spec,
        &pipeline.name_any(),
        &object_name(pipeline),
        &run_name(pipeline),
        &mounts,
    )?;
    let credentials = data_volumes(spec);
    let mut volume_mounts = data_mounts(&credentials, &mounts);
    let token = client_token_volume(spec);
    if let Some(token) = &token {
        volume_mounts.push(mount(&token.name, &mounts.client_token, true));
    }
    volume_mounts.extend(overrides.volume_mounts.clone().unwrap_or_default());
    let mut volumes: Vec<Volume> = credentials.into_iter().map(|(v, _)| v).collect();
    volumes.extend(token);
    volumes.extend(overrides.volumes.clone().unwrap_or_default());
    // It holds a few batches' bytes at a time, never a model. It runs the project's own image
    // whatever the template names: it holds a token, which the pipeline's code never gets.
    let container = helper_container(
        DRIVER_CONTAINER,
        &driver,
        settings.runtime_image.clone(),
        volume_mounts,
        ("100m", "128Mi", 1 << 30),
    );
    let mut labels = labels(pipeline);
    labels.insert("app.kubernetes.io/component".into(), "driver".into());
    labels.insert(crate::plan::STEP_LABEL.into(), DRIVE_STEP.into());
    let named = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(labels.clone()),
        ..metadata(pipeline)
    };
    let job = Job {
        metadata: ObjectMeta {
            annotations: Some(BTreeMap::from([(
                RUN_ANNOTATION.to_owned(),
                run_name(pipeline),
            )])),
            ..named(&name)
        },
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            pod_failure_policy: Some(fail_at_once_on_permanent(DRIVER_CONTAINER)),
            // Never two drivers at once (both would send and write the same batches): a new
            // one starts only once the one it replaces is gone.
            pod_replacement_policy: Some("Failed".into()),
            template: helper_pod(
                labels.clone(),
                container,
                volumes,
                &overrides,
                (Some(name.clone()), true),
            ),
            ..Default::default()
        }),
        status: None,
    };
    let rule =
        |group: &str, resource: &str, verbs: &[&str], names: Option<Vec<String>>| PolicyRule {
            api_groups: Some(vec![group.into()]),
            resources: Some(vec![resource.into()]),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            resource_names: names,
            ..Default::default()
        };
    let role = Role {
        metadata: named(&name),
        rules: Some(vec![
            rule("discovery.k8s.io", "endpointslices", &["list"], None),
            rule(
                "kube-zerocopy.io",
                "inferencepipelines/status",
                &["patch"],
                Some(vec![pipeline.name_any()]),
            ),
        ]),
    };
    let binding = RoleBinding {
        metadata: named(&name),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: pipeline.metadata.namespace.clone(),
            ..Default::default()
        }]),
    };
    let account = ServiceAccount {
        metadata: named(&name),
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    Ok(BatchRun {
        job,
        account,
        role,
        binding,
    })
}

/// Fails the Job at once when `container` says that retrying cannot help (its exit code).
fn fail_at_once_on_permanent(container: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![PodFailurePolicyRule {
            action: "FailJob".into(),
            on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                container_name: Some(container.into()),
                operator: "In".into(),
                values: vec![EXIT_PERMANENT],
            }),
            ..Default::default()
        }],
    }
}

/// With Node sharing, a pod prefers the nodes whose agent holds its models already (the agent
/// labels its node with each model it holds): there a new replica only maps them. One term per
/// model whose sha256 the pipeline names (the store's address of a model; a model named by its
/// URI alone is known by digest only once fetched), so a node holding more of them scores more.
fn prefer_nodes_holding(spec: &InferencePipelineSpec) -> Option<Affinity> {
    if spec.sharing != Sharing::Node {
        return None;
    }
    let terms: Vec<PreferredSchedulingTerm> = spec
        .models
        .iter()
        .filter_map(|m| m.source.sha256.as_deref())
        .map(|digest| PreferredSchedulingTerm {
            weight: 100,
            preference: NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: held_label(digest),
                    operator: "Exists".into(),
                    values: None,
                }]),
                match_fields: None,
            },
        })
        .collect();
    (!terms.is_empty()).then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(terms),
            required_during_scheduling_ignored_during_execution: None,
        }),
        ..Default::default()
    })
}

/// Renders a pipeline. Pure: the same pipeline and settings always give the same objects. A
/// Task pipeline that does not say how many shards it has becomes the Job that plans them.
pub fn render(pipeline: &InferencePipeline, settings: &Settings) -> Result<Rendered> {
    render_planned(pipeline, settings, None)
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

/// [`render`], given what planning found when the pipeline does not say how many shards.
pub fn render_planned(
    pipeline: &InferencePipeline,
    settings: &Settings,
    plan: Option<&PlannedInput>,
) -> Result<Rendered> {
    let spec = &pipeline.spec;
    policy::check(spec, &settings.policy)?;
    check_resources(spec.template.as_ref().and_then(|t| t.resources.as_ref()))?;
    if spec.sharing == Sharing::Node {
        spec.volume_secret()?;
    }
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
        Mode::Task => {
            let task = spec.task.clone().unwrap_or_default();
            let shards = task
                .shards
                .or(plan.map(|p| p.shards))
                .context("mode Task needs spec.task.shards or a plan")?;
            let name = pipeline.metadata.name.as_deref().unwrap_or_default();
            // The host name of each pod is <name>-zerocopy-<index>: the schema checks it
            // for a declared count, this for a planned one.
            if format!("{name}-zerocopy-{}", shards - 1).len() > 63 {
                bail!(
                    "metadata.name is too long for the {shards} shards planned: each pod's host name <name>-zerocopy-<shard index> must have at most 63 characters"
                );
            }
            let mut metadata = metadata(pipeline);
            // Queued: Kueue admits the Job and then unsuspends it (see crate::queue).
            let queued = crate::queue::queue_name(pipeline).is_some();
            if let Some(labels) = metadata.labels.as_mut() {
                labels.extend(crate::queue::kueue_labels(pipeline));
            }
            if let Some(plan) = plan {
                metadata.annotations = Some(BTreeMap::from([(
                    crate::plan::INPUT_DIGEST.to_owned(),
                    plan.input_digest.clone(),
                )]));
            }
            let job = Job {
                metadata,
                spec: Some(JobSpec {
                    completion_mode: Some("Indexed".into()),
                    completions: Some(shards),
                    parallelism: Some(task.parallelism.unwrap_or(1).min(shards)),
                    // A failing shard is retried on its own; the others go on.
                    backoff_limit_per_index: Some(task.retries_per_shard.unwrap_or(2)),
                    max_failed_indexes: task.max_failed_shards,
                    // A replacement starts only once the pod it replaces is gone: never two
                    // workers of one shard at once (memory, GPUs, the same output).
                    pod_replacement_policy: Some("Failed".into()),
                    // Unless retrying cannot help (the input disagrees with the pipeline or its
                    // plan): the worker says so with its exit code, the Job fails at once.
                    pod_failure_policy: Some(fail_at_once_on_permanent(
                        crate::status::WORKER_CONTAINER,
                    )),
                    suspend: queued.then_some(true),
                    template,
                    ..Default::default()
                }),
                status: None,
            };
            Ok(Rendered::Task { job: Box::new(job) })
        }
        Mode::Actor => {
            let actor = spec.actor.clone().context("mode Actor needs spec.actor")?;
            if let Some(queue) = crate::queue::queue_name(pipeline) {
                bail!(
                    "the label {}={queue} queues a Task pipeline's Job with Kueue; an Actor \
                     pipeline's replicas are not queued: remove the label, or use spec.suspend",
                    crate::queue::QUEUE_LABEL
                );
            }
            let deployment = Deployment {
                metadata: metadata(pipeline),
                spec: Some(DeploymentSpec {
                    replicas: Some(actor.replicas),
                    selector: LabelSelector {
                        match_labels: Some(selector_labels(pipeline)),
                        ..Default::default()
                    },
                    template,
                    ..Default::default()
                }),
                status: None,
            };
            // The replicas only: a batch run's driver carries the pipeline's label too.
            let mut selector = selector_labels(pipeline);
            selector.insert("app.kubernetes.io/component".into(), "actor".into());
            let service = Service {
                metadata: metadata(pipeline),
                spec: Some(ServiceSpec {
                    selector: Some(selector.clone()),
                    ports: Some(vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(IntOrString::String("http".into())),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                status: None,
            };
            // The replicas answer anyone who reaches them: only the pods of the pipeline's
            // namespace may (its driver among them). Policies add up: another NetworkPolicy
            // admits more (an ingress gateway, a monitoring namespace).
            let network_policy = NetworkPolicy {
                metadata: metadata(pipeline),
                spec: Some(NetworkPolicySpec {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(selector),
                        ..Default::default()
                    }),
                    policy_types: Some(vec!["Ingress".into()]),
                    ingress: Some(vec![NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(LabelSelector::default()),
                            ..Default::default()
                        }]),
                        ports: None,
                    }]),
                    ..Default::default()
                }),
            };
            let run = crate::batch_run::is_batch(pipeline)
                .then(|| batch_run(pipeline, settings))
                .transpose()?;
            Ok(Rendered::Actor {
                deployment: Box::new(deployment),
                service: Box::new(service),
                network_policy: Box::new(network_policy),
                run: run.map(Box::new),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_zerocopy_contract::pod;

    fn pipeline(template: &str) -> InferencePipeline {
        serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///opt/models/m.pt'}}}}]\n  input: {{uri: 'file:///data/in'}}\n  output: {{uri: 'file:///data/out'}}\n  task: {{shards: 2}}\n{template}"
        ))
        .unwrap()
    }

    fn containers(p: &InferencePipeline) -> (Container, Container) {
        let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
            panic!("a Task pipeline renders a Job")
        };
        let pod = job.spec.unwrap().template.spec.unwrap();
        (
            pod.init_containers.unwrap()[0].clone(),
            pod.containers[0].clone(),
        )
    }

    #[test]
    fn node_sharing_pods_prefer_the_nodes_that_hold_their_models() {
        let digest = "ab".repeat(32);
        let yaml = format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Actor\n  sharing: SHARING\n  actor: {{replicas: 2}}\n  models:\n  - {{name: a, format: TorchScript, source: {{uri: 'https://m.example/a.pt', sha256: '{digest}'}}}}\n  - {{name: b, format: TorchScript, source: {{uri: 'https://m.example/b.pt'}}}}\n"
        );
        let affinity = |sharing: &str| {
            let p: InferencePipeline =
                serde_yaml::from_str(&yaml.replace("SHARING", sharing)).unwrap();
            let Rendered::Actor { deployment, .. } = render(&p, &Settings::default()).unwrap()
            else {
                panic!("an Actor pipeline renders a Deployment")
            };
            deployment.spec.unwrap().template.spec.unwrap().affinity
        };
        // One preference, for the model whose digest is known before it is fetched.
        let node = affinity("Node").unwrap().node_affinity.unwrap();
        assert!(node
            .required_during_scheduling_ignored_during_execution
            .is_none());
        let terms = node
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        let [term] = &terms[..] else {
            panic!("{terms:?}")
        };
        let [requirement] = &term.preference.match_expressions.as_ref().unwrap()[..] else {
            panic!("{term:?}")
        };
        assert_eq!(requirement.key, held_label(&digest));
        assert_eq!(requirement.operator, "Exists");
        // Each pod holds its own copy with Pod sharing: no node is better.
        assert_eq!(affinity("Pod"), None);
    }

    /// A private model with Node sharing: the kubelet hands the one Secret to the node's
    /// agent with the volume (nodePublishSecretRef), the volume's models name its keys, and no
    /// container of the pod mounts it.
    #[test]
    fn a_private_model_s_secret_goes_to_the_node_agent_with_the_volume_alone() {
        let p: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Actor\n  sharing: Node\n  actor: {replicas: 1}\n  models:\n    - {name: a, format: TorchScript, source: {uri: 'https://hub.example/a.pt', bearerTokenSecret: {name: team-models, key: hub-token}}}\n    - {name: b, format: TorchScript, source: {uri: 's3://weights/b.pt', s3: {region: eu-west-1, credentialsSecret: team-models}}}\n",
        )
        .unwrap();
        let Rendered::Actor { deployment, .. } = render(&p, &Settings::default()).unwrap() else {
            panic!("an Actor pipeline renders a Deployment")
        };
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let volumes = pod.volumes.unwrap();
        let csi = volumes
            .iter()
            .find_map(|v| v.csi.clone())
            .expect("a CSI volume");
        assert_eq!(csi.node_publish_secret_ref.unwrap().name, "team-models");
        let models = kube_zerocopy_contract::models::models_from_json(
            &csi.volume_attributes.unwrap()[MODELS_ATTRIBUTE],
        )
        .unwrap();
        use kube_zerocopy_contract::models::VOLUME_SECRET_DIR;
        assert_eq!(
            models[0].bearer_token_file.as_deref(),
            Some(format!("{VOLUME_SECRET_DIR}/hub-token").as_str())
        );
        assert_eq!(
            models[1].s3.as_ref().unwrap().credentials_dir.as_deref(),
            Some(VOLUME_SECRET_DIR)
        );
        assert!(volumes
            .iter()
            .all(|v| v.projected.is_none() && v.secret.is_none()));
    }

    fn mount_of<'a>(c: &'a Container, name: &str) -> &'a VolumeMount {
        let mounts = c.volume_mounts.as_ref().unwrap();
        mounts.iter().find(|m| m.name == name).unwrap()
    }

    #[test]
    fn the_weight_server_mounts_the_templates_volumes_read_only() {
        let p = pipeline(
            "  template:\n    volumeMounts:\n      - {name: data, mountPath: /data}\n      - {name: models, mountPath: /opt/models, subPath: v2}\n",
        );
        let (sidecar, worker) = containers(&p);
        let data = mount_of(&sidecar, "data");
        assert_eq!(
            (data.mount_path.as_str(), data.read_only),
            ("/data", Some(true))
        );
        let models = mount_of(&sidecar, "models");
        assert_eq!(
            (models.sub_path.as_deref(), models.read_only),
            (Some("v2"), Some(true))
        );
        // The worker's mounts stay as the template says: it writes its output to /data.
        assert_eq!(mount_of(&worker, "data").read_only, None);
        // The sidecar's own volumes stay writable.
        assert_eq!(mount_of(&sidecar, STORE_VOLUME).read_only, Some(false));
    }

    /// The volumes of a Task pipeline's pods.
    fn task_volumes(p: &InferencePipeline) -> Vec<Volume> {
        let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
            unreachable!()
        };
        job.spec.unwrap().template.spec.unwrap().volumes.unwrap()
    }

    fn projected_volume(volumes: &[Volume], name: &str) -> ProjectedVolumeSource {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.projected.clone())
            .unwrap()
    }

    /// The models as the weight server reads them from its environment.
    fn models_of(sidecar: Container) -> Vec<kube_zerocopy_contract::models::ModelSource> {
        let models = sidecar
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == kube_zerocopy_contract::models::MODELS_ENV)
            .and_then(|e| e.value)
            .unwrap();
        kube_zerocopy_contract::models::models_from_json(&models).unwrap()
    }

    #[test]
    fn the_client_token_reaches_the_replicas_and_the_driver_only() {
        let p: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Actor\n  actor: {replicas: 2, tokenSecret: {name: clients, key: bearer}}\n  models: [{name: m, format: TorchScript, source: {uri: 'https://a.example/m.pt'}}]\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n",
        )
        .unwrap();
        let Rendered::Actor {
            deployment, run, ..
        } = render(&p, &Settings::default()).unwrap()
        else {
            panic!("an Actor pipeline renders a Deployment")
        };
        let token_file = Some("/kzc/client-token/token".to_owned());
        // The token file as the worker reads it, in either role.
        let env_of = |c: &Container| {
            let env: Vec<(String, String)> = c
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect();
            let file = |file: Option<std::path::PathBuf>| file.map(|f| f.display().to_string());
            match c.command.as_ref().map(|c| c[1].as_str()) {
                Some("actor") => file(pod::from_env::<pod::Actor>(&env).unwrap().client_token_file),
                Some("drive") => file(
                    pod::from_env::<pod::Driver>(&env)
                        .unwrap()
                        .client_token_file,
                ),
                _ => env
                    .iter()
                    .any(|(_, v)| v.contains("client-token"))
                    .then(|| "mentioned".to_owned()),
            }
        };
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let worker = &pod.containers[0];
        assert_eq!(env_of(worker), token_file);
        let mounted = mount_of(worker, CLIENT_TOKEN_VOLUME);
        assert_eq!(
            (mounted.mount_path.as_str(), mounted.read_only),
            ("/kzc/client-token", Some(true))
        );
        let weight_server = &pod.init_containers.unwrap()[0];
        assert_eq!(env_of(weight_server), None);
        assert!(weight_server
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != CLIENT_TOKEN_VOLUME));
        let volumes = pod.volumes.unwrap();
        let projected = projected_volume(&volumes, CLIENT_TOKEN_VOLUME);
        assert_eq!(projected.default_mode, Some(0o440));
        let secret = projected.sources.unwrap()[0].secret.clone().unwrap();
        assert_eq!(secret.name, "clients");
        assert_eq!(secret.items.unwrap()[0].key, "bearer");

        let driver_pod = run.unwrap().job.spec.unwrap().template.spec.unwrap();
        let driver = &driver_pod.containers[0];
        assert_eq!(env_of(driver), token_file);
        assert_eq!(
            mount_of(driver, CLIENT_TOKEN_VOLUME).mount_path,
            "/kzc/client-token"
        );
        projected_volume(driver_pod.volumes.as_ref().unwrap(), CLIENT_TOKEN_VOLUME);

        // Without the setting, nothing of it.
        let mut open = p.clone();
        open.spec.actor.as_mut().unwrap().token_secret = None;
        let Rendered::Actor { deployment, .. } = render(&open, &Settings::default()).unwrap()
        else {
            panic!("an Actor pipeline renders a Deployment")
        };
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(env_of(&pod.containers[0]), None);
        assert!(pod
            .volumes
            .iter()
            .flatten()
            .all(|v| v.name != CLIENT_TOKEN_VOLUME));
    }

    #[test]
    fn only_the_weight_server_mounts_a_models_token_and_ca_where_its_models_list_says() {
        let p: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - {name: open, format: TorchScript, source: {uri: 'https://a.example/m.pt', size: 2Ki}}\n    - name: private\n      format: TorchScript\n      source:\n        uri: https://b.example/m.pt\n        bearerTokenSecret: {name: hub, key: token}\n        caConfigMap: {name: corp-ca, key: bundle.pem}\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
        )
        .unwrap();
        let (sidecar, worker) = containers(&p);
        let source = mount_of(&sidecar, "kzc-source-1");
        assert_eq!(
            (source.mount_path.as_str(), source.read_only),
            ("/kzc/sources/private", Some(true))
        );
        let worker_mounts = worker.volume_mounts.unwrap();
        assert!(worker_mounts
            .iter()
            .all(|m| !m.name.starts_with(SOURCE_VOLUME_PREFIX)));
        let volumes = task_volumes(&p);
        let projected = projected_volume(&volumes, "kzc-source-1");
        assert_eq!(projected.default_mode, Some(0o440));
        let sources = projected.sources.unwrap();
        let secret = sources[0].secret.clone().unwrap();
        assert_eq!(secret.name, "hub");
        assert_eq!(secret.items.unwrap()[0].key, "token");
        let ca = sources[1].config_map.clone().unwrap();
        assert_eq!(
            (ca.name.as_str(), ca.items.unwrap()[0].key.as_str()),
            ("corp-ca", "bundle.pem")
        );
        // The first model names neither: no volume of its own.
        assert!(volumes.iter().all(|v| v.name != "kzc-source-0"));
        // What the weight server reads: the files where they are mounted, the size as a cap.
        let models = models_of(sidecar);
        assert_eq!(models[0].max_bytes, Some(2048));
        assert_eq!(models[0].bearer_token_file, None);
        assert_eq!(
            models[1].bearer_token_file.as_deref(),
            Some("/kzc/sources/private/token")
        );
        assert_eq!(
            models[1].ca_file.as_deref(),
            Some("/kzc/sources/private/ca.crt")
        );
    }

    #[test]
    fn s3_credentials_are_mounted_for_the_weight_server_only_with_an_optional_session_token() {
        let p: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - name: head\n      format: Safetensors\n      architecture: Mlp\n      source:\n        uri: s3://weights/head.safetensors\n        s3: {endpoint: 'http://minio.storage:9000', region: eu-west-1, credentialsSecret: s3-reader}\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
        )
        .unwrap();
        let (sidecar, worker) = containers(&p);
        assert_eq!(
            mount_of(&sidecar, "kzc-source-0").mount_path,
            "/kzc/sources/head"
        );
        assert!(worker
            .volume_mounts
            .unwrap()
            .iter()
            .all(|m| !m.name.starts_with(SOURCE_VOLUME_PREFIX)));
        let sources = projected_volume(&task_volumes(&p), "kzc-source-0")
            .sources
            .unwrap();
        // Each projection as "secret: key->path, ... (optional)".
        let projected: Vec<String> = sources
            .into_iter()
            .map(|s| {
                let secret = s.secret.unwrap();
                let items: Vec<String> = secret
                    .items
                    .unwrap()
                    .into_iter()
                    .map(|i| format!("{}->{}", i.key, i.path))
                    .collect();
                format!(
                    "{}: {} ({:?})",
                    secret.name,
                    items.join(", "),
                    secret.optional
                )
            })
            .collect();
        assert_eq!(
            projected,
            [
                "s3-reader: AWS_ACCESS_KEY_ID->s3/AWS_ACCESS_KEY_ID, \
                 AWS_SECRET_ACCESS_KEY->s3/AWS_SECRET_ACCESS_KEY (Some(false))",
                "s3-reader: AWS_SESSION_TOKEN->s3/AWS_SESSION_TOKEN (Some(true))",
            ]
        );
        let models = models_of(sidecar);
        assert_eq!(
            models[0].s3,
            Some(kube_zerocopy_contract::models::S3Access {
                endpoint: Some("http://minio.storage:9000".into()),
                region: Some("eu-west-1".into()),
                credentials_dir: Some("/kzc/sources/head/s3".into()),
            })
        );
    }

    /// An Azure model's account key goes to the weight server only, the data's to the workers
    /// only, each under its own folder and named in the settings the process reads.
    #[test]
    fn azure_keys_are_mounted_where_they_are_read() {
        let p: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - name: head\n      format: Safetensors\n      architecture: Mlp\n      source:\n        uri: az://weights/head.safetensors\n        azure: {account: models, credentialsSecret: az-models}\n  input: {uri: 'az://batch/in/', azure: {account: data, endpoint: 'http://azurite:10000/data', credentialsSecret: az-data}}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
        )
        .unwrap();
        let (sidecar, worker) = containers(&p);
        let names = |c: &Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .filter(|m| {
                    m.name.starts_with(SOURCE_VOLUME_PREFIX) || m.name.ends_with("-credentials")
                })
                .map(|m| format!("{}@{}", m.name, m.mount_path))
                .collect()
        };
        assert_eq!(names(&sidecar), ["kzc-source-0@/kzc/sources/head"]);
        assert_eq!(names(&worker), ["kzc-input-credentials@/kzc/data/input"]);
        let key = |volume: &str| {
            let secret = projected_volume(&task_volumes(&p), volume).sources.unwrap()[0]
                .secret
                .clone()
                .unwrap();
            let item = &secret.items.unwrap()[0];
            format!("{}: {}->{}", secret.name, item.key, item.path)
        };
        assert_eq!(
            key("kzc-source-0"),
            "az-models: AZURE_STORAGE_ACCOUNT_KEY->azure/AZURE_STORAGE_ACCOUNT_KEY"
        );
        assert_eq!(
            key("kzc-input-credentials"),
            "az-data: AZURE_STORAGE_ACCOUNT_KEY->azure/AZURE_STORAGE_ACCOUNT_KEY"
        );
        assert_eq!(
            models_of(sidecar)[0].azure,
            Some(kube_zerocopy_contract::models::AzureAccess {
                account: "models".into(),
                endpoint: None,
                credentials_dir: Some("/kzc/sources/head/azure".into()),
            })
        );
        let env: Vec<(String, String)> = worker
            .env
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        let task: kube_zerocopy_contract::pod::Task =
            kube_zerocopy_contract::pod::from_env(&env).unwrap();
        assert_eq!(
            task.input.input_azure,
            Some(kube_zerocopy_contract::models::AzureAccess {
                account: "data".into(),
                endpoint: Some("http://azurite:10000/data".into()),
                credentials_dir: Some("/kzc/data/input/azure".into()),
            })
        );
    }

    #[test]
    fn a_file_model_under_no_mount_still_renders() {
        // Only readable if a custom image has it; not an error for the operator.
        let (sidecar, _) = containers(&pipeline(""));
        let names: Vec<_> = sidecar
            .volume_mounts
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, [STORE_VOLUME, BINDINGS_VOLUME, DOWNLOADS_VOLUME]);
    }

    #[test]
    fn model_sizes_that_add_up_past_the_bound_are_refused_not_wrapped() {
        let two = |size: &str| {
            let mut p = pipeline("");
            let model = |name: &str| {
                serde_json::json!({"name": name, "format": "Safetensors",
                    "source": {"uri": format!("file:///{name}"), "size": size}})
            };
            p.spec.models =
                serde_json::from_value(serde_json::json!([model("a"), model("b")])).unwrap();
            p
        };
        for (size, last) in [("8Ei", "a"), ("600Pi", "b")] {
            let err = total_model_bytes(&two(size)).unwrap_err();
            let expected = format!("add up to more than 1Ei (model {last:?})");
            assert!(format!("{err:#}").contains(&expected), "{err:#}");
        }
        assert_eq!(total_model_bytes(&two("1Gi")).unwrap(), Some(2 << 30));
    }

    #[test]
    fn cuda_pipelines_run_the_cuda_runtime_image_unless_the_template_names_one() {
        let settings = Settings::default();
        let images = |p: &InferencePipeline| {
            let (sidecar, worker) = containers(p);
            (sidecar.image.unwrap(), worker.image.unwrap())
        };
        // The defaults themselves: the chart's two images, not one for both.
        assert!(settings.runtime_image.starts_with("kube-zerocopy/runtime:"));
        assert!(settings
            .cuda_runtime_image
            .starts_with("kube-zerocopy/runtime-cuda:"));
        let cpu = images(&pipeline(""));
        assert_eq!(
            cpu,
            (settings.runtime_image.clone(), settings.runtime_image)
        );
        let cuda = images(&pipeline("  device: cuda\n"));
        assert_eq!(
            cuda,
            (
                settings.cuda_runtime_image.clone(),
                settings.cuda_runtime_image
            )
        );
        let custom = images(&pipeline(
            "  device: cuda\n  template: {image: 'registry.example/own:1'}\n",
        ));
        assert_eq!(custom.1, "registry.example/own:1");
    }

    /// GPUs are requested as much as limited (the API server refuses anything else): one by
    /// default, the template's count, or a MIG slice instead of a whole GPU.
    #[test]
    fn gpus_are_requested_as_much_as_they_are_limited() {
        let gpus = |template: &str| {
            let (_, worker) = containers(&pipeline(&format!("  device: cuda\n{template}")));
            let r = worker.resources.unwrap();
            let amounts = |m: Option<BTreeMap<String, Quantity>>| -> Vec<(String, String)> {
                m.unwrap_or_default()
                    .into_iter()
                    .filter(|(n, _)| n.contains('/'))
                    .map(|(n, q)| (n, q.0))
                    .collect()
            };
            let (requests, limits) = (amounts(r.requests), amounts(r.limits));
            assert_eq!(requests, limits, "{template}");
            limits
        };
        let one = |name: &str, count: &str| vec![(name.to_owned(), count.to_owned())];
        assert_eq!(gpus(""), one("nvidia.com/gpu", "1"));
        assert_eq!(
            gpus("  template: {resources: {limits: {nvidia.com/gpu: 2}}}\n"),
            one("nvidia.com/gpu", "2")
        );
        assert_eq!(
            gpus("  template: {resources: {requests: {nvidia.com/gpu: 4}}}\n"),
            one("nvidia.com/gpu", "4")
        );
        assert_eq!(
            gpus("  template: {resources: {limits: {nvidia.com/mig-1g.10gb: 1}}}\n"),
            one("nvidia.com/mig-1g.10gb", "1")
        );
    }

    /// A queued Task pipeline's Job carries the queue label and starts suspended, for Kueue to
    /// admit; an unqueued one runs at once; an Actor pipeline is not queued.
    #[test]
    fn a_queued_job_starts_suspended_with_the_queue_label() {
        let job = |p: &InferencePipeline| {
            let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
                panic!("a Task pipeline renders a Job")
            };
            job
        };
        let plain = job(&pipeline(""));
        assert_eq!(plain.spec.unwrap().suspend, None);
        let mut queued = pipeline("");
        queued.metadata.labels = Some(BTreeMap::from([(
            crate::queue::QUEUE_LABEL.to_owned(),
            "team-a".to_owned(),
        )]));
        let queued_job = job(&queued);
        assert_eq!(
            queued_job.labels().get(crate::queue::QUEUE_LABEL),
            Some(&"team-a".to_owned())
        );
        assert_eq!(queued_job.spec.unwrap().suspend, Some(true));
        let mut actor: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: a}\nspec:\n  mode: Actor\n  models: [{name: m, format: TorchScript, source: {uri: 'file:///opt/models/m.pt'}}]\n  actor: {replicas: 1}\n",
        )
        .unwrap();
        actor.metadata.labels = queued.metadata.labels.clone();
        let refused = render(&actor, &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("an Actor pipeline's replicas are not queued"),
            "{refused}"
        );
    }
}
