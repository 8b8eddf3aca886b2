//! What a pipeline's `template` may add to its pods.
//!
//! Creating an InferencePipeline runs pods in its namespace with the runtime image; the
//! template decides what else those pods reach. The operator's own volumes (the weight store,
//! the bindings, the downloads, the sources' credentials) are never the template's to mount,
//! so no worker can write the weights or read another model's token. What reaches beyond the
//! pod (hostPath volumes, another ServiceAccount) is off unless the operator's policy (chart
//! values `pipelinePolicy`) allows it.

use crate::crd::InferencePipelineSpec;

/// The prefix of every volume the operator adds to a pipeline's pods.
pub const RESERVED_VOLUME_PREFIX: &str = "kzc-";
/// Where the operator mounts its volumes in the containers.
pub const RESERVED_MOUNT_ROOT: &str = "/kzc";

/// What the operator lets pipelines add; the default allows neither.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelinePolicy {
    /// template.volumes may hold hostPath volumes (the node's files, read and written as the
    /// pods' user).
    pub allow_host_path: bool,
    /// template.serviceAccountName may name a ServiceAccount (whose token a projected volume
    /// of the template could then mount).
    pub allow_service_account: bool,
}

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
        };
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
}
