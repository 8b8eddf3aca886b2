//! What a pipeline's `template` may add to its pods.
//!
//! Creating an InferencePipeline runs pods in its namespace with the runtime image; the
//! template decides what else those pods reach. The operator's own volumes (the weight store,
//! the bindings, the downloads, the sources' credentials) are never the template's to mount,
//! so no worker can write the weights or read another model's token. What reaches beyond the
//! pod (hostPath volumes, another ServiceAccount or its token, tolerations of taints) is off
//! unless the operator's policy (chart values `pipelinePolicy`) allows it. Volumes are an
//! allow-list: the types that stay within the namespace (claims, ConfigMaps, Secrets,
//! emptyDir, downwardAPI, projections of those, ephemeral claims, CSI); a network file system
//! or block device named inline (nfs, iscsi, rbd, flexVolume, ...) is refused in any namespace,
//! since a Pod Security level other than `restricted` would let it through.

use k8s_openapi::api::core::v1::Affinity;

use kube_zerocopy_contract::names;

use crate::crd::InferencePipelineSpec;

/// The prefix of every volume the operator adds to a pipeline's pods.
pub const RESERVED_VOLUME_PREFIX: &str = "kzc-";
/// Where the operator mounts its volumes in the containers.
pub const RESERVED_MOUNT_ROOT: &str = "/kzc";
/// The prefix of the variables that tell the worker what to run.
pub use kube_zerocopy_contract::pod::ENV_PREFIX as RESERVED_ENV_PREFIX;
/// The domain of the operator's labels and annotations.
pub const RESERVED_DOMAIN: &str = "kube-zerocopy.io";
/// Variables a binary reads that do not start with [`RESERVED_ENV_PREFIX`]: the shard a Task's
/// worker runs, which the Job controller sets only where the container does not.
const RESERVED_ENV_NAMES: [&str; 1] = ["JOB_COMPLETION_INDEX"];
/// Pod annotations that would loosen what the pods may do or reach: their AppArmor or seccomp
/// profile (Pod Security `restricted` checks them where a namespace enforces it; the operator
/// does not rely on that), and another network attached by a CNI meta-plugin.
const FORBIDDEN_ANNOTATION_PREFIXES: [&str; 4] = [
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
    "k8s.v1.cni.cncf.io/",
];

/// The well-known labels the operator sets on every object and pod of a pipeline.
const OPERATORS_LABELS: [&str; 4] = [
    names::NAME_LABEL,
    names::INSTANCE_LABEL,
    names::COMPONENT_LABEL,
    names::MANAGED_BY_LABEL,
];
/// Pod labels that other controllers set and select pods by: the Job controller's, the
/// Deployment controller's and Kueue's; a key ending in '/' stands for its whole prefix.
const CONTROLLERS_LABELS: [&str; 5] = [
    "batch.kubernetes.io/",
    "controller-uid",
    "job-name",
    "pod-template-hash",
    "kueue.x-k8s.io/",
];

/// What the operator lets pipelines add; the default allows no hostPath, no ServiceAccount and
/// only GPU nodes' taint among tolerations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelinePolicy {
    /// template.volumes may hold hostPath volumes (the node's files, read and written as the
    /// pods' user).
    pub allow_host_path: bool,
    /// template.serviceAccountName may name a ServiceAccount, and a projected volume may hold
    /// the pod's ServiceAccount token.
    pub allow_service_account: bool,
    /// The taint keys template.tolerations may tolerate (`*`: any, including a toleration
    /// without a key, which tolerates every taint: control-plane nodes').
    pub toleration_keys: Vec<String>,
    /// The node agent runs on the cluster's nodes: `sharing: Node` can be mounted.
    pub node_sharing: bool,
    /// The PriorityClasses template.priorityClassName may name (`*`: any): a higher priority
    /// preempts other tenants' pods.
    pub priority_classes: Vec<String>,
    /// The RuntimeClasses template.runtimeClassName may name (`*`: any): a runtime class
    /// changes how the pods are isolated (a sandbox, a GPU runtime).
    pub runtime_classes: Vec<String>,
}

impl Default for PipelinePolicy {
    fn default() -> Self {
        PipelinePolicy {
            allow_host_path: false,
            allow_service_account: false,
            toleration_keys: DEFAULT_TOLERATION_KEYS.map(String::from).to_vec(),
            node_sharing: true,
            priority_classes: vec![],
            runtime_classes: vec![],
        }
    }
}

/// Refuses a class name the policy does not list (`*` in the list: any).
fn listed_class(
    field: &str,
    value: &str,
    allowed: &[String],
    chart_value: &str,
) -> Result<(), Refusal> {
    if allowed.iter().any(|c| c == "*" || c == value) {
        return Ok(());
    }
    Err(Refusal::Forbidden(format!(
        "template.{field} {value:?} is not among the classes this operator's policy allows \
         (chart value pipelinePolicy.{chart_value}: {})",
        if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        }
    )))
}

/// Volume types a template may use: each stays within the pod's namespace.
const VOLUME_TYPES: [&str; 9] = [
    "persistentVolumeClaim",
    "configMap",
    "secret",
    "emptyDir",
    "downwardAPI",
    "projected",
    "ephemeral",
    "csi",
    "hostPath",
];

/// The node labels of control-plane nodes: a nodeSelector on them is refused (where those
/// nodes carry no taint, it alone would place the pipeline's pods there).
const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

pub use kube_zerocopy_contract::settings::DEFAULT_TOLERATION_KEYS;

/// Why a pipeline's template is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The template uses a name or path of the operator's own volumes: a mistake to fix.
    #[error("{0}")]
    Reserved(String),
    /// The operator's policy forbids what the template adds.
    #[error("{0}")]
    Forbidden(String),
}

/// Checks a pipeline's template against the reserved names and `policy`.
pub fn check(spec: &InferencePipelineSpec, policy: &PipelinePolicy) -> Result<(), Refusal> {
    if spec.sharing == crate::crd::Sharing::Node && !policy.node_sharing {
        return Err(Refusal::Forbidden(
            "sharing: Node needs the node agent, which this installation does not run (the \
             chart's nodeStore.enabled is false): install the chart with \
             nodeStore.enabled=true, or use sharing: Pod"
                .into(),
        ));
    }
    let Some(template) = &spec.template else {
        return Ok(());
    };
    for (i, volume) in template.volumes.iter().flatten().enumerate() {
        if volume.name.starts_with(RESERVED_VOLUME_PREFIX) {
            return Err(Refusal::Reserved(format!(
                "template.volumes[{i}]: the name {:?} is reserved for the operator's own \
                 volumes (names starting with {RESERVED_VOLUME_PREFIX}); rename it",
                volume.name
            )));
        }
        let value = serde_json::to_value(volume).unwrap_or_default();
        let kind = value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .find(|k| *k != "name");
        if let Some(kind) = kind.filter(|k| !VOLUME_TYPES.contains(k)) {
            return Err(Refusal::Forbidden(format!(
                "template.volumes[{i}] ({:?}) is a volume of type {kind}; a pipeline's template may use \
                 {} volumes: reach other storage through a PersistentVolumeClaim",
                volume.name,
                VOLUME_TYPES[..8].join(", ")
            )));
        }
        let token = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .any(|s| s.service_account_token.is_some());
        if token && !policy.allow_service_account {
            return Err(Refusal::Forbidden(format!(
                "template.volumes[{i}] ({:?}) projects the pod's ServiceAccount token, which \
                 this operator's policy forbids (chart value pipelinePolicy.allowServiceAccount)",
                volume.name
            )));
        }
        if volume.host_path.is_some() && !policy.allow_host_path {
            return Err(Refusal::Forbidden(format!(
                "template.volumes[{i}] ({:?}) is a hostPath volume, which this operator's \
                 policy forbids (chart value pipelinePolicy.allowHostPath): use a \
                 PersistentVolumeClaim",
                volume.name
            )));
        }
    }
    for (i, mount) in template.volume_mounts.iter().flatten().enumerate() {
        if mount.name.starts_with(RESERVED_VOLUME_PREFIX) {
            return Err(Refusal::Reserved(format!(
                "template.volumeMounts[{i}] mounts the operator's volume {:?}: the weight store \
                 and the models' credentials are mounted by the operator only",
                mount.name
            )));
        }
        let path = mount.mount_path.trim_end_matches('/');
        if path == RESERVED_MOUNT_ROOT || path.starts_with(&format!("{RESERVED_MOUNT_ROOT}/")) {
            return Err(Refusal::Reserved(format!(
                "template.volumeMounts[{i}]: the path {:?} is where the operator mounts its own \
                 volumes ({RESERVED_MOUNT_ROOT}); mount it elsewhere",
                mount.mount_path
            )));
        }
    }
    let any_key = policy.toleration_keys.iter().any(|k| k == "*");
    for (i, toleration) in template.tolerations.iter().flatten().enumerate() {
        let key = toleration.key.as_deref().unwrap_or_default();
        if !any_key && !policy.toleration_keys.iter().any(|k| k == key) {
            let what = if key.is_empty() {
                "tolerates every taint (it has no key), control-plane nodes' too".to_owned()
            } else {
                format!("tolerates the taint {key:?}")
            };
            return Err(Refusal::Forbidden(format!(
                "template.tolerations[{i}] {what}, which this operator's policy does not allow \
                 (chart value pipelinePolicy.tolerationKeys: {})",
                policy.toleration_keys.join(", ")
            )));
        }
    }
    for label in CONTROL_PLANE_LABELS {
        if template
            .node_selector
            .as_ref()
            .is_some_and(|s| s.contains_key(label))
        {
            return Err(Refusal::Forbidden(format!(
                "template.nodeSelector selects control-plane nodes ({label}): a pipeline's pods \
                 run on worker nodes"
            )));
        }
    }
    for (i, variable) in template.env.iter().flatten().enumerate() {
        if variable.name.starts_with(RESERVED_ENV_PREFIX)
            || RESERVED_ENV_NAMES.contains(&variable.name.as_str())
        {
            return Err(Refusal::Reserved(format!(
                "template.env[{i}]: {:?} is the operator's (names starting with \
                 {RESERVED_ENV_PREFIX}, and {}, tell the worker what to run); use another name",
                variable.name,
                RESERVED_ENV_NAMES.join(", ")
            )));
        }
    }
    for key in template.annotations.iter().flatten().map(|(k, _)| k) {
        if let Some(prefix) = FORBIDDEN_ANNOTATION_PREFIXES
            .iter()
            .find(|p| key.starts_with(**p))
        {
            return Err(Refusal::Forbidden(format!(
                "template.annotations: {key:?} ({prefix}…) would change the pods' security \
                 profile or attach them to another network; the operator sets what its pods run \
                 with"
            )));
        }
        if in_reserved_domain(key) {
            return Err(Refusal::Reserved(format!(
                "template.annotations: {key:?} is under {RESERVED_DOMAIN}/, the operator's own \
                 annotations; use another key"
            )));
        }
    }
    for key in template.labels.iter().flatten().map(|(k, _)| k) {
        if in_reserved_domain(key) || OPERATORS_LABELS.contains(&key.as_str()) {
            return Err(Refusal::Reserved(format!(
                "template.labels: {key:?} is one of the operator's own labels (under \
                 {RESERVED_DOMAIN}/, and {}; its Services and NetworkPolicies select pods by \
                 them); use another key",
                OPERATORS_LABELS.join(", ")
            )));
        }
        let theirs = |label: &&&str| match label.strip_suffix('/') {
            Some(_) => key.starts_with(**label),
            None => key == **label,
        };
        if let Some(theirs) = CONTROLLERS_LABELS.iter().find(theirs) {
            return Err(Refusal::Reserved(format!(
                "template.labels: {key:?} ({theirs}…) is set by the Job or Deployment \
                 controller or by Kueue, which find their pods by it; use another key"
            )));
        }
    }
    if let Some(class) = &template.priority_class_name {
        listed_class(
            "priorityClassName",
            class,
            &policy.priority_classes,
            "priorityClasses",
        )?;
    }
    if let Some(class) = &template.runtime_class_name {
        listed_class(
            "runtimeClassName",
            class,
            &policy.runtime_classes,
            "runtimeClasses",
        )?;
    }
    if let Some(affinity) = &template.affinity {
        check_affinity(affinity)?;
    }
    if let Some(account) = &template.service_account_name {
        if !policy.allow_service_account {
            return Err(Refusal::Forbidden(format!(
                "template.serviceAccountName ({account:?}) is forbidden by this operator's \
                 policy (chart value pipelinePolicy.allowServiceAccount)"
            )));
        }
    }
    Ok(())
}

/// Whether a label or annotation key's prefix is the operator's domain or one of its
/// subdomains (models.kube-zerocopy.io/).
fn in_reserved_domain(key: &str) -> bool {
    key.split_once('/').is_some_and(|(domain, _)| {
        domain == RESERVED_DOMAIN || domain.ends_with(&format!(".{RESERVED_DOMAIN}"))
    })
}

/// A template's affinity stays within its namespace and off control-plane nodes: no node term
/// on a control-plane label (as for the nodeSelector), and no pod term that names other
/// namespaces (an anti-affinity to every namespace's pods would keep other tenants' pods off
/// the nodes or zones the pipeline's pods hold).
fn check_affinity(affinity: &Affinity) -> Result<(), Refusal> {
    let node = affinity.node_affinity.as_ref();
    let required = node
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    let preferred = node
        .and_then(|n| {
            n.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flatten()
        .map(|p| p.preference.clone());
    for term in required.into_iter().chain(preferred) {
        let keys = term
            .match_expressions
            .iter()
            .chain(term.match_fields.iter())
            .flatten()
            .map(|e| e.key.as_str());
        if let Some(key) = keys.into_iter().find(|k| CONTROL_PLANE_LABELS.contains(k)) {
            return Err(Refusal::Forbidden(format!(
                "template.affinity.nodeAffinity names control-plane nodes ({key}): a \
                 pipeline's pods run on worker nodes"
            )));
        }
    }
    let pod_terms = [
        affinity.pod_affinity.as_ref().map(|a| {
            (
                a.required_during_scheduling_ignored_during_execution
                    .clone(),
                a.preferred_during_scheduling_ignored_during_execution
                    .clone(),
            )
        }),
        affinity.pod_anti_affinity.as_ref().map(|a| {
            (
                a.required_during_scheduling_ignored_during_execution
                    .clone(),
                a.preferred_during_scheduling_ignored_during_execution
                    .clone(),
            )
        }),
    ];
    for (required, preferred) in pod_terms.into_iter().flatten() {
        let terms = required
            .into_iter()
            .flatten()
            .chain(preferred.into_iter().flatten().map(|w| w.pod_affinity_term));
        for term in terms {
            if term.namespaces.is_some() || term.namespace_selector.is_some() {
                return Err(Refusal::Forbidden(
                    "template.affinity: a pod (anti-)affinity term names other namespaces \
                     (namespaces or namespaceSelector); a pipeline's pods may place themselves \
                     only against the pods of their own namespace"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InferencePipeline;

    fn spec(template: &str) -> InferencePipelineSpec {
        let p: InferencePipeline = serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Actor\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///models/m.pt'}}}}]\n  actor: {{replicas: 1}}\n  template:\n{template}"
        ))
        .unwrap();
        p.spec
    }

    fn refused(template: &str, policy: &PipelinePolicy) -> Refusal {
        check(&spec(template), policy).expect_err(template)
    }

    /// Without the node agent (the chart's default), a Node-sharing pipeline is refused in words
    /// that say how to get one; Pod sharing runs.
    #[test]
    fn node_sharing_needs_the_node_agent() {
        let without = PipelinePolicy {
            node_sharing: false,
            ..Default::default()
        };
        let mut node = spec("    volumes: []\n");
        node.sharing = crate::crd::Sharing::Node;
        let Err(Refusal::Forbidden(why)) = check(&node, &without) else {
            panic!("Node sharing without the agent")
        };
        assert!(why.contains("nodeStore.enabled=true"), "{why}");
        assert_eq!(check(&node, &PipelinePolicy::default()), Ok(()));
        node.sharing = crate::crd::Sharing::Pod;
        assert_eq!(check(&node, &without), Ok(()));
    }

    #[test]
    fn a_claim_mounted_where_the_template_likes_passes() {
        let ok = spec(
            "    volumes: [{name: models, persistentVolumeClaim: {claimName: models}}]\n    volumeMounts: [{name: models, mountPath: /models}]\n",
        );
        assert_eq!(check(&ok, &PipelinePolicy::default()), Ok(()));
    }

    #[test]
    fn the_operators_volumes_and_their_paths_are_never_the_templates() {
        let all = PipelinePolicy {
            allow_host_path: true,
            allow_service_account: true,
            toleration_keys: vec!["*".into()],
            node_sharing: true,
            priority_classes: vec!["*".into()],
            runtime_classes: vec!["*".into()],
        };
        for (template, words) in [
            (
                "    env: [{name: KZC_MODELS, value: x}]\n",
                "\"KZC_MODELS\" is the operator's",
            ),
            (
                "    env: [{name: JOB_COMPLETION_INDEX, value: '0'}]\n",
                "\"JOB_COMPLETION_INDEX\" is the operator's",
            ),
            (
                "    annotations: {kube-zerocopy.io/rerun: x}\n",
                "under kube-zerocopy.io/",
            ),
            (
                "    annotations: {models.kube-zerocopy.io/x: y}\n",
                "under kube-zerocopy.io/",
            ),
            (
                "    labels: {kube-zerocopy.io/pipeline: another}\n",
                "the operator's own labels",
            ),
            (
                "    labels: {app.kubernetes.io/instance: another}\n",
                "the operator's own labels",
            ),
            (
                "    labels: {job-name: another-job}\n",
                "set by the Job or Deployment controller or by Kueue",
            ),
            (
                "    labels: {kueue.x-k8s.io/queue-name: team}\n",
                "set by the Job or Deployment controller or by Kueue",
            ),
        ] {
            let Refusal::Reserved(message) = refused(template, &all) else {
                panic!("{template}: a reserved name is a mistake, not a policy matter")
            };
            assert!(message.contains(words), "{message}");
        }
        let Refusal::Reserved(message) =
            refused("    volumes: [{name: kzc-store, emptyDir: {}}]\n", &all)
        else {
            panic!("a reserved name is a mistake, not a policy matter")
        };
        assert!(message.contains("\"kzc-store\" is reserved"), "{message}");
        // Mounting the store again, writable, would let the worker write the weights.
        let message = refused(
            "    volumeMounts: [{name: kzc-store, mountPath: /weights, readOnly: false}]\n",
            &all,
        )
        .to_string();
        assert!(
            message.contains("mounts the operator's volume \"kzc-store\""),
            "{message}"
        );
        let message = refused(
            "    volumes: [{name: data, emptyDir: {}}]\n    volumeMounts: [{name: data, mountPath: /kzc/sources/}]\n",
            &all,
        )
        .to_string();
        assert!(
            message.contains("\"/kzc/sources/\" is where the operator mounts"),
            "{message}"
        );
        // A path that only starts with the same letters is the template's.
        let near = spec(
            "    volumes: [{name: data, emptyDir: {}}]\n    volumeMounts: [{name: data, mountPath: /kzcdata}]\n",
        );
        assert_eq!(check(&near, &all), Ok(()));
    }

    #[test]
    fn volumes_beyond_the_namespace_tokens_and_control_plane_placement_are_refused() {
        let default = PipelinePolicy::default();
        for (template, words) in [
            (
                "    volumes: [{name: share, nfs: {server: 10.0.0.1, path: /export}}]\n",
                "is a volume of type nfs",
            ),
            (
                "    volumes: [{name: disk, iscsi: {targetPortal: 10.0.0.1, iqn: x, lun: 0}}]\n",
                "is a volume of type iscsi",
            ),
            (
                "    volumes: [{name: t, projected: {sources: [{serviceAccountToken: {path: token}}]}}]\n",
                "projects the pod's ServiceAccount token",
            ),
            (
                "    tolerations: [{operator: Exists}]\n",
                "tolerates every taint",
            ),
            (
                "    tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]\n",
                "tolerates the taint \"node-role.kubernetes.io/control-plane\"",
            ),
            (
                "    nodeSelector: {node-role.kubernetes.io/control-plane: ''}\n",
                "selects control-plane nodes",
            ),
        ] {
            let Refusal::Forbidden(message) = refused(template, &default) else {
                panic!("{template}: a policy matter")
            };
            assert!(message.contains(words), "{template}: {message}");
        }
        // What stays in the namespace, and a GPU node's taint, pass.
        let fine = spec(
            "    volumes: [{name: c, configMap: {name: c}}, {name: s, secret: {secretName: s}}, {name: p, projected: {sources: [{configMap: {name: c}}]}}, {name: e, emptyDir: {medium: Memory}}]\n    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n    nodeSelector: {nvidia.com/gpu.present: 'true'}\n",
        );
        assert_eq!(check(&fine, &default), Ok(()));
        let any = PipelinePolicy {
            toleration_keys: vec!["*".into()],
            ..Default::default()
        };
        assert_eq!(
            check(&spec("    tolerations: [{operator: Exists}]\n"), &any),
            Ok(())
        );
    }

    #[test]
    fn host_paths_and_service_accounts_wait_for_the_policy_to_allow_them() {
        let host = "    volumes: [{name: data, hostPath: {path: /var/lib}}]\n";
        let Refusal::Forbidden(message) = refused(host, &PipelinePolicy::default()) else {
            panic!("hostPath is a policy matter")
        };
        assert!(
            message.contains("pipelinePolicy.allowHostPath"),
            "{message}"
        );
        let allowed = PipelinePolicy {
            allow_host_path: true,
            ..Default::default()
        };
        assert_eq!(check(&spec(host), &allowed), Ok(()));

        let account = "    serviceAccountName: reader\n";
        let message = refused(account, &allowed).to_string();
        assert!(
            message.contains("pipelinePolicy.allowServiceAccount"),
            "{message}"
        );
        let allowed = PipelinePolicy {
            allow_service_account: true,
            ..Default::default()
        };
        assert_eq!(check(&spec(account), &allowed), Ok(()));
    }

    /// A PriorityClass is the operator's policy to allow: a higher one preempts other tenants'
    /// pods. None by default, the listed ones, or any with `*`.
    #[test]
    fn a_priority_class_only_where_the_policy_lists_it() {
        let template = "    priorityClassName: batch-high\n";
        let Refusal::Forbidden(message) = refused(template, &PipelinePolicy::default()) else {
            panic!("a PriorityClass is a policy matter")
        };
        assert!(
            message.contains("priorityClassName \"batch-high\" is not among the classes")
                && message.contains("pipelinePolicy.priorityClasses: none"),
            "{message}"
        );
        for classes in [vec!["batch-high".to_owned()], vec!["*".to_owned()]] {
            let policy = PipelinePolicy {
                priority_classes: classes,
                ..PipelinePolicy::default()
            };
            assert_eq!(check(&spec(template), &policy), Ok(()));
        }
        let ordinary = "    env: [{name: OMP_NUM_THREADS, value: '4'}]\n    annotations: {sidecar.istio.io/inject: 'false', notkube-zerocopy.io/x: y}\n    labels: {team: search, app.kubernetes.io/part-of: ranking, job-name-alias: etl}\n";
        assert_eq!(check(&spec(ordinary), &PipelinePolicy::default()), Ok(()));
    }

    /// A runtime class changes how the pods are isolated: only one the policy lists.
    #[test]
    fn a_runtime_class_only_where_the_policy_lists_it() {
        let template = "    runtimeClassName: runc-unconfined\n";
        let Refusal::Forbidden(message) = refused(template, &PipelinePolicy::default()) else {
            panic!("a RuntimeClass is a policy matter")
        };
        assert!(
            message.contains("runtimeClassName \"runc-unconfined\" is not among the classes")
                && message.contains("pipelinePolicy.runtimeClasses: none"),
            "{message}"
        );
        let gvisor = PipelinePolicy {
            runtime_classes: vec!["gvisor".into()],
            ..PipelinePolicy::default()
        };
        assert!(check(&spec(template), &gvisor).is_err());
        assert_eq!(
            check(&spec("    runtimeClassName: gvisor\n"), &gvisor),
            Ok(())
        );
    }

    /// What would loosen the pods or reach past the namespace: a security profile or another
    /// network by annotation, control-plane nodes or other namespaces' pods by affinity. An
    /// affinity to the pipeline's own pods, or a zone, is the template's to give.
    #[test]
    fn annotations_and_affinities_that_reach_past_the_pipeline_are_forbidden() {
        for (template, words) in [
            (
                "    annotations: {container.apparmor.security.beta.kubernetes.io/worker: unconfined}\n",
                "would change the pods' security profile",
            ),
            (
                "    annotations: {k8s.v1.cni.cncf.io/networks: other/net}\n",
                "attach them to another network",
            ),
            (
                "    affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: node-role.kubernetes.io/control-plane, operator: Exists}]}]}}}\n",
                "names control-plane nodes",
            ),
            (
                "    affinity: {podAntiAffinity: {requiredDuringSchedulingIgnoredDuringExecution: [{topologyKey: topology.kubernetes.io/zone, namespaceSelector: {}, labelSelector: {}}]}}\n",
                "names other namespaces",
            ),
            (
                "    affinity: {podAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 1, podAffinityTerm: {topologyKey: kubernetes.io/hostname, namespaces: [other]}}]}}\n",
                "names other namespaces",
            ),
        ] {
            let Refusal::Forbidden(message) = refused(template, &PipelinePolicy::default()) else {
                panic!("{template}: a policy matter")
            };
            assert!(message.contains(words), "{template}: {message}");
        }
        let own = "    affinity: {podAntiAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 1, podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: x}}}}]}, nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [a]}]}]}}}\n";
        assert_eq!(check(&spec(own), &PipelinePolicy::default()), Ok(()));
    }
}
