//! A pipeline's status, computed from what its objects report: pure, tested without a server.
//! Conditions are built here and only here: the [`reason`]s, the weights and pods' troubles
//! ([`pods`]), a Task's Job ([`task`]) and an Actor's replicas and batch run ([`actor`]).

mod actor;
mod pods;
mod reason;
mod task;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{InferencePipeline, InferencePipelineStatus, Mode, Phase};
use crate::queue::Hold;
use actor::{actor_status, batch_status};
use task::task_status;

pub use pods::stuck_pod;
pub use reason::{ConditionType, Reason};

/// What the operator saw of a pipeline's objects.
#[derive(Default)]
pub struct Observed<'a> {
    pub job: Option<&'a Job>,
    pub deployment: Option<&'a Deployment>,
    pub pods: &'a [Pod],
    /// Set when the operator refused to apply the spec (e.g. a running Job cannot change).
    pub refused: Option<String>,
    /// Set when the finished Job was replaced for a changed spec but the new one could not be
    /// created yet: why every shard runs again. (Once created, the new Job carries it.)
    pub rerun: Option<String>,
    /// Set when nothing could be applied: the pipeline's objects cannot be made, were refused,
    /// or would take over another's.
    pub blocked: Option<Blocked>,
    /// While the shards are planned: how it stands (no Job yet).
    pub planning: Option<String>,
    /// An Actor's batch run: how its driver stands.
    pub driver: Option<crate::batch_run::State>,
    /// Node sharing: why the node agent did not mount a pod's models (the latest FailedMount
    /// of the pipeline's waiting pods), with the pod's name.
    pub mount_failure: Option<String>,
    /// Why nothing (more) runs for now: spec.suspend, or a Job Kueue has not admitted.
    pub hold: Option<crate::queue::Hold>,
}

/// Why nothing of a pipeline runs: a condition reason and a message a user can act on.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub reason: Reason,
    pub message: String,
}

struct Cond {
    type_: ConditionType,
    status: bool,
    reason: String,
    message: String,
}

fn cond(type_: ConditionType, status: bool, reason: Reason, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status,
        reason: reason.as_str().into(),
        message: message.into(),
    }
}

/// The new status. Conditions keep their last transition time while their status holds.
pub fn compute(
    pipeline: &InferencePipeline,
    observed: &Observed,
    now: Timestamp,
) -> InferencePipelineStatus {
    let (mut phase, progress, shards, mut conds) = match (&observed.blocked, pipeline.spec.mode) {
        // Nothing was applied. Phase Blocked: not Pending, which says it is on its way, nor
        // Failed, which is final; it goes on by itself once the namespace allows the pods or
        // the spec is fixed. Degraded says why, as for the other spec the operator refuses.
        (Some(blocked), _) => {
            let no_pods = "nothing runs (see Degraded)";
            let conds = vec![
                cond(ConditionType::WeightsReady, false, blocked.reason, no_pods),
                cond(ConditionType::Progressing, false, blocked.reason, no_pods),
            ];
            (Phase::Blocked, None, None, conds)
        }
        (None, Mode::Task) => {
            let (phase, shards, conds) = task_status(observed.job, observed);
            let progress = shards
                .as_ref()
                .map(|s| format!("{}/{}", s.succeeded, s.total));
            (phase, progress, shards, conds)
        }
        (None, Mode::Actor) => match &observed.driver {
            Some(driver) => {
                let (phase, progress, conds) = batch_status(pipeline, observed, driver);
                (phase, Some(progress), None, conds)
            }
            None => {
                let (phase, progress, conds) = actor_status(observed);
                (phase, Some(progress), None, conds)
            }
        },
    };
    let weights_failed = conds
        .iter()
        .find(|c| c.type_ == ConditionType::WeightsReady && Reason::weights_failed(&c.reason))
        .map(|c| (c.reason.clone(), c.message.clone()));
    let stuck = stuck_pod(observed.pods);
    let degraded = match (&observed.blocked, &observed.refused, weights_failed, stuck) {
        (Some(blocked), ..) => cond(
            ConditionType::Degraded,
            true,
            blocked.reason,
            blocked.message.clone(),
        ),
        (None, Some(why), ..) => cond(
            ConditionType::Degraded,
            true,
            Reason::SpecChangeRefused,
            why.clone(),
        ),
        (None, None, Some((reason, why)), _) => Cond {
            type_: ConditionType::Degraded,
            status: true,
            message: if reason == Reason::WeightServerFailed.as_str() {
                "a weight server cannot publish the models".into()
            } else {
                why
            },
            reason,
        },
        (None, None, None, Some((reason, why))) => cond(ConditionType::Degraded, true, reason, why),
        (None, None, None, None) => cond(ConditionType::Degraded, false, Reason::AsExpected, ""),
    };
    if degraded.status
        && pipeline.spec.mode == Mode::Actor
        && !matches!(phase, Phase::Ready | Phase::Blocked)
    {
        phase = Phase::Degraded;
    }
    conds.push(degraded);
    // Held, unless it is over or cannot be made: the phase says so, Progressing says why.
    if let Some(hold) = &observed.hold {
        if !matches!(phase, Phase::Succeeded | Phase::Failed | Phase::Blocked) {
            let (held, progressing) = match hold {
                Hold::Suspended(why) => (
                    Phase::Suspended,
                    cond(ConditionType::Progressing, false, Reason::Suspended, why),
                ),
                Hold::Queued(why) => (
                    Phase::Queued,
                    cond(
                        ConditionType::Progressing,
                        true,
                        Reason::WaitingForAdmission,
                        why,
                    ),
                ),
            };
            phase = held;
            match conds
                .iter_mut()
                .find(|c| c.type_ == ConditionType::Progressing)
            {
                Some(c) => *c = progressing,
                None => conds.push(progressing),
            }
        }
    }
    let ready = ready(crate::batch_run::is_batch(pipeline), phase, &conds);
    conds.push(ready);

    let previous = pipeline
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = pipeline.metadata.generation;
    let conditions = conds
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" }.to_string();
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_.as_str() && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.as_str().into(),
                status,
                reason: c.reason,
                message: c.message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    InferencePipelineStatus {
        phase: Some(phase),
        progress,
        shards,
        planned_input: observed.job.and_then(crate::plan::of_job),
        url: (pipeline.spec.mode == Mode::Actor).then(|| service_url(pipeline)),
        batches: None,
        conditions,
        observed_generation: generation,
    }
}

/// Where an Actor pipeline's replicas answer inside the cluster: its Service's DNS name.
fn service_url(pipeline: &InferencePipeline) -> String {
    format!(
        "http://{}.{}.svc",
        crate::render::object_name(pipeline),
        pipeline.metadata.namespace.as_deref().unwrap_or("default")
    )
}

/// The Ready condition of a pipeline in `phase` with the other conditions `conds`: True once
/// an Actor (not a batch run) is Ready or a pipeline has Succeeded. Its reason is the phase;
/// while not ready, its message is what the condition of trouble or progress says.
fn ready(is_batch: bool, phase: Phase, conds: &[Cond]) -> Cond {
    let said = |type_: ConditionType| {
        conds
            .iter()
            .find(|c| c.type_ == type_ && c.status && !c.message.is_empty())
            .map(|c| c.message.clone())
    };
    let (status, message) = match phase {
        Phase::Ready if !is_batch => (true, "the replicas serve the models".to_owned()),
        Phase::Succeeded => (true, "every output is written".to_owned()),
        _ => (
            false,
            said(ConditionType::Failed)
                .or_else(|| said(ConditionType::Degraded))
                .or_else(|| {
                    conds
                        .iter()
                        .find(|c| c.type_ == ConditionType::Progressing)
                        .map(|c| c.message.clone())
                })
                .unwrap_or_default(),
        ),
    };
    Cond {
        type_: ConditionType::Ready,
        status,
        reason: phase.as_str().to_owned(),
        message,
    }
}

/// What the event of a transition into `status`'s phase says: the message of the condition that
/// phase stands for (each phase its own), else the progress.
pub fn phase_note(status: &InferencePipelineStatus) -> Option<String> {
    let condition = match status.phase {
        Some(Phase::Succeeded) => ConditionType::Succeeded,
        Some(Phase::Failed) => ConditionType::Failed,
        Some(Phase::Blocked | Phase::Degraded) => ConditionType::Degraded,
        _ => ConditionType::Progressing,
    };
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition.as_str() && !c.message.is_empty())
        .map(|c| c.message.clone())
        .or_else(|| status.progress.clone())
}

#[cfg(test)]
mod tests;
