//! Step 2: a pipeline's objects applied, each only if the pipeline owns it ([`owned`]), and
//! its Job carried on: the Task's ([`task`]), the planning Job's ([`planning`]), or the
//! Actor's replicas and batch run ([`actor`]).

mod actor;
#[cfg(test)]
mod mock_api;
mod owned;
mod planning;
mod task;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use super::{Context, Error};
use crate::batch_run;
use crate::crd::InferencePipeline;
use crate::queue::Hold;
use crate::render::Rendered;
use crate::status::{Blocked, Observed, Reason};

pub use task::{task_step, work_digest, work_of, TaskStep, SPEC_CHANGED_WHILE_RUNNING};

/// What the apply step left.
pub(super) enum Applied {
    /// Nothing was applied: the pipeline cannot become objects, the API server refused them,
    /// or one would take over an object that is not the pipeline's.
    Blocked(Blocked),
    /// A Task pipeline's shards are being planned: how it stands.
    Planning(String),
    Task(Box<TaskJob>),
    Actor(Box<ActorObjects>),
}

/// A Task pipeline's Job as it is now.
#[derive(Default)]
pub(super) struct TaskJob {
    /// None while held before it is created, or while a replaced one is on its way out.
    pub job: Option<Job>,
    /// Why the spec change was refused (a running Job cannot change).
    pub refused: Option<String>,
    /// Why every shard runs again, while the finished Job it replaces is on its way out.
    pub rerun: Option<String>,
    /// Why nothing (more) runs for now: suspended, or waiting for Kueue.
    pub hold: Option<Hold>,
}

impl TaskJob {
    fn job(job: Job) -> Self {
        TaskJob {
            job: Some(job),
            ..Default::default()
        }
    }
}

/// An Actor pipeline's Deployment as applied, and how its batch run stands.
pub(super) struct ActorObjects {
    pub deployment: Deployment,
    pub driver: Option<batch_run::State>,
    pub hold: Option<Hold>,
}

impl Applied {
    /// What the status is computed from.
    pub(super) fn observed<'a>(
        &'a self,
        pods: &'a [Pod],
        mount_failure: Option<String>,
    ) -> Observed<'a> {
        let mut observed = Observed {
            pods,
            mount_failure,
            ..Default::default()
        };
        match self {
            Applied::Blocked(blocked) => observed.blocked = Some(blocked.clone()),
            Applied::Planning(how) => observed.planning = Some(how.clone()),
            Applied::Task(task) => {
                observed.job = task.job.as_ref();
                observed.refused = task.refused.clone();
                observed.rerun = task.rerun.clone();
                observed.hold = task.hold.clone();
            }
            Applied::Actor(actor) => {
                observed.deployment = Some(&actor.deployment);
                observed.driver = actor.driver.clone();
                observed.hold = actor.hold.clone();
            }
        }
        observed
    }

    /// A Task pipeline's Job, when it has one.
    pub(super) fn job(&self) -> Option<&Job> {
        match self {
            Applied::Task(task) => task.job.as_ref(),
            _ => None,
        }
    }
}

/// Applies a pipeline's objects. Objects the API server refuses block the pipeline with the
/// reason (its status and an event say it): a person must change it, and a change of the spec
/// brings a reconcile at once. Only errors that may pass on retry are returned as errors.
pub(super) async fn apply(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    rendered: Rendered,
) -> Result<Applied, Error> {
    let applied = match rendered {
        Rendered::Task { job } => task::apply(ctx, pipeline, ns, *job).await,
        Rendered::Plan { job } => planning::apply(ctx, pipeline, ns, *job).await,
        actor @ Rendered::Actor { .. } => {
            let objects = actor::Objects::of(actor).expect("an Actor's objects");
            actor::apply(ctx, pipeline, ns, objects).await
        }
    };
    match applied {
        Ok(applied) => Ok(applied),
        Err(kube::Error::Api(e)) if refusal_is_final(e.code) => Ok(Applied::Blocked(Blocked {
            reason: Reason::ObjectsRefused,
            message: format!(
                "the API server refused the pipeline's objects: {}",
                e.message
            ),
        })),
        Err(e) => Err(Error::Apply(e)),
    }
}

/// Whether the API server's refusal of an object will stand on retry: anything but throttling
/// and a server or gateway that is away. A 500 stands: the API server answers some invalid
/// objects with one (a malformed quantity in a Job).
fn refusal_is_final(code: u16) -> bool {
    !matches!(code, 429 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::refusal_is_final;

    #[test]
    fn a_refused_object_blocks_unless_the_api_server_is_away() {
        for code in [400, 403, 422, 500] {
            assert!(refusal_is_final(code), "{code}");
        }
        for code in [429, 502, 503, 504] {
            assert!(!refusal_is_final(code), "{code}");
        }
    }
}
