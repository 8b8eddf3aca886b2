//! Whether a namespace's Pod Security admission lets a pipeline's pods in: a pure decision
//! from the namespace's labels.
//!
//! Node sharing mounts the host's /dev/shm, a hostPath volume, which the `baseline` and
//! `restricted` levels forbid. Only pods are checked by that admission, so the Job or
//! Deployment would be created, its controller would fail to create any pod, and the pipeline
//! would sit in Pending with nothing said on it. The operator checks first and says why.

use std::collections::BTreeMap;

use crate::crd::{InferencePipeline, Mode, Sharing};

/// The namespace label that sets the level Pod Security admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// Why the pipeline's pods would be refused in `namespace`, whose labels are `labels`: the
/// message of its condition; None when they are allowed.
pub fn node_sharing_forbidden(
    pipeline: &InferencePipeline,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<String> {
    if pipeline.spec.sharing != Sharing::Node {
        return None;
    }
    // Without the label the API server's default level applies: privileged unless its
    // admission configuration says otherwise, which the operator cannot see.
    let level = labels.get(ENFORCE_LABEL)?;
    if level == "privileged" {
        return None;
    }
    // baseline and restricted forbid hostPath volumes; the API server enforces any other
    // (invalid) value as restricted.
    let level = match level.as_str() {
        "baseline" | "restricted" => format!("\"{level}\""),
        _ => format!("\"{level}\" (not a level: enforced as restricted)"),
    };
    let objects = match pipeline.spec.mode {
        Mode::Task => "no Job is created",
        Mode::Actor => "no Deployment is created",
    };
    Some(format!(
        "namespace {namespace} enforces Pod Security level {level} (label {ENFORCE_LABEL}), \
         which forbids hostPath volumes, and sharing: Node needs one (the node's /dev/shm), so \
         its pods would be refused: {objects}. Use sharing: Pod (a copy of the weights per \
         pod, no hostPath), or run the pipeline in a namespace whose {ENFORCE_LABEL} is \
         privileged"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(mode: &str, sharing: &str) -> InferencePipeline {
        let settings = match mode {
            "Task" => "  input: {uri: 'file:///in'}\n  output: {uri: 'file:///out'}\n  task: {shards: 2}\n",
            _ => "  actor: {replicas: 1}\n",
        };
        serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, namespace: ml}}\nspec:\n  mode: {mode}\n  sharing: {sharing}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n{settings}"
        ))
        .unwrap()
    }

    fn enforcing(level: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("kubernetes.io/metadata.name".into(), "ml".into()),
            (ENFORCE_LABEL.into(), level.into()),
        ])
    }

    #[test]
    fn baseline_and_restricted_forbid_node_sharing_and_say_what_to_do() {
        for level in ["baseline", "restricted"] {
            let why = node_sharing_forbidden(&pipeline("Task", "Node"), "ml", &enforcing(level))
                .expect(level);
            for part in [
                "namespace ml",
                &format!("level \"{level}\""),
                "hostPath",
                "sharing: Node",
                "no Job is created",
                "sharing: Pod",
                "pod-security.kubernetes.io/enforce is privileged",
            ] {
                assert!(why.contains(part), "{part:?} not in {why}");
            }
        }
        let why = node_sharing_forbidden(&pipeline("Actor", "Node"), "ml", &enforcing("baseline"));
        assert!(why.unwrap().contains("no Deployment is created"));
    }

    #[test]
    fn privileged_or_no_label_allows_node_sharing() {
        let p = pipeline("Task", "Node");
        assert_eq!(
            node_sharing_forbidden(&p, "ml", &enforcing("privileged")),
            None
        );
        let unlabelled = BTreeMap::from([("team".to_string(), "a".to_string())]);
        assert_eq!(node_sharing_forbidden(&p, "ml", &unlabelled), None);
    }

    #[test]
    fn an_invalid_level_counts_as_restricted() {
        let why = node_sharing_forbidden(&pipeline("Task", "Node"), "ml", &enforcing("strict"));
        assert!(why
            .unwrap()
            .contains("\"strict\" (not a level: enforced as restricted)"));
    }
}
