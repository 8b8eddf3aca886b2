//! The planning of a Task pipeline's shards: its planning Job, carried on until it found them.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube_zerocopy_contract::names;

use super::owned::{delete_seen, foreign};
use super::task::{annotate, work_digest};
use super::{Applied, TaskJob};
use crate::crd::InferencePipeline;
use crate::plan;
use crate::queue::{self, Hold};
use crate::reconcile::Context;
use crate::status::{self, Blocked, Reason};

/// Carries the planning of a Task pipeline's shards on (see [`plan::state`]): creates this
/// generation's planning Job, deletes one of another generation, whose pod is gone, or that
/// failed a while ago (the next reconcile plans again), and says how it stands.
pub(super) async fn apply(
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
            return Ok(Applied::Blocked(blocked));
        }
    }
    let input = pipeline.spec.input.as_ref().map_or("", |i| i.uri.as_str());
    let listing = format!("planning the shards: Job {name} lists the input {input}");
    let generation = pipeline.metadata.generation;
    let uid = cached.as_ref().and_then(|j| j.metadata.uid.clone());
    let pods = ctx.pods_of(pipeline, ns, true);
    match plan::state(cached.as_deref(), &pods, generation, Timestamp::now()) {
        plan::State::Missing if queue::suspended(pipeline) => {
            Ok(Applied::Task(Box::new(TaskJob {
                hold: Some(Hold::suspended("the input's shards are not planned")),
                ..Default::default()
            })))
        }
        plan::State::Missing => {
            annotate(&mut job, generation, work_digest(&pipeline.spec), None);
            api.patch(
                &name,
                &PatchParams::apply(names::MANAGER).force(),
                &Patch::Apply(&job),
            )
            .await?;
            Ok(Applied::Planning(listing))
        }
        // A planning pod that cannot start (its input's Secret missing, an image that cannot
        // be pulled) says why, as the workers' pods do.
        plan::State::Running | plan::State::Done(_) => match status::stuck_pod(&pods) {
            Some((reason, why)) => Ok(Applied::Blocked(Blocked {
                reason,
                message: format!("planning the shards: {why}"),
            })),
            None => Ok(Applied::Planning(listing)),
        },
        plan::State::Outdated => {
            delete_seen(&api, &name, uid).await?;
            Ok(Applied::Planning(format!(
                "planning the shards again for generation {}",
                generation.unwrap_or_default()
            )))
        }
        plan::State::Failed { why, retry } => {
            if retry {
                delete_seen(&api, &name, uid).await?;
            }
            Ok(Applied::Blocked(Blocked {
                reason: Reason::InputNotPlanned,
                message: format!(
                    "planning the shards failed: {why} (Job {name}; planned again every minute, or \
                     give spec.task.shards)"
                ),
            }))
        }
    }
}
