//! The Job that plans a Task pipeline's shards.

use anyhow::Result;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Volume;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::pod::{fail_at_once_on_permanent, helper_container, helper_pod, runtime_image};
use super::volumes::{data_mounts, data_volumes, template_mounts_read_only};
use super::{labels, metadata, Settings};
use crate::crd::InferencePipeline;
use crate::invocation::{self, Mounts};
use kube_zerocopy_contract::names;

/// The Job that plans a Task pipeline's input (see [`crate::plan`]): one pod, no models, the
/// template's volumes for a folder and the input's credentials for a prefix; tried 3 times,
/// at once given up when retrying cannot help (an input without shard files), and never
/// longer than 10 minutes.
pub(super) fn plan_job(pipeline: &InferencePipeline, settings: &Settings) -> Result<Job> {
    let spec = &pipeline.spec;
    let overrides = spec.template.clone().unwrap_or_default();
    let mounts = Mounts::in_pod();
    let planner = invocation::planner(spec, &mounts)?;
    let credentials: Vec<_> = data_volumes(spec)
        .into_iter()
        .filter(|(_, field)| *field == "input")
        .collect();
    let mut volume_mounts = data_mounts(&credentials, &mounts);
    volume_mounts.extend(template_mounts_read_only(&overrides));
    let mut volumes: Vec<Volume> = credentials.into_iter().map(|(v, _)| v).collect();
    volumes.extend(overrides.volumes.clone().unwrap_or_default());
    let container = helper_container(
        names::PLAN_CONTAINER,
        &planner,
        runtime_image(spec, settings),
        // It lists the input as the workers read it: with the template's settings (a region,
        // a proxy).
        spec.template
            .as_ref()
            .and_then(|t| t.env.clone())
            .unwrap_or_default(),
        volume_mounts,
        ("50m", "64Mi", 256 << 20),
    );
    let mut labels = labels(pipeline);
    labels.insert(names::STEP_LABEL.into(), names::PLAN_STEP.into());
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
            pod_failure_policy: Some(fail_at_once_on_permanent(names::PLAN_CONTAINER)),
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
