//! The pod template of a pipeline's workers and of its helper Jobs: the weight server, the
//! worker, their security and resources, and where they are placed.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::batch::v1::{
    PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, ExecAction, HTTPGetAction,
    NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, PodSecurityContext, PodSpec,
    PodTemplateSpec, PreferredSchedulingTerm, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube_zerocopy_runtime::process::{EXIT_PERMANENT, EXIT_SHARD_FAILED};

use super::volumes::{
    client_token_volume, data_mounts, data_volumes, sidecar_mounts, BINDINGS_VOLUME, MODELS_VOLUME,
    RUN_AS, SIDECAR_OVERHEAD, STORE_VOLUME,
};
use super::{labels, selector_labels, Settings};
use crate::crd::{
    DeviceKind, InferencePipeline, InferencePipelineSpec, Mode, PodOverrides, Sharing,
};
use crate::invocation::{self, Invocation, Mounts, ACTOR_PORT, SIDECAR_PORT};
use crate::node_store::held_label;
use crate::quantity;
use kube_zerocopy_contract::names;

/// Extended resources (GPUs, MIG slices: names with a domain) cannot be overcommitted: the API
/// server refuses a request other than the limit. The template may give either: both get it
/// (the limit when it gives both).
pub(super) fn equal_extended_resources(resources: &mut ResourceRequirements) {
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

pub(super) fn env(inv: &Invocation) -> Vec<EnvVar> {
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
pub(super) fn http_probe(path: &str, port: &str, period: i32) -> Probe {
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

pub(super) fn restricted() -> SecurityContext {
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

pub(super) fn mount(name: &str, path: &Path, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.to_string_lossy().into_owned(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

pub(super) fn memory(bytes: u64) -> BTreeMap<String, Quantity> {
    BTreeMap::from([("memory".to_string(), Quantity(quantity::mebibytes(bytes)))])
}

/// Pod sharing's weight server: a native sidecar (an init container that keeps running) that
/// publishes the pod's models into its store; its startup probe holds the workers back until
/// every model is published.
pub(super) fn weight_server(
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
        name: names::WEIGHT_SERVER_CONTAINER.into(),
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
pub(super) fn pod_template(
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
        name: names::WORKER_CONTAINER.into(),
        image: Some(image),
        command: Some(worker.command.clone()),
        // The template's first: where a name is given twice the last wins, the operator's.
        env: Some([overrides.env.clone().unwrap_or_default(), env(&worker)].concat()),
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
            labels: Some(with_template_labels(labels, &overrides)),
            annotations: overrides.annotations.clone(),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            init_containers,
            containers: vec![worker],
            volumes: Some(volumes),
            restart_policy: Some(if is_actor { "Always" } else { "Never" }.into()),
            service_account_name: overrides.service_account_name.clone(),
            automount_service_account_token: Some(false),
            affinity: affinity(spec, &overrides),
            ..placement(&overrides)
        }),
    }
}

/// Where and how every pod of a pipeline is placed, as its template says: its nodeSelector,
/// tolerations, PriorityClass and image pull Secrets, with the restricted security context.
fn placement(overrides: &PodOverrides) -> PodSpec {
    PodSpec {
        node_selector: overrides.node_selector.clone(),
        tolerations: overrides.tolerations.clone(),
        priority_class_name: overrides.priority_class_name.clone(),
        runtime_class_name: overrides.runtime_class_name.clone(),
        image_pull_secrets: overrides.image_pull_secrets.clone(),
        security_context: Some(pod_security()),
        ..Default::default()
    }
}

/// The template's affinity, with Node sharing's preference for nodes that hold the models
/// added to its preferred node terms.
fn affinity(spec: &InferencePipelineSpec, overrides: &PodOverrides) -> Option<Affinity> {
    let ours = prefer_nodes_holding(spec);
    let Some(mut theirs) = overrides.affinity.clone() else {
        return ours;
    };
    let preferred = ours
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.preferred_during_scheduling_ignored_during_execution)
        .unwrap_or_default();
    if !preferred.is_empty() {
        theirs
            .node_affinity
            .get_or_insert_with(Default::default)
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .extend(preferred);
    }
    Some(theirs)
}

/// Every pod's: not root, the runtime's seccomp profile (Pod Security `restricted`).
pub(super) fn pod_security() -> PodSecurityContext {
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
pub(super) fn runtime_image(spec: &InferencePipelineSpec, settings: &Settings) -> String {
    let overrides = spec.template.clone().unwrap_or_default();
    overrides.image.unwrap_or_else(|| match spec.device {
        DeviceKind::Cpu => settings.runtime_image.clone(),
        DeviceKind::Cuda => settings.cuda_runtime_image.clone(),
    })
}

/// A restricted container of the runtime image that runs `invocation` beside the models (the
/// planner, the driver), with its requests (cpu, memory) and memory limit; `template_env`
/// first, as in the workers.
pub(super) fn helper_container(
    name: &str,
    invocation: &Invocation,
    image: String,
    template_env: Vec<EnvVar>,
    volume_mounts: Vec<VolumeMount>,
    (cpu, requested, limit): (&str, &str, u64),
) -> Container {
    Container {
        name: name.into(),
        image: Some(image),
        command: Some(invocation.command.clone()),
        env: Some([template_env, env(invocation)].concat()),
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

/// The template's labels beside the operator's `own` (the policy refuses keys of the operator's;
/// its own win all the same).
fn with_template_labels(
    own: BTreeMap<String, String>,
    overrides: &PodOverrides,
) -> BTreeMap<String, String> {
    let mut labels = overrides.labels.clone().unwrap_or_default();
    labels.extend(own);
    labels
}

/// The pod of a helper Job (the planner, the driver): its one container, run once, placed as
/// the pipeline's pods are (their nodes: selector, tolerations, node affinity), under `account`
/// (a ServiceAccount, and whether its token is mounted). The template's pod (anti-)affinity is
/// the workers' (spreading replicas, say): a helper pod bound by it could find no node.
pub(super) fn helper_pod(
    labels: BTreeMap<String, String>,
    container: Container,
    volumes: Vec<Volume>,
    overrides: &PodOverrides,
    (account, automount): (Option<String>, bool),
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(with_template_labels(labels, overrides)),
            annotations: overrides.annotations.clone(),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            service_account_name: account,
            automount_service_account_token: Some(automount),
            affinity: overrides
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.clone())
                .map(|node_affinity| Affinity {
                    node_affinity: Some(node_affinity),
                    ..Default::default()
                }),
            ..placement(overrides)
        }),
    }
}

/// Fails the Job at once when `container` says that retrying cannot help (its exit code).
pub(super) fn fail_at_once_on_permanent(container: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![on_exit_code(container, EXIT_PERMANENT, "FailJob")],
    }
}

/// [`fail_at_once_on_permanent`], and a shard that says no retry of it can help (its exit
/// code) fails its own index at once; the others go on.
pub(super) fn fail_at_once_on_permanent_or_shard(container: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            on_exit_code(container, EXIT_PERMANENT, "FailJob"),
            on_exit_code(container, EXIT_SHARD_FAILED, "FailIndex"),
        ],
    }
}

fn on_exit_code(container: &str, code: i32, action: &str) -> PodFailurePolicyRule {
    PodFailurePolicyRule {
        action: action.into(),
        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
            container_name: Some(container.into()),
            operator: "In".into(),
            values: vec![code],
        }),
        ..Default::default()
    }
}

/// With Node sharing, a pod prefers the nodes whose agent holds its models already (the agent
/// labels its node with each model it holds): there a new replica only maps them. One term per
/// model whose sha256 the pipeline names (the store's address of a model; a model named by its
/// URI alone is known by digest only once fetched), so a node holding more of them scores more.
pub(super) fn prefer_nodes_holding(spec: &InferencePipelineSpec) -> Option<Affinity> {
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
