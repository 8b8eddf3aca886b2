//! The reconcile loop. Each reconcile of an InferencePipeline runs five named steps:
//! **apply** its objects (rendered by a pure function, applied by server-side apply),
//! **observe** its pods, compute its **status** (pure, see [`crate::status`]), announce the
//! status's transitions as **events**, and **patch** the status subresource. The Task decision
//! (create, keep, rescale, replace or refuse a Job) is the pure [`task_step`].
//!
//! Owner references make Kubernetes delete a pipeline's objects with it, so no finalizer is
//! needed. A Task pipeline whose spec changes while its Job runs is refused with a condition
//! (a Job's pod template cannot change); once the Job has finished it is replaced. What a
//! person must change is a condition, not an error; errors are API calls that failed, counted
//! by step, and retried later when a person must act first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller, Error as ControllerError};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::batch_run;
use crate::crd::{InferencePipeline, InferencePipelineStatus, Phase, PlannedInput, Sharing};
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::plan;
use crate::policy;
use crate::queue::{self, Hold};
use crate::render::{self, Rendered, Settings};
use crate::status::{self, Blocked, ConditionType, Observed, Reason};

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "kube-zerocopy";
/// The pipeline generation a Job was rendered from. A Job runs again only for a new generation
/// (the user changed the spec), never because the operator renders it differently (an upgrade,
/// a changed chart value): that would overwrite a finished pipeline's outputs.
pub const GENERATION: &str = "kube-zerocopy.io/pipeline-generation";
/// A Job's annotation: the [`work_digest`] of the pipeline it was rendered from.
pub const WORK: &str = "kube-zerocopy.io/work-digest";
/// A Job's annotation when it replaced a finished one for a changed spec: why all its shards
/// run again (the status says it while the Job runs).
pub const RERUN: &str = "kube-zerocopy.io/rerun";
pub const PIPELINE_LABEL: &str = "kube-zerocopy.io/pipeline";

/// Why a reconcile failed, by the step that failed: each is an API call that may succeed when
/// retried. What a person must change in the pipeline is not an error but a status condition
/// (see [`Blocked`]).
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("applying the pipeline's objects: {0}")]
    Apply(#[source] kube::Error),
    #[error("writing the pipeline's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("reading the pods' mount failures: {0}")]
    ObserveMounts(#[source] kube::Error),
}

impl Error {
    /// The step that failed: a label of the error counter.
    pub fn step(&self) -> &'static str {
        match self {
            Error::Apply(_) => "apply",
            Error::PatchStatus(_) => "patch_status",
            Error::ObserveMounts(_) => "observe_mounts",
        }
    }

    /// Whether a person must act before a retry can succeed (a permission the operator lacks,
    /// a CRD that is not installed, an admission webhook that refuses): retried slowly.
    pub fn needs_a_person(&self) -> bool {
        let (Error::Apply(e) | Error::PatchStatus(e) | Error::ObserveMounts(e)) = self;
        !is_transient(e)
    }
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Caches of the Jobs and pods the operator manages, kept by watches: a reconcile reads
    /// them instead of asking the API server each time.
    pub jobs: reflector::Store<Job>,
    pub pods: reflector::Store<Pod>,
    /// Failed reconciles in a row, per pipeline: the retry backs off (see [`error_policy`]).
    pub failures: Mutex<HashMap<ObjectRef<InferencePipeline>, u32>>,
}

fn finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// What to do with a pipeline's Job.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskStep {
    /// No Job yet: create it.
    Create,
    /// The Job was rendered from this generation: leave it as it is, running or finished
    /// (a Job's template cannot change, and a finished one must not run again).
    Keep,
    /// The spec changed only in how many shards run at once: the Job takes the new
    /// parallelism and generation in place, running or finished (its outputs stay valid).
    Rescale,
    /// The spec changed and the old Job finished: delete it, the next reconcile creates the
    /// new one (every shard runs again).
    Replace,
    /// The spec changed while the Job runs: refuse, with this reason.
    Refuse(&'static str),
}

pub const SPEC_CHANGED_WHILE_RUNNING: &str = "the spec changed while the pipeline's Job is running, and a \
    running Job cannot change: wait for it to finish (it is then replaced), or delete and re-create the pipeline";

/// The Task decision, from the cached Job (if any), the pipeline's generation and the digest
/// of its work ([`work_digest`]). A Job of an operator that did not annotate generations
/// counts as current: never re-run by accident.
pub fn task_step(current: Option<&Job>, generation: Option<i64>, work: &str) -> TaskStep {
    let Some(current) = current else {
        return TaskStep::Create;
    };
    let rendered_from = current.annotations().get(GENERATION);
    let same = match (rendered_from, generation) {
        (Some(from), Some(generation)) => from.parse::<i64>().ok() == Some(generation),
        _ => true,
    };
    let same_work = current.annotations().get(WORK).map(String::as_str) == Some(work);
    match (same, same_work, finished(current)) {
        (true, _, _) => TaskStep::Keep,
        (false, true, _) => TaskStep::Rescale,
        (false, false, true) => TaskStep::Replace,
        (false, false, false) => TaskStep::Refuse(SPEC_CHANGED_WHILE_RUNNING),
    }
}

/// The digest of what a Task pipeline computes: its spec without `task.parallelism`, which
/// changes only how many shards run at once. Not the rendered Job's, which an operator upgrade
/// changes too.
pub fn work_digest(spec: &crate::crd::InferencePipelineSpec) -> String {
    let mut work = spec.clone();
    if let Some(task) = work.task.as_mut() {
        task.parallelism = None;
    }
    let json = serde_json::to_vec(&work).expect("a spec serializes");
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&json))
}

/// Marks a Job with the generation and the work it was rendered from and, for a re-run, why.
fn annotate(job: &mut Job, generation: Option<i64>, work: String, rerun: Option<String>) {
    let annotations = job
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    if let Some(generation) = generation {
        annotations.insert(GENERATION.into(), generation.to_string());
    }
    annotations.insert(WORK.into(), work);
    if let Some(why) = rerun {
        annotations.insert(RERUN.into(), why);
    }
}

/// Carries out [`task_step`]. Returns the Job as it is now and, when refused, why; when
/// replaced, why every shard runs again. `current` is the cached Job: should the cache lag
/// behind, creating fails (it exists) and the reconcile retries.
async fn apply_task(
    ctx: &Context,
    pipeline: &InferencePipeline,
    api: &Api<Job>,
    current: Option<Arc<Job>>,
    mut job: Job,
) -> Result<Applied, kube::Error> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let generation = pipeline.metadata.generation;
    let work = work_digest(&pipeline.spec);
    let step = task_step(current.as_deref(), generation, &work);
    // Held: no new Job (a finished one stays until the pipeline goes on).
    if queue::suspended(pipeline) && matches!(step, TaskStep::Create | TaskStep::Replace) {
        return Ok(Applied {
            job: current.map(|j| (*j).clone()),
            hold: Some(Hold::suspended("no Job is created")),
            ..Default::default()
        });
    }
    match step {
        TaskStep::Create => {
            annotate(&mut job, generation, work, None);
            let created = api
                .patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&job),
                )
                .await?;
            Ok(Applied::job(created))
        }
        TaskStep::Keep => Ok(Applied {
            job: current.map(|j| (*j).clone()),
            ..Default::default()
        }),
        TaskStep::Rescale => {
            // A merge patch of these fields alone: the Job's template cannot change, its
            // parallelism can.
            let patch = json!({
                "metadata": {"annotations": {GENERATION: generation.map(|g| g.to_string())}},
                "spec": {"parallelism": job.spec.as_ref().and_then(|s| s.parallelism)},
            });
            let patched = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(Applied::job(patched))
        }
        TaskStep::Replace => {
            let shards = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(0);
            let why = format!(
                "the spec changed (generation {}) since the finished Job ran: it is replaced, \
                 and all {shards} shards run again",
                generation.unwrap_or_default()
            );
            // Only the finished Job that was seen: a reconcile that read a stale cache must
            // not delete the new one.
            let finished_uid = current.as_ref().and_then(|j| j.metadata.uid.clone());
            if delete_seen(api, &name, finished_uid).await? {
                record(
                    ctx,
                    pipeline,
                    EventType::Normal,
                    Reason::Rerun.as_str(),
                    Some(why.clone()),
                )
                .await
            }
            // The new Job carries why it runs, for the status while it runs.
            annotate(&mut job, generation, work, Some(why.clone()));
            match api
                .patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&job),
                )
                .await
            {
                Ok(created) => Ok(Applied::job(created)),
                // The finished Job is still on its way out: the next reconcile creates the new.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => Ok(Applied {
                    rerun: Some(why),
                    ..Default::default()
                }),
                Err(e) => Err(e),
            }
        }
        TaskStep::Refuse(why) => Ok(Applied {
            job: current.map(|j| (*j).clone()),
            refused: Some(why.into()),
            ..Default::default()
        }),
    }
}

/// One reconcile, in the steps its body names: apply the pipeline's objects, observe what they
/// and their pods report, compute the status, announce its transitions as events, patch it.
pub async fn reconcile(
    pipeline: Arc<InferencePipeline>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_steps(&pipeline, &ctx).await;
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(&*pipeline));
    }
    result
}

async fn reconcile_steps(pipeline: &InferencePipeline, ctx: &Context) -> Result<Action, Error> {
    let ns = pipeline.namespace().unwrap_or_else(|| "default".into());
    let applied = apply(ctx, pipeline, &ns).await?;
    let pods = observe_pods(ctx, pipeline, &ns);
    let mount_failure = match pipeline.spec.sharing {
        Sharing::Node => observe_mount_failure(ctx, &ns, &pods).await?,
        Sharing::Pod => None,
    };
    let observed = Observed {
        job: applied.job.as_ref(),
        deployment: applied.deployment.as_ref(),
        pods: &pods,
        refused: applied.refused,
        rerun: applied.rerun,
        blocked: applied.blocked,
        planning: applied.planning,
        driver: applied.driver,
        hold: applied.hold,
        mount_failure,
    };
    let new_status = status::compute(pipeline, &observed, Timestamp::now());
    let api: Api<InferencePipeline> = Api::namespaced(ctx.client.clone(), &ns);
    announce_transitions(ctx, pipeline, &api, &new_status).await;
    patch_status(pipeline, &api, &new_status).await?;
    let finished = match (new_status.phase, pipeline.spec.ttl_seconds_after_finished) {
        (Some(Phase::Succeeded | Phase::Failed), Some(ttl)) => {
            let job = match applied.job.clone() {
                Some(job) => Some(job),
                None => ctx
                    .jobs
                    .get(&ObjectRef::new(&batch_run::driver_name(pipeline)).within(&ns))
                    .map(|j| (*j).clone()),
            };
            job.as_ref().and_then(finished_at).map(|at| (at, ttl))
        }
        _ => None,
    };
    if let Some((at, ttl)) = finished {
        let left = at.as_second() + i64::from(ttl) - Timestamp::now().as_second();
        if left > 0 {
            return Ok(Action::requeue(Duration::from_secs(left as u64)));
        }
        expire(pipeline, &api, ttl).await?;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(next_look(new_status.phase)))
}

/// When a finished Job finished: its completion time, or when it was marked Failed.
fn finished_at(job: &Job) -> Option<Timestamp> {
    let status = job.status.as_ref()?;
    status.completion_time.as_ref().map(|t| t.0).or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed" && c.status == "True")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0)
    })
}

/// Deletes a pipeline whose ttlSecondsAfterFinished is up (its owned objects go with it; the
/// outputs stay). Only this pipeline: one re-created under its name meanwhile is another.
async fn expire(
    pipeline: &InferencePipeline,
    api: &Api<InferencePipeline>,
    ttl: i32,
) -> Result<(), Error> {
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pipeline.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    info!(pipeline = %pipeline.name_any(), ttl, "finished longer than ttlSecondsAfterFinished: deleting it");
    match api.delete(&pipeline.name_any(), &delete).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(Error::Apply(e)),
    }
}

/// When to look at a pipeline again if nothing it watches changes first.
fn next_look(phase: Option<Phase>) -> Duration {
    match phase {
        Some(phase) if phase.is_settled() => Duration::from_secs(300),
        // A person must change something: a new spec brings a reconcile at once; this covers
        // what no watch brings (a foreign object deleted).
        Some(Phase::Blocked) => Duration::from_secs(60),
        _ => Duration::from_secs(15),
    }
}

/// What the apply step left: the Job or Deployment as applied and, when the spec change was
/// refused, why; why a finished Job was replaced; or why nothing was applied.
#[derive(Default)]
struct Applied {
    job: Option<Job>,
    deployment: Option<Deployment>,
    refused: Option<String>,
    rerun: Option<String>,
    blocked: Option<Blocked>,
    /// How the planning of the shards stands, while it runs.
    planning: Option<String>,
    /// How an Actor's batch run stands.
    driver: Option<batch_run::State>,
    /// Why nothing (more) runs for now: suspended, or waiting for Kueue.
    hold: Option<Hold>,
}

impl Applied {
    fn job(job: Job) -> Self {
        Applied {
            job: Some(job),
            ..Default::default()
        }
    }
}

impl From<Blocked> for Applied {
    fn from(blocked: Blocked) -> Self {
        Applied {
            blocked: Some(blocked),
            ..Default::default()
        }
    }
}

/// Step 2: the pipeline's pods, from the cache its watch keeps (its workers: the planning
/// Job's pod says how it went through [`plan::state`]).
fn observe_pods(ctx: &Context, pipeline: &InferencePipeline, ns: &str) -> Vec<Pod> {
    pods_of(ctx, pipeline, ns, false)
}

fn pods_of(ctx: &Context, pipeline: &InferencePipeline, ns: &str, planning: bool) -> Vec<Pod> {
    let name = pipeline.name_any();
    ctx.pods
        .state_filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(PIPELINE_LABEL) == Some(&name)
                && p.labels().contains_key(plan::STEP_LABEL) == planning
        })
        .iter()
        .map(|p| (**p).clone())
        .collect()
}

/// Step 2, Node sharing: why the node agent did not mount the models of a pod still waiting to
/// start, from the kubelet's latest FailedMount event for it (the agent's own words follow
/// "desc = "). The pod's status says only ContainerCreating, so one list of the namespace's
/// FailedMount events, and only while such a pod waits.
async fn observe_mount_failure(
    ctx: &Context,
    ns: &str,
    pods: &[Pod],
) -> Result<Option<String>, Error> {
    let waiting: Vec<&str> = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"))
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

/// Step 4: one event per transition: into a new phase, and into Degraded with a new reason.
async fn announce_transitions(
    ctx: &Context,
    pipeline: &InferencePipeline,
    api: &Api<InferencePipeline>,
    new: &InferencePipelineStatus,
) {
    let old = pipeline.status.as_ref();
    if let Some(phase) = new.phase.filter(|p| old.and_then(|s| s.phase) != Some(*p)) {
        if !phase_already_written(api, &pipeline.name_any(), new).await {
            let type_ = if phase.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            record(
                ctx,
                pipeline,
                type_,
                phase.as_str(),
                status::phase_note(new),
            )
            .await;
        }
    }
    /// The reason and message of a Degraded condition that holds.
    fn degraded(s: &InferencePipelineStatus) -> Option<(&str, &str)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Degraded.as_str() && c.status == "True")
            .map(|c| (c.reason.as_str(), c.message.as_str()))
    }
    let before = old.and_then(degraded).map(|(reason, _)| reason);
    if let Some((reason, message)) = degraded(new).filter(|(reason, _)| before != Some(*reason)) {
        record(
            ctx,
            pipeline,
            EventType::Warning,
            reason,
            Some(message.into()),
        )
        .await;
    }
}

/// Step 5: writes the status by server-side apply, unless unchanged (a condition keeps its
/// transition time while it holds).
async fn patch_status(
    pipeline: &InferencePipeline,
    api: &Api<InferencePipeline>,
    new: &InferencePipelineStatus,
) -> Result<(), Error> {
    // status.batches is the driver's: the operator neither writes nor compares it.
    let current = pipeline
        .status
        .clone()
        .map(|s| InferencePipelineStatus { batches: None, ..s });
    if current.as_ref() == Some(new) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": InferencePipeline::api_version(&()),
        "kind": InferencePipeline::kind(&()),
        "status": new,
    });
    match api
        .patch_status(
            &pipeline.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        // Deleted while this reconcile ran: there is no status left to write, nothing failed.
        Err(kube::Error::Api(e)) if e.code == 404 => {
            debug!(pipeline = %pipeline.name_any(), "deleted before its status was written");
            Ok(())
        }
        other => other.map(|_| ()).map_err(Error::PatchStatus),
    }
}

/// Records an event about `pipeline`; a failure is logged, never fatal (the status says the
/// same).
async fn record(
    ctx: &Context,
    pipeline: &InferencePipeline,
    type_: EventType,
    reason: &str,
    note: Option<String>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note,
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        warn!(error = %e, "cannot record an event");
    }
}

/// Whether the API server already holds `new`'s phase: a reconcile that follows its
/// predecessor's status write before the cache has it sees the old phase, and would announce
/// the same transition twice. Asked only on a transition; when the answer cannot be had, the
/// event goes out.
async fn phase_already_written(
    api: &Api<InferencePipeline>,
    name: &str,
    new: &InferencePipelineStatus,
) -> bool {
    match api.get_status(name).await {
        Ok(current) => current.status.and_then(|s| s.phase) == new.phase,
        Err(_) => false,
    }
}

/// Step 1: renders and applies a pipeline's objects. A pipeline that cannot become objects, or
/// whose objects the API server refuses, is blocked with the reason (its status and an event
/// say it): a person must change it, and a change of the spec brings a reconcile at once. Only
/// errors that may pass on retry are returned as errors.
async fn apply(ctx: &Context, pipeline: &InferencePipeline, ns: &str) -> Result<Applied, Error> {
    let plan = current_plan(ctx, pipeline, ns);
    let rendered = match render::render_planned(pipeline, &ctx.settings, plan.as_ref()) {
        Ok(rendered) => rendered,
        Err(e) => {
            let reason = match e.downcast_ref::<policy::Refusal>() {
                Some(policy::Refusal::Forbidden(_)) => Reason::ForbiddenByPolicy,
                _ => Reason::InvalidPipeline,
            };
            return Ok(Blocked {
                reason,
                message: format!("cannot make the pipeline's objects: {e:#}"),
            }
            .into());
        }
    };
    match apply_objects(ctx, pipeline, ns, rendered).await {
        Ok(applied) => Ok(applied),
        Err(kube::Error::Api(e)) if refusal_is_final(e.code) => Ok(Blocked {
            reason: Reason::ObjectsRefused,
            message: format!(
                "the API server refused the pipeline's objects: {}",
                e.message
            ),
        }
        .into()),
        Err(e) => Err(Error::Apply(e)),
    }
}

/// The plan to make a Task pipeline's Job from, when its shards are planned: the Job's own
/// while it stays (see [`task_step`]), else this generation's finished planning Job's. None
/// while planning has to run (rendering then gives the planning Job).
fn current_plan(ctx: &Context, pipeline: &InferencePipeline, ns: &str) -> Option<PlannedInput> {
    if !plan::needed(&pipeline.spec) {
        return None;
    }
    let generation = pipeline.metadata.generation;
    let job = ctx
        .jobs
        .get(&ObjectRef::new(&render::object_name(pipeline)).within(ns));
    if let Some(job) = job {
        let step = task_step(Some(&job), generation, &work_digest(&pipeline.spec));
        if !matches!(step, TaskStep::Create | TaskStep::Replace) {
            if let Some(plan) = plan::of_job(&job) {
                return Some(plan);
            }
        }
    }
    let planning = ctx
        .jobs
        .get(&ObjectRef::new(&plan::job_name(pipeline)).within(ns));
    let pods = pods_of(ctx, pipeline, ns, true);
    match plan::state(planning.as_deref(), &pods, generation, Timestamp::now()) {
        plan::State::Done(plan) => Some(plan),
        _ => None,
    }
}

/// Deletes the Job `name` only if it is still the one seen (`uid`): a reconcile that read a
/// stale cache must not delete a newer one. Gone already, or replaced, is fine.
async fn delete_seen(api: &Api<Job>, name: &str, uid: Option<String>) -> Result<bool, kube::Error> {
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &delete).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Carries the planning of a Task pipeline's shards on (see [`plan::state`]): creates this
/// generation's planning Job, deletes one of another generation, whose pod is gone, or that
/// failed a while ago (the next reconcile plans again), and says how it stands.
async fn apply_plan(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    mut job: Job,
) -> Result<Applied, kube::Error> {
    let name = plan::job_name(pipeline);
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(ns));
    if cached.is_none() {
        if let Some(blocked) = foreign(&api, pipeline, ns, &name).await? {
            return Ok(blocked.into());
        }
    }
    let input = pipeline.spec.input.as_ref().map_or("", |i| i.uri.as_str());
    let planning = |what: String| Applied {
        planning: Some(what),
        ..Default::default()
    };
    let listing = format!("planning the shards: Job {name} lists the input {input}");
    let generation = pipeline.metadata.generation;
    let uid = cached.as_ref().and_then(|j| j.metadata.uid.clone());
    let pods = pods_of(ctx, pipeline, ns, true);
    match plan::state(cached.as_deref(), &pods, generation, Timestamp::now()) {
        plan::State::Missing if queue::suspended(pipeline) => Ok(Applied {
            hold: Some(Hold::suspended("the input's shards are not planned")),
            ..Default::default()
        }),
        plan::State::Missing => {
            annotate(&mut job, generation, work_digest(&pipeline.spec), None);
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&job),
            )
            .await?;
            Ok(planning(listing))
        }
        // A planning pod that cannot start (its input's Secret missing, an image that cannot
        // be pulled) says why, as the workers' pods do.
        plan::State::Running | plan::State::Done(_) => match status::stuck_pod(&pods) {
            Some((reason, why)) => Ok(Blocked {
                reason,
                message: format!("planning the shards: {why}"),
            }
            .into()),
            None => Ok(planning(listing)),
        },
        plan::State::Outdated => {
            delete_seen(&api, &name, uid).await?;
            Ok(planning(format!(
                "planning the shards again for generation {}",
                generation.unwrap_or_default()
            )))
        }
        plan::State::Failed { why, retry } => {
            if retry {
                delete_seen(&api, &name, uid).await?;
            }
            Ok(Blocked {
                reason: Reason::InputNotPlanned,
                message: format!(
                    "planning the shards failed: {why} (Job {name}; planned again every minute, or \
                     give spec.task.shards)"
                ),
            }
            .into())
        }
    }
}

/// Whether `object` belongs to `pipeline` (an owner reference to its uid).
fn owned_by(object: &impl Resource, pipeline: &InferencePipeline) -> bool {
    let uid = pipeline.metadata.uid.as_deref();
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid)
}

/// Refuses an object of the pipeline's name that the pipeline does not own: server-side apply
/// with force would take it over, and its owner reference would then delete it with the
/// pipeline. One GET before each apply.
async fn foreign<K>(
    api: &Api<K>,
    pipeline: &InferencePipeline,
    ns: &str,
    name: &str,
) -> Result<Option<Blocked>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(match api.get_opt(name).await? {
        Some(existing) if !owned_by(&existing, pipeline) => Some(not_owned::<K>(ns, name)),
        _ => None,
    })
}

fn not_owned<K: Resource<DynamicType = ()>>(ns: &str, name: &str) -> Blocked {
    let kind = K::kind(&());
    Blocked {
        reason: Reason::ObjectNotOwned,
        message: format!(
            "a {kind} named {name} already exists in namespace {ns} and does not belong to this \
             pipeline, which would take it over: delete or rename that {kind}, or rename the pipeline"
        ),
    }
}

/// Applies `object` if the pipeline owns the object of its name, or creates it if there is
/// none; never touches one that is not the pipeline's (see [`foreign`]). Creating is a POST,
/// which fails on an object made meanwhile instead of taking it over.
async fn apply_owned<K>(
    api: &Api<K>,
    pipeline: &InferencePipeline,
    ns: &str,
    object: &K,
) -> Result<Option<Blocked>, kube::Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        Some(existing) if !owned_by(&existing, pipeline) => Ok(Some(not_owned::<K>(ns, &name))),
        Some(_) => {
            let apply = PatchParams::apply(MANAGER).force();
            api.patch(&name, &apply, &Patch::Apply(object)).await?;
            Ok(None)
        }
        None => {
            let create = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            match api.create(&create, object).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(not_owned::<K>(ns, &name))),
                Err(e) => Err(e),
            }
        }
    }
}

/// Applies a pipeline's objects: its Job (see [`apply_task`]), or its Service and Deployment.
/// Returns the Job or Deployment as applied and, when the spec change was refused, why; or
/// why nothing was applied (an object of its name that it does not own).
async fn apply_objects(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    rendered: Rendered,
) -> Result<Applied, kube::Error> {
    let client = ctx.client.clone();
    let apply = PatchParams::apply(MANAGER).force();
    match rendered {
        Rendered::Task { job } => {
            let cached = ctx
                .jobs
                .get(&ObjectRef::new(&render::object_name(pipeline)).within(ns));
            // The cache holds only the operator's Jobs: look for another of the same name.
            if cached.is_none() {
                let jobs = Api::<Job>::namespaced(client.clone(), ns);
                let name = render::object_name(pipeline);
                if let Some(blocked) = foreign(&jobs, pipeline, ns, &name).await? {
                    return Ok(blocked.into());
                }
            }
            let jobs = Api::namespaced(client.clone(), ns);
            let mut applied = apply_task(ctx, pipeline, &jobs, cached, *job).await?;
            if applied.hold.is_none() {
                applied.hold = hold_task(ctx, pipeline, ns, &jobs, applied.job.as_ref()).await?;
            }
            Ok(applied)
        }
        Rendered::Plan { job } => apply_plan(ctx, pipeline, ns, *job).await,
        Rendered::Actor {
            mut deployment,
            service,
            network_policy,
            run,
        } => {
            let services: Api<Service> = Api::namespaced(client.clone(), ns);
            let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
            let name = render::object_name(pipeline);
            if let Some(blocked) = foreign(&deployments, pipeline, ns, &name).await? {
                return Ok(blocked.into());
            }
            // Created with a POST when missing: one made meanwhile by someone else is refused,
            // never taken over.
            if let Some(blocked) = apply_owned(&services, pipeline, ns, &service).await? {
                return Ok(blocked.into());
            }
            let policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
            if let Some(blocked) = apply_owned(&policies, pipeline, ns, &network_policy).await? {
                return Ok(blocked.into());
            }
            let driver = match run {
                Some(run) => match apply_batch_run(ctx, pipeline, ns, *run).await? {
                    Ok(state) => Some(state),
                    Err(blocked) => return Ok(blocked.into()),
                },
                None => None,
            };
            // The run is over, or held: nothing is left to serve for now.
            let suspended = queue::suspended(pipeline);
            if suspended || matches!(driver, Some(batch_run::State::Done)) {
                if let Some(spec) = deployment.spec.as_mut() {
                    spec.replicas = Some(0);
                }
            }
            let d = deployments
                .patch(
                    &render::object_name(pipeline),
                    &apply,
                    &Patch::Apply(&deployment),
                )
                .await?;
            Ok(Applied {
                deployment: Some(d),
                driver,
                hold: suspended.then(|| Hold::suspended("the replicas are scaled to 0")),
                ..Default::default()
            })
        }
    }
}

/// Holds a Task pipeline's Job back or lets it go on (see [`crate::queue`]), and says why it
/// does not run when it does not: spec.suspend is mirrored onto the Job, or, for a Job that
/// Kueue admits (it carries the queue label), onto its Workload's spec.active.
async fn hold_task(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    jobs: &Api<Job>,
    job: Option<&Job>,
) -> Result<Option<Hold>, kube::Error> {
    let suspend = queue::suspended(pipeline);
    let Some(job) = job.filter(|j| !finished(j)) else {
        return Ok(None);
    };
    // The Job's own label, as it was created: Kueue admits it or not by that.
    let Some(queue_name) = job.labels().get(queue::QUEUE_LABEL) else {
        suspend_job(jobs, job, suspend).await?;
        if suspend {
            return Ok(Some(Hold::suspended(
                "the Job is suspended and its pods stopped (the shards done stay done)",
            )));
        }
        return Ok(queue::held_by_another(job).then(Hold::held_by_another));
    };
    let waiting = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    // Admitted and running, and not to be held: its Workload is active, nothing to say. (A
    // deactivated Workload's Job is suspended by Kueue.) No list on every reconcile of a run.
    if !suspend && !waiting {
        return Ok(None);
    }
    let workload = queue::workload_of(ctx.client.clone(), ns, job).await?;
    if let Some(workload) = workload.as_ref().filter(|w| queue::is_active(w) == suspend) {
        queue::set_active(ctx.client.clone(), ns, workload, !suspend).await?;
    }
    if suspend {
        return Ok(Some(Hold::suspended(
            "the Job's Workload is deactivated (Kueue suspends the Job and releases its quota)",
        )));
    }
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let age = created.map_or(0, |t| Timestamp::now().as_second() - t.as_second());
    let age = Duration::from_secs(age.max(0) as u64);
    let why = queue::waiting_reason(workload.as_ref(), age);
    Ok(waiting.then(|| Hold::queued(queue_name, why.as_deref())))
}

/// Suspends a running Job for spec.suspend, or resumes one it suspended (see
/// [`queue::suspend_change`]): the Job controller stops its pods, or starts them again (an
/// Indexed Job's completed indexes stay completed).
async fn suspend_job(jobs: &Api<Job>, job: &Job, suspend: bool) -> Result<(), kube::Error> {
    let change = queue::suspend_change(job, suspend).filter(|_| !finished(job));
    if let Some(suspend) = change {
        let ours = suspend.then_some("true");
        let patch = json!({
            "metadata": {"annotations": {queue::SUSPENDED_BY_PIPELINE: ours}},
            "spec": {"suspend": suspend},
        });
        jobs.patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Carries an Actor's batch run on (see [`batch_run::state`]): applies the driver's identity,
/// creates its Job once, replaces the Job of another run, and says how the run stands; or why
/// it cannot (a Job, ServiceAccount, Role or RoleBinding of its name that is not the
/// pipeline's).
async fn apply_batch_run(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    run: render::BatchRun,
) -> Result<Result<batch_run::State, Blocked>, kube::Error> {
    let name = batch_run::driver_name(pipeline);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(ns));
    if cached.is_none() {
        if let Some(blocked) = foreign(&jobs, pipeline, ns, &name).await? {
            return Ok(Err(blocked));
        }
    }
    // The driver's identity: a ServiceAccount of the same name that the pipeline does not own
    // (an administrator's, with its bindings and cloud identity) must never be taken over.
    let client = ctx.client.clone();
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    if let Some(blocked) = apply_owned(&accounts, pipeline, ns, &run.account).await? {
        return Ok(Err(blocked));
    }
    let roles = Api::<Role>::namespaced(client.clone(), ns);
    if let Some(blocked) = apply_owned(&roles, pipeline, ns, &run.role).await? {
        return Ok(Err(blocked));
    }
    let bindings = Api::<RoleBinding>::namespaced(client, ns);
    if let Some(blocked) = apply_owned(&bindings, pipeline, ns, &run.binding).await? {
        return Ok(Err(blocked));
    }
    let state = batch_run::state(pipeline, cached.as_deref());
    match &state {
        // Held: the run starts once the pipeline goes on.
        batch_run::State::Missing if queue::suspended(pipeline) => {}
        batch_run::State::Missing => {
            if let Some(blocked) = apply_owned(&jobs, pipeline, ns, &run.job).await? {
                return Ok(Err(blocked));
            }
        }
        batch_run::State::Running => {
            if let Some(job) = cached.as_deref() {
                suspend_job(&jobs, job, queue::suspended(pipeline)).await?;
            }
        }
        batch_run::State::Outdated => {
            let uid = cached.as_ref().and_then(|j| j.metadata.uid.clone());
            delete_seen(&jobs, &name, uid).await?;
        }
        // A Job's pod template cannot change: the run goes on as it started.
        batch_run::State::Done | batch_run::State::Failed(_) => {}
    }
    Ok(Ok(state))
}

/// The backoff of the controller's watches. kube's controller merges every watch (pipelines,
/// Jobs, Deployments, Services, pods) into one stream under one backoff, so after an API
/// server outage each watch's one "resource version too old" error pushed the shared default
/// backoff (up to 30 s, reset only after 2 quiet minutes) further and stalled all watches for
/// minutes. Capped at a few seconds, they resume within seconds of the API server's return.
struct WatchBackoff {
    next: Duration,
}

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(3);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

/// First retry after a failed reconcile; each further failure in a row doubles it, up to the
/// max. An error a person must fix first is retried from a minute on: trying every few seconds
/// would only fill the log.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_FIRST_NEEDS_A_PERSON: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(300);
const RETRY_MAX_NEEDS_A_PERSON: Duration = Duration::from_secs(900);

pub fn error_policy(pipeline: Arc<InferencePipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut all = ctx.failures.lock().unwrap();
        let n = all.entry(ObjectRef::from_obj(&*pipeline)).or_insert(0);
        *n += 1;
        *n
    };
    let retry = retry_after(failures, error.needs_a_person());
    warn!(
        pipeline = %pipeline.name_any(),
        error = %error,
        step = error.step(),
        needs_a_person = error.needs_a_person(),
        failures,
        retry_s = retry.as_secs(),
        "reconcile failed"
    );
    Action::requeue(retry)
}

fn retry_after(failures: u32, needs_a_person: bool) -> Duration {
    let (first, max) = if needs_a_person {
        (RETRY_FIRST_NEEDS_A_PERSON, RETRY_MAX_NEEDS_A_PERSON)
    } else {
        (RETRY_FIRST, RETRY_MAX)
    };
    first
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(max)
}

/// Whether an API error may go away on its own (the API server restarting, overloaded or
/// unreachable for a while), as opposed to one a person must fix (no CRD, no permission).
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Whether the API server's refusal of an object will stand on retry: anything but throttling
/// and a server or gateway that is away. A 500 stands: the API server answers some invalid
/// objects with one (a malformed quantity in a Job).
fn refusal_is_final(code: u16) -> bool {
    !matches!(code, 429 | 502 | 503 | 504)
}

/// Checks that InferencePipelines can be listed before anything starts. An API server that
/// is away (a control-plane upgrade, an outage) is waited for, with the reason logged; a
/// missing CRD or permission ends the operator with a message that says what to fix.
async fn wait_for_api(pipelines: &Api<InferencePipeline>) -> anyhow::Result<()> {
    let first = ListParams::default().limit(1);
    retry_transient("API server not reachable yet", is_transient, || {
        pipelines.list(&first)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot list InferencePipelines (is the CRD installed, and may the operator's \
             ServiceAccount list them?): {e}"
        )
    })?;
    Ok(())
}

/// Runs `attempt` until it succeeds or fails in a way a person must fix; errors that
/// `transient` accepts are logged as `what` and retried on the watches' backoff.
pub async fn retry_transient<T, E, Fut>(
    what: &str,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = WatchBackoff {
        next: WATCH_BACKOFF_MIN,
    };
    loop {
        match attempt().await {
            Err(e) if transient(&e) => {
                let delay = backoff.next().unwrap_or(WATCH_BACKOFF_MAX);
                warn!(error = %e, retry_in = ?delay, "{what}");
                tokio::time::sleep(delay).await;
            }
            result => return result,
        }
    }
}

/// Runs the controller until SIGTERM or Ctrl-C. `namespace`: watch one namespace, or all.
/// With an `election`, only while this replica holds the leader lease.
pub async fn run(
    client: Client,
    settings: Settings,
    namespace: Option<String>,
    election: Option<Election>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let pipelines: Api<InferencePipeline> = api(&client, &namespace);
    wait_for_api(&pipelines).await?;
    let mut leadership = match election {
        Some(election) => Some(
            election
                .acquire(client.clone(), || metrics.set_ready())
                .await?,
        ),
        None => None,
    };
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=kube-zerocopy");
    let (jobs, jobs_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    tokio::spawn(
        watcher(api::<Job>(&client, &namespace), managed.clone())
            .backoff(WatchBackoff {
                next: WATCH_BACKOFF_MIN,
            })
            .reflect(jobs_writer)
            .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        watcher(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(PIPELINE_LABEL),
        )
        .backoff(WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        })
        .reflect(pods_writer)
        .for_each(|_| futures::future::ready(())),
    );
    jobs.wait_until_ready().await?;
    pods.wait_until_ready().await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        jobs,
        pods,
        failures: Mutex::default(),
    });
    ctx.metrics.set_ready();
    ctx.metrics.leader.set(1);
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "operator running"
    );
    let controller = Controller::new(pipelines, watcher::Config::default())
        .owns(api::<Job>(&client, &namespace), managed.clone())
        .owns(api::<Deployment>(&client, &namespace), managed.clone())
        .owns(api::<Service>(&client, &namespace), managed)
        .watches(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(PIPELINE_LABEL),
            |pod: Pod| {
                let name = pod.labels().get(PIPELINE_LABEL)?.clone();
                Some(ObjectRef::<InferencePipeline>::new(&name).within(&pod.namespace()?))
            },
        )
        .trigger_backoff(WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => info!(pipeline = %object.name, "reconciled"),
                // An owned object's deletion after its pipeline's: nothing left to reconcile.
                Err(ControllerError::ObjectNotFound(object)) => {
                    debug!(pipeline = %object.name, "deleted; nothing to reconcile")
                }
                // error_policy logged it, with its count and the retry.
                Err(ControllerError::ReconcilerFailed(..)) => {}
                Err(e) => warn!(error = %e, "reconcile error"),
            }
        });
    match leadership.as_mut() {
        None => controller.await,
        Some(held) => tokio::select! {
            () = controller => {}
            reason = held.lost() => anyhow::bail!("{reason}: exiting so that one replica reconciles"),
        },
    }
    if let Some(held) = leadership {
        held.release().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        is_transient, next_look, refusal_is_final, retry_after, task_step, work_digest, Error,
        TaskStep, GENERATION, SPEC_CHANGED_WHILE_RUNNING, WORK,
    };
    use crate::crd::{InferencePipeline, Phase};
    use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
    use kube::core::Status;
    use std::time::Duration;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn an_away_or_busy_api_server_is_waited_for() {
        assert!(is_transient(&api_error(503)));
        assert!(is_transient(&api_error(500)));
        assert!(is_transient(&api_error(429)));
        assert!(is_transient(&kube::Error::Service(
            "client error (Connect)".into()
        )));
    }

    #[test]
    fn a_missing_crd_or_permission_is_not() {
        assert!(!is_transient(&api_error(404)));
        assert!(!is_transient(&api_error(403)));
        assert!(!is_transient(&api_error(401)));
    }

    #[test]
    fn a_refused_object_blocks_unless_the_api_server_is_away() {
        for code in [400, 403, 422, 500] {
            assert!(refusal_is_final(code), "{code}");
        }
        for code in [429, 502, 503, 504] {
            assert!(!refusal_is_final(code), "{code}");
        }
    }

    #[test]
    fn failed_reconciles_back_off_to_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| retry_after(n, false).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry_after(u32::MAX, false), Duration::from_secs(300));
    }

    /// A permission the operator lacks or a CRD that is gone: a minute first, up to 15.
    #[test]
    fn errors_a_person_must_fix_back_off_longer() {
        let secs: Vec<u64> = (1..=6).map(|n| retry_after(n, true).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 900, 900]);
        let forbidden = Error::PatchStatus(api_error(403));
        assert!(forbidden.needs_a_person());
        assert_eq!(forbidden.step(), "patch_status");
        let away = Error::Apply(api_error(503));
        assert!(!away.needs_a_person());
        assert_eq!(away.step(), "apply");
    }

    #[test]
    fn settled_pipelines_are_looked_at_rarely_and_blocked_ones_every_minute() {
        assert_eq!(next_look(Some(Phase::Succeeded)), Duration::from_secs(300));
        assert_eq!(next_look(Some(Phase::Ready)), Duration::from_secs(300));
        assert_eq!(next_look(Some(Phase::Blocked)), Duration::from_secs(60));
        assert_eq!(next_look(Some(Phase::Running)), Duration::from_secs(15));
        assert_eq!(next_look(None), Duration::from_secs(15));
    }

    /// A Job rendered from `generation` (None: by an operator that did not say), finished or not.
    fn job(generation: Option<i64>, finished: Option<&str>) -> Job {
        let mut job = Job::default();
        if let Some(g) = generation {
            job.metadata.annotations = Some([(GENERATION.to_string(), g.to_string())].into());
        }
        job.status = finished.map(|type_| JobStatus {
            conditions: Some(vec![JobCondition {
                type_: type_.into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        job
    }

    #[test]
    fn a_finished_job_runs_again_only_for_a_new_generation() {
        for end in ["Complete", "Failed"] {
            let done = job(Some(3), Some(end));
            // An operator upgrade or a changed chart value renders another Job: same generation.
            assert_eq!(task_step(Some(&done), Some(3), "other"), TaskStep::Keep);
            assert_eq!(task_step(Some(&done), Some(4), "other"), TaskStep::Replace);
        }
    }

    #[test]
    fn a_running_job_is_kept_or_its_change_refused() {
        let running = job(Some(3), None);
        assert_eq!(task_step(Some(&running), Some(3), "other"), TaskStep::Keep);
        assert_eq!(
            task_step(Some(&running), Some(4), "other"),
            TaskStep::Refuse(SPEC_CHANGED_WHILE_RUNNING)
        );
        // "Suspended" or other conditions are not an end.
        let suspended = job(Some(3), Some("Suspended"));
        assert!(matches!(
            task_step(Some(&suspended), Some(4), "other"),
            TaskStep::Refuse(_)
        ));
    }

    #[test]
    fn no_job_is_created_and_an_unannotated_one_is_kept() {
        assert_eq!(task_step(None, Some(1), "w"), TaskStep::Create);
        assert_eq!(
            task_step(Some(&job(None, Some("Complete"))), Some(9), "w"),
            TaskStep::Keep
        );
        assert_eq!(
            task_step(Some(&job(None, None)), Some(9), "w"),
            TaskStep::Keep
        );
    }

    /// A change of parallelism alone is applied in place, to a running Job or a finished one,
    /// which then does not run again; any other change of the spec changes the work.
    #[test]
    fn a_new_parallelism_is_applied_in_place() {
        let spec = |parallelism: i32, input: &str| {
            let p: InferencePipeline = serde_yaml::from_str(&format!(
                "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n  input: {{uri: 'file:///{input}'}}\n  output: {{uri: 'file:///out'}}\n  task: {{shards: 30, parallelism: {parallelism}}}\n"
            ))
            .unwrap();
            p.spec
        };
        let work = work_digest(&spec(1, "in"));
        assert_eq!(work, work_digest(&spec(8, "in")));
        assert_ne!(work, work_digest(&spec(1, "elsewhere")));
        for end in [None, Some("Complete")] {
            let mut current = job(Some(3), end);
            current
                .metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(WORK.into(), work.clone());
            assert_eq!(task_step(Some(&current), Some(4), &work), TaskStep::Rescale);
            let other = work_digest(&spec(8, "elsewhere"));
            assert_ne!(
                task_step(Some(&current), Some(4), &other),
                TaskStep::Rescale
            );
        }
    }
}
