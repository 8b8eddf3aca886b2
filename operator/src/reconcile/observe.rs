//! Step 3: what the pipeline's objects report: its pods (from the watch's cache), why the node
//! agent did not mount their models, and the plan its Task Job is made from.

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;

use super::apply::{task_step, work_of, TaskStep};
use super::{Context, Error};
use crate::crd::{InferencePipeline, PlannedInput};
use crate::k8s_ext::PodExt;
use crate::plan;
use crate::render;

/// The pipeline's pods, from the cache its watch keeps (its workers: the planning
/// Job's pod says how it went through [`plan::state`]).
pub(super) fn pods(ctx: &Context, pipeline: &InferencePipeline, ns: &str) -> Vec<Pod> {
    ctx.pods_of(pipeline, ns, false)
}

/// Node sharing: why the node agent did not mount the models of a pod still waiting to
/// start, from the kubelet's latest FailedMount event for it (the agent's own words follow
/// "desc = "). The pod's status says only ContainerCreating, so one list of the namespace's
/// FailedMount events, and only while such a pod waits.
pub(super) async fn mount_failure(
    ctx: &Context,
    ns: &str,
    pods: &[Pod],
) -> Result<Option<String>, Error> {
    let waiting: Vec<&str> = pods
        .iter()
        .filter(|p| p.is_pending())
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    if waiting.is_empty() {
        return Ok(None);
    }
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), ns);
    let failed = events
        .list(&ListParams::default().fields("involvedObject.kind=Pod,reason=FailedMount"))
        .await
        .map_err(Error::ObserveMounts)?;
    let latest = failed
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object
                .name
                .as_deref()
                .is_some_and(|n| waiting.contains(&n))
        })
        .max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0));
    Ok(latest.map(|e| {
        let pod = e.involved_object.name.unwrap_or_default();
        let message = e.message.unwrap_or_default();
        let words = message
            .split_once("desc = ")
            .map_or(message.as_str(), |(_, w)| w);
        format!(
            "the node agent did not mount pod {pod}'s models: {}",
            words.trim()
        )
    }))
}

/// The plan to make a Task pipeline's Job from, when its shards are planned: the Job's own
/// while it stays (see [`task_step`]), else this generation's finished planning Job's. None
/// while planning has to run (rendering then gives the planning Job).
pub(super) fn current_plan(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
) -> Option<PlannedInput> {
    if !plan::needed(&pipeline.spec) {
        return None;
    }
    let generation = pipeline.metadata.generation;
    let job = ctx
        .jobs
        .get(&ObjectRef::new(&render::object_name(pipeline)).within(ns));
    if let Some(job) = job {
        let step = task_step(Some(&job), generation, &work_of(Some(&job), &pipeline.spec));
        if !matches!(step, TaskStep::Create | TaskStep::Replace) {
            if let Some(plan) = plan::of_job(&job) {
                return Some(plan);
            }
        }
    }
    let planning = ctx
        .jobs
        .get(&ObjectRef::new(&plan::job_name(pipeline)).within(ns));
    let pods = ctx.pods_of(pipeline, ns, true);
    match plan::state(planning.as_deref(), &pods, generation, Timestamp::now()) {
        plan::State::Done(plan) => Some(plan),
        _ => None,
    }
}
