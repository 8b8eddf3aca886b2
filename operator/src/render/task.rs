//! A Task pipeline's Indexed Job: one completion per shard.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;

use super::metadata;
use super::pod::fail_at_once_on_permanent_or_shard;
use crate::crd::{InferencePipeline, PlannedInput};
use kube_zerocopy_contract::names;

/// The Indexed Job of a Task pipeline with `template` for its pods, given its shards' plan
/// when the pipeline does not say how many shards it has.
pub(super) fn job(
    pipeline: &InferencePipeline,
    template: PodTemplateSpec,
    plan: Option<&PlannedInput>,
) -> Result<Job> {
    let spec = &pipeline.spec;
    let task = spec.task.clone().unwrap_or_default();
    let shards = task
        .shards
        .or(plan.map(|p| p.shards))
        .context("mode Task needs spec.task.shards or a plan")?;
    let name = pipeline.metadata.name.as_deref().unwrap_or_default();
    // The host name of each pod is <name>-zerocopy-<index>: the schema checks it for a
    // declared count, this for a planned one.
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
            names::INPUT_DIGEST_ANNOTATION.to_owned(),
            plan.input_digest.clone(),
        )]));
    }
    Ok(Job {
        metadata,
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(shards),
            parallelism: Some(task.parallelism.unwrap_or(1).min(shards)),
            // A failing shard is retried on its own; the others go on.
            backoff_limit_per_index: Some(task.retries_per_shard.unwrap_or(2)),
            max_failed_indexes: task.max_failed_shards,
            // A replacement starts only once the pod it replaces is gone: never two workers
            // of one shard at once (memory, GPUs, the same output).
            pod_replacement_policy: Some("Failed".into()),
            // Unless retrying cannot help (the input disagrees with the pipeline or its plan):
            // the worker says so with its exit code, the Job fails at once.
            // A shard whose input the model cannot run fails alone, at once.
            pod_failure_policy: Some(fail_at_once_on_permanent_or_shard(names::WORKER_CONTAINER)),
            suspend: queued.then_some(true),
            template,
            ..Default::default()
        }),
        status: None,
    })
}
