//! An Actor's batch run: the driver's Job and its own identity.

use std::collections::BTreeMap;

use anyhow::Result;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::pod::{fail_at_once_on_permanent, helper_container, helper_pod, mount};
use super::volumes::{client_token_volume, data_mounts, data_volumes};
use super::{labels, metadata, object_name, BatchRun, Settings};
use crate::crd::InferencePipeline;
use crate::invocation::{self, Mounts};
use kube_zerocopy_contract::names;

/// The driver of an Actor's batch run ([`crate::batch_run`]): one restricted container running
/// `kube-zerocopy-worker drive` with the template's volumes (file:// data) and the data's
/// credentials, under a ServiceAccount of its own. Restarted up to 3 times (it resumes after
/// the batches its run committed); failed at once when retrying cannot help (exit code 3:
/// the input changed, batches refused).
pub(super) fn batch_run(pipeline: &InferencePipeline, settings: &Settings) -> Result<BatchRun> {
    use crate::batch_run::{driver_name, run_name};
    use names::{DRIVER_CONTAINER, DRIVE_STEP, RUN_ANNOTATION};
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
        // Not the template's environment: the driver holds its own account's token, which
        // variables such as LD_PRELOAD would hand to the tenant's code.
        Vec::new(),
        volume_mounts,
        ("100m", "128Mi", 1 << 30),
    );
    let mut labels = labels(pipeline);
    labels.insert(names::COMPONENT_LABEL.into(), "driver".into());
    labels.insert(names::STEP_LABEL.into(), DRIVE_STEP.into());
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
