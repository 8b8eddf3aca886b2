//! One reconcile of an InferencePipeline, in five steps, each its own module:
//!
//! 1. [`validate`] what the pipeline asks for, and [`build`] its objects (pure, see
//!    [`crate::render`]); what a person must change blocks the pipeline with a reason;
//! 2. [`apply`] them by server-side apply, never over objects the pipeline does not own, and
//!    carry its Task Job, planning Job or batch run on;
//! 3. [`observe`] its pods (and, with Node sharing, why the node agent did not mount them);
//! 4. compute its status (pure, see [`crate::status`]);
//! 5. [`update_status`]: announce the status's transitions as events and patch it.
//!
//! Owner references make Kubernetes delete a pipeline's objects with it, so no finalizer is
//! needed. What a person must change is a condition ([`Blocked`]), not an error; errors are
//! API calls that failed, counted by step, and retried later when a person must act first.

mod apply;
mod build;
mod observe;
mod update_status;
mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use crate::batch_run;
use crate::crd::{InferencePipeline, Phase, Sharing};
use crate::k8s_ext::JobExt;
use crate::metrics::{ErrorLabels, Metrics};
use crate::render::Settings;
use crate::retry::is_transient;
use crate::status::{self};
use apply::Applied;
use kube_zerocopy_contract::names;

pub use apply::{task_step, work_digest, TaskStep, SPEC_CHANGED_WHILE_RUNNING};

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

    /// The error's labels in the operator's metrics.
    pub fn labels(&self) -> ErrorLabels {
        ErrorLabels {
            step: self.step(),
            needs_a_person: self.needs_a_person(),
        }
    }

    /// Whether a person must act before a retry can succeed (a permission the operator lacks,
    /// a CRD that is not installed, an admission webhook that refuses): retried slowly.
    pub fn needs_a_person(&self) -> bool {
        let (Error::Apply(e) | Error::PatchStatus(e) | Error::ObserveMounts(e)) = self;
        !is_transient(e)
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Caches of the Jobs and pods the operator manages, kept by watches: a reconcile reads
    /// them instead of asking the API server each time.
    pub jobs: reflector::Store<Job>,
    pub pods: reflector::Store<Pod>,
    /// Failed reconciles in a row, per pipeline: the retry backs off (see [`crate::controller::error_policy`]).
    pub failures: Mutex<HashMap<ObjectRef<InferencePipeline>, u32>>,
}

impl Context {
    /// A pipeline's pods, from the cache its watch keeps: its workers, or the pods of its
    /// helper Jobs (planning, the batch run's driver).
    pub(super) fn pods_of(
        &self,
        pipeline: &InferencePipeline,
        ns: &str,
        helpers: bool,
    ) -> Vec<Pod> {
        let name = pipeline.name_any();
        self.pods
            .state_filter(|p| {
                p.namespace().as_deref() == Some(ns)
                    && p.labels().get(names::PIPELINE_LABEL) == Some(&name)
                    && p.labels().contains_key(names::STEP_LABEL) == helpers
            })
            .iter()
            .map(|p| (**p).clone())
            .collect()
    }
}

/// One reconcile: the steps in order, timed and counted.
pub async fn reconcile(
    pipeline: Arc<InferencePipeline>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = steps(&pipeline, &ctx).await;
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::labels));
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(&*pipeline));
    }
    result
}

#[instrument(skip_all, fields(pipeline = %pipeline.name_any(), namespace = pipeline.namespace().as_deref().unwrap_or("default"), generation = pipeline.metadata.generation))]
async fn steps(pipeline: &InferencePipeline, ctx: &Context) -> Result<Action, Error> {
    let ns = pipeline.namespace().unwrap_or_else(|| "default".into());
    let plan = observe::current_plan(ctx, pipeline, &ns);
    let built = validate::validate(pipeline, &ctx.settings)
        .and_then(|()| build::build(pipeline, &ctx.settings, plan.as_ref()));
    let applied = match built {
        Ok(rendered) => apply::apply(ctx, pipeline, &ns, rendered).await?,
        Err(blocked) => Applied::Blocked(blocked),
    };
    let pods = observe::pods(ctx, pipeline, &ns);
    let mount_failure = match pipeline.spec.sharing {
        Sharing::Node => observe::mount_failure(ctx, &ns, &pods).await?,
        Sharing::Pod => None,
    };
    let observed = applied.observed(&pods, mount_failure);
    let new_status = status::compute(pipeline, &observed, Timestamp::now());
    let api: Api<InferencePipeline> = Api::namespaced(ctx.client.clone(), &ns);
    update_status::announce_transitions(ctx, pipeline, &api, &new_status).await;
    update_status::patch(pipeline, &api, &new_status).await?;
    let finished = match (new_status.phase, pipeline.spec.ttl_seconds_after_finished) {
        (Some(Phase::Succeeded | Phase::Failed), Some(ttl)) => {
            let job = match applied.job() {
                Some(job) => Some(job.clone()),
                None => ctx
                    .jobs
                    .get(&ObjectRef::new(&batch_run::driver_name(pipeline)).within(&ns))
                    .map(|j| (*j).clone()),
            };
            job.as_ref().and_then(Job::finished_at).map(|at| (at, ttl))
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

/// Records an event about `pipeline`; a failure is logged, never fatal (the status says the
/// same).
pub(super) async fn record(
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

#[cfg(test)]
mod tests {
    use super::next_look;
    use crate::crd::Phase;
    use std::time::Duration;

    #[test]
    fn settled_pipelines_are_looked_at_rarely_and_blocked_ones_every_minute() {
        assert_eq!(next_look(Some(Phase::Succeeded)), Duration::from_secs(300));
        assert_eq!(next_look(Some(Phase::Ready)), Duration::from_secs(300));
        assert_eq!(next_look(Some(Phase::Blocked)), Duration::from_secs(60));
        assert_eq!(next_look(Some(Phase::Running)), Duration::from_secs(15));
        assert_eq!(next_look(None), Duration::from_secs(15));
    }
}
