//! A pipeline's status, computed from what its objects report: pure, tested without a server.
//! Conditions are built here and only here.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{InferencePipeline, InferencePipelineStatus, Mode, Phase, ShardStatus};
use crate::queue::Hold;

/// The conditions of a pipeline's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Every pod's weight server has published the models.
    WeightsReady,
    Progressing,
    Succeeded,
    Failed,
    /// Something a person must look at: the reason says what.
    Degraded,
    /// The pipeline has what it is for: an Actor's replicas serve, a Task's or batch run's
    /// outputs are all written (`kubectl wait --for=condition=Ready`).
    Ready,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::WeightsReady => "WeightsReady",
            ConditionType::Progressing => "Progressing",
            ConditionType::Succeeded => "Succeeded",
            ConditionType::Failed => "Failed",
            ConditionType::Degraded => "Degraded",
            ConditionType::Ready => "Ready",
        }
    }
}

/// The reasons of the conditions the operator sets. (A failed Job's own reason, such as
/// BackoffLimitExceeded, is passed on as it is.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The pipeline cannot become objects (a check the schema cannot express failed).
    InvalidPipeline,
    /// The template adds what the operator's policy forbids (hostPath, a ServiceAccount).
    ForbiddenByPolicy,
    /// The API server refused the pipeline's Job, Deployment or Service.
    ObjectsRefused,
    /// An object of the pipeline's name exists and belongs to someone else: not taken over.
    ObjectNotOwned,
    /// Pods of the pipeline that the scheduler cannot place (a missing claim, no node fits).
    PodsUnschedulable,
    /// Pods whose containers cannot start (an image that cannot be pulled, a missing Secret).
    PodsNotStarting,
    /// A changed spec that a running Job cannot take.
    SpecChangeRefused,
    /// A finished Task runs again for a changed spec: Progressing, until the new Job ends.
    Rerun,
    /// A Task pipeline's input is being listed to find its shards.
    Planning,
    /// Listing the input failed (no shard files, no access): nothing runs until it can.
    InputNotPlanned,
    WeightServerFailed,
    /// The node agent refused or failed to mount a Node-sharing pod's models (its words, from
    /// the kubelet's FailedMount event).
    ModelsNotMounted,
    Published,
    Publishing,
    AllShardsSucceeded,
    JobFailed,
    Finished,
    ShardsRunning,
    Creating,
    RolledOut,
    RollingOut,
    /// spec.suspend is true: Progressing is False until it is not.
    Suspended,
    /// The Job waits for Kueue to admit it.
    WaitingForAdmission,
    /// Degraded is False.
    AsExpected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidPipeline => "InvalidPipeline",
            Reason::ForbiddenByPolicy => "ForbiddenByPolicy",
            Reason::ObjectsRefused => "ObjectsRefused",
            Reason::ObjectNotOwned => "ObjectNotOwned",
            Reason::PodsUnschedulable => "PodsUnschedulable",
            Reason::PodsNotStarting => "PodsNotStarting",
            Reason::SpecChangeRefused => "SpecChangeRefused",
            Reason::Rerun => "Rerun",
            Reason::Planning => "Planning",
            Reason::InputNotPlanned => "InputNotPlanned",
            Reason::WeightServerFailed => "WeightServerFailed",
            Reason::ModelsNotMounted => "ModelsNotMounted",
            Reason::Published => "Published",
            Reason::Publishing => "Publishing",
            Reason::AllShardsSucceeded => "AllShardsSucceeded",
            Reason::JobFailed => "JobFailed",
            Reason::Finished => "Finished",
            Reason::ShardsRunning => "ShardsRunning",
            Reason::Creating => "Creating",
            Reason::RolledOut => "RolledOut",
            Reason::RollingOut => "RollingOut",
            Reason::Suspended => "Suspended",
            Reason::WaitingForAdmission => "WaitingForAdmission",
            Reason::AsExpected => "AsExpected",
        }
    }
}

/// The name of the weight server's (native sidecar) container in every pod.
pub const SIDECAR_CONTAINER: &str = "weight-server";
pub const WORKER_CONTAINER: &str = "worker";

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

impl Reason {
    /// The weights cannot be made ready without a change: the pipeline is Degraded.
    fn weights_failed(reason: &str) -> bool {
        [Reason::WeightServerFailed, Reason::ModelsNotMounted]
            .iter()
            .any(|r| r.as_str() == reason)
    }
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

/// The weights' state across the pods: ready, failing (with why), or still publishing. A worker
/// starts only once its weights are ready: its weight server's startup probe passed (Pod
/// sharing) or the node agent mounted its models (Node sharing).
fn weights(observed: &Observed, any_worker_done: bool) -> Cond {
    let mut failure = None;
    let mut started = any_worker_done || observed.pods.iter().any(worker_started);
    for pod in observed.pods {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref());
        for s in statuses
            .into_iter()
            .flatten()
            .filter(|s| s.name == SIDECAR_CONTAINER)
        {
            if s.started == Some(true) || s.ready {
                started = true;
            }
            let terminated = s
                .state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .or_else(|| s.last_state.as_ref().and_then(|st| st.terminated.as_ref()));
            if let Some(t) = terminated.filter(|t| t.exit_code != 0) {
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let why = t
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code));
                failure = Some(format!(
                    "weight server in pod {pod_name} failed: {}",
                    why.trim()
                ));
            }
        }
    }
    match (started, failure) {
        (_, Some(why)) => cond(
            ConditionType::WeightsReady,
            false,
            Reason::WeightServerFailed,
            why,
        ),
        (false, None) if observed.mount_failure.is_some() => cond(
            ConditionType::WeightsReady,
            false,
            Reason::ModelsNotMounted,
            observed.mount_failure.clone().unwrap_or_default(),
        ),
        (true, None) => cond(
            ConditionType::WeightsReady,
            true,
            Reason::Published,
            "every model is published in shared memory",
        ),
        (false, None) => cond(
            ConditionType::WeightsReady,
            false,
            Reason::Publishing,
            "the weight servers are publishing the models",
        ),
    }
}

fn worker_started(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    statuses.into_iter().flatten().any(|s| {
        s.name == WORKER_CONTAINER
            && s.state
                .as_ref()
                .is_some_and(|st| st.running.is_some() || st.terminated.is_some())
    })
}

/// The termination message of a worker that failed, with its pod's name.
fn worker_failure(observed: &Observed) -> Option<String> {
    observed.pods.iter().find_map(|pod| {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        let status = statuses.iter().find(|s| s.name == WORKER_CONTAINER)?;
        let terminated = status.state.as_ref()?.terminated.as_ref()?;
        let message = terminated.message.as_deref()?.trim();
        (terminated.exit_code != 0 && !message.is_empty()).then(|| {
            let pod = pod.metadata.name.as_deref().unwrap_or_default();
            format!("worker in pod {pod} failed: {message}")
        })
    })
}

/// Why the shards run again: said by the reconcile that replaced the finished Job, then by
/// the new Job's annotation until it ends.
fn rerun(observed: &Observed) -> Option<String> {
    observed.rerun.clone().or_else(|| {
        observed
            .job?
            .metadata
            .annotations
            .as_ref()?
            .get(crate::controller::RERUN)
            .cloned()
    })
}

fn task_status(job: Option<&Job>, observed: &Observed) -> (Phase, Option<ShardStatus>, Vec<Cond>) {
    let spec = job.and_then(|j| j.spec.as_ref());
    let total = spec.and_then(|s| s.completions).unwrap_or(0);
    let st = job.and_then(|j| j.status.as_ref());
    let shards = ShardStatus {
        total,
        succeeded: st.and_then(|s| s.succeeded).unwrap_or(0),
        failed: st.and_then(|s| s.failed).unwrap_or(0),
        active: st.and_then(|s| s.active).unwrap_or(0),
        failed_indexes: st
            .and_then(|s| s.failed_indexes.clone())
            .filter(|f| !f.is_empty()),
    };
    let job_condition = |t: &str| {
        st.and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == "True"))
    };
    let weights = weights(observed, shards.succeeded > 0);
    let mut conds = vec![];
    let phase = if job_condition("Complete").is_some() {
        conds.push(cond(
            ConditionType::Succeeded,
            true,
            Reason::AllShardsSucceeded,
            format!("{}/{} shards succeeded", shards.succeeded, total),
        ));
        conds.push(cond(
            ConditionType::Failed,
            false,
            Reason::AllShardsSucceeded,
            "",
        ));
        conds.push(cond(
            ConditionType::Progressing,
            false,
            Reason::Finished,
            "the Job is complete",
        ));
        Phase::Succeeded
    } else if let Some(c) = job_condition("Failed") {
        // The Job says which pod failed how; the worker's own message says why.
        let mut why = match worker_failure(observed) {
            Some(worker) => format!("{worker} ({})", c.message.clone().unwrap_or_default()),
            None => c.message.clone().unwrap_or_default(),
        };
        if let Some(failed) = &shards.failed_indexes {
            why = format!("shards {failed} failed every retry: {why}");
        }
        conds.push(cond(ConditionType::Succeeded, false, Reason::JobFailed, ""));
        conds.push(Cond {
            type_: ConditionType::Failed,
            status: true,
            reason: c
                .reason
                .clone()
                .unwrap_or_else(|| Reason::JobFailed.as_str().into()),
            message: why,
        });
        conds.push(cond(
            ConditionType::Progressing,
            false,
            Reason::Finished,
            "the Job failed",
        ));
        Phase::Failed
    } else {
        let progressing = match (rerun(observed), job) {
            // The progress is in the Progress column and the shards; the condition keeps why.
            (Some(why), _) => cond(ConditionType::Progressing, true, Reason::Rerun, why),
            (None, Some(_)) => cond(
                ConditionType::Progressing,
                true,
                Reason::ShardsRunning,
                format!(
                    "{}/{} shards succeeded, {} running",
                    shards.succeeded, total, shards.active
                ),
            ),
            (None, None) => match &observed.planning {
                Some(how) => cond(ConditionType::Progressing, true, Reason::Planning, how),
                None => cond(
                    ConditionType::Progressing,
                    true,
                    Reason::Creating,
                    "creating the Job",
                ),
            },
        };
        conds.push(progressing);
        if shards.active > 0 || shards.succeeded > 0 {
            Phase::Running
        } else {
            Phase::Pending
        }
    };
    let mut all = vec![weights];
    all.extend(conds);
    (phase, Some(shards), all)
}

fn actor_status(observed: &Observed) -> (Phase, String, Vec<Cond>) {
    let d = observed.deployment;
    let desired = d
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let st = d.and_then(|d| d.status.as_ref());
    let available = st.and_then(|s| s.available_replicas).unwrap_or(0);
    let updated = st.and_then(|s| s.updated_replicas).unwrap_or(0);
    let current_generation =
        st.and_then(|s| s.observed_generation) >= d.and_then(|d| d.metadata.generation);
    let rolled_out = d.is_some()
        && current_generation
        && updated == desired
        && available == desired
        && st.and_then(|s| s.replicas) == Some(desired);
    let weights = weights(observed, available > 0);
    let progress = format!("{available}/{desired}");
    let (phase, conds) = if rolled_out {
        (
            Phase::Ready,
            vec![cond(
                ConditionType::Progressing,
                false,
                Reason::RolledOut,
                format!("{available}/{desired} replicas available"),
            )],
        )
    } else {
        let degraded = Reason::weights_failed(&weights.reason);
        (
            if degraded {
                Phase::Degraded
            } else if d.is_some() {
                Phase::Progressing
            } else {
                Phase::Pending
            },
            vec![cond(
                ConditionType::Progressing,
                true,
                Reason::RollingOut,
                format!("{available}/{desired} replicas available, {updated} updated"),
            )],
        )
    };
    let mut all = vec![weights];
    all.extend(conds);
    (phase, progress, all)
}

/// An Actor's batch run: the replicas' phase until they serve, then the driver's: Running,
/// Succeeded (every batch written; the replicas are scaled away), Failed. The progress is the
/// driver's count of batches once it has reported one.
fn batch_status(
    pipeline: &InferencePipeline,
    observed: &Observed,
    driver: &crate::batch_run::State,
) -> (Phase, String, Vec<Cond>) {
    use crate::batch_run::State;
    let (replicas_phase, replicas, mut conds) = actor_status(observed);
    let batches = pipeline.status.as_ref().and_then(|s| s.batches.as_ref());
    let progress = batches.map_or(replicas.clone(), |b| {
        format!("{}/{} batches", b.done, b.total)
    });
    conds.retain(|c| c.type_ != ConditionType::Progressing);
    let (phase, progressing) = match driver {
        State::Done => (
            Phase::Succeeded,
            cond(
                ConditionType::Progressing,
                false,
                Reason::Finished,
                "every batch is written; the replicas are scaled away",
            ),
        ),
        State::Failed(job_said) => {
            let why = batches
                .and_then(|b| b.failed.first())
                .map(|f| format!("batch {} failed: {}", f.input, f.reason))
                .unwrap_or_else(|| job_said.clone());
            (
                Phase::Failed,
                cond(ConditionType::Progressing, false, Reason::JobFailed, why),
            )
        }
        State::Missing | State::Outdated | State::Running => {
            let available = observed
                .deployment
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            // One replica serving is enough for the driver to go on (one may be replaced).
            let phase = match replicas_phase {
                Phase::Ready | Phase::Progressing if available > 0 => Phase::Running,
                other => other,
            };
            (
                phase,
                cond(
                    ConditionType::Progressing,
                    true,
                    Reason::ShardsRunning,
                    format!(
                        "the driver streams the input through the replicas ({replicas} available)"
                    ),
                ),
            )
        }
    };
    conds.push(progressing);
    (phase, progress, conds)
}

/// Kubelet reasons for a container that will not start until something outside changes.
const NOT_STARTING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The first pending pod that cannot run, with the scheduler's or the kubelet's words: such
/// pods otherwise read as progress ("8 running").
pub fn stuck_pod(pods: &[Pod]) -> Option<(Reason, String)> {
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        if status.phase.as_deref() != Some("Pending") {
            continue;
        }
        let unscheduled = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(c) = unscheduled {
            let why = c
                .message
                .as_deref()
                .or(c.reason.as_deref())
                .unwrap_or("no reason given");
            return Some((
                Reason::PodsUnschedulable,
                format!("pod {name} cannot be scheduled: {why}"),
            ));
        }
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in containers {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            if let Some(reason) = waiting
                .reason
                .as_deref()
                .filter(|r| NOT_STARTING.contains(r))
            {
                let message = waiting.message.as_deref().unwrap_or_default();
                return Some((
                    Reason::PodsNotStarting,
                    format!(
                        "pod {name}: container {} cannot start: {reason}: {message}",
                        c.name
                    ),
                ));
            }
        }
    }
    None
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
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobSpec, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    fn pipeline(mode: &str) -> InferencePipeline {
        let yaml = format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, generation: 3}}\nspec:\n  mode: {mode}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n  input: {{uri: 'file:///in'}}\n  output: {{uri: 'file:///out'}}\n  task: {{shards: 4}}\n"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn job(succeeded: i32, condition: Option<&str>) -> Job {
        Job {
            spec: Some(JobSpec {
                completions: Some(4),
                ..Default::default()
            }),
            status: Some(JobStatus {
                succeeded: Some(succeeded),
                active: Some(4 - succeeded),
                conditions: condition.map(|c| {
                    vec![JobCondition {
                        type_: c.into(),
                        status: "True".into(),
                        message: Some("why".into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The status of a Task pipeline whose Job is `job` and whose pods are `pods`.
    fn with_pods(p: &InferencePipeline, job: &Job, pods: &[Pod]) -> InferencePipelineStatus {
        compute(
            p,
            &Observed {
                job: Some(job),
                pods,
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        )
    }

    fn get(s: &InferencePipelineStatus, t: ConditionType) -> &Condition {
        s.conditions.iter().find(|c| c.type_ == t.as_str()).unwrap()
    }

    #[test]
    fn task_progress_and_success() {
        let p = pipeline("Task");
        let j = job(2, None);
        let s = compute(
            &p,
            &Observed {
                job: Some(&j),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            (s.phase, s.progress.as_deref()),
            (Some(Phase::Running), Some("2/4"))
        );
        assert_eq!(get(&s, ConditionType::Progressing).status, "True");
        assert_eq!(get(&s, ConditionType::WeightsReady).status, "True");
        assert_eq!(s.observed_generation, Some(3));
        let done = job(4, Some("Complete"));
        let s = compute(
            &p,
            &Observed {
                job: Some(&done),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(get(&s, ConditionType::Succeeded).status, "True");
        let failed = job(1, Some("Failed"));
        let s = compute(
            &p,
            &Observed {
                job: Some(&failed),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(get(&s, ConditionType::Failed).message, "why");
    }

    /// `kubectl wait --for=condition=Ready`: a Task once every output is written (not while it
    /// runs, nor when it failed), an Actor once its replicas are rolled out, each with why not.
    #[test]
    fn ready_says_whether_the_pipeline_has_what_it_is_for() {
        let ready = |s: &InferencePipelineStatus| {
            let c = get(s, ConditionType::Ready);
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let p = pipeline("Task");
        let observe = |j: &Job| {
            compute(
                &p,
                &Observed {
                    job: Some(j),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            )
        };
        let (status, reason, _) = ready(&observe(&job(2, None)));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Running"));
        assert_eq!(
            ready(&observe(&job(4, Some("Complete")))),
            (
                "True".into(),
                "Succeeded".into(),
                "every output is written".into()
            )
        );
        assert_eq!(
            ready(&observe(&job(1, Some("Failed")))),
            ("False".into(), "Failed".into(), "why".into())
        );

        // Serving requests: no input or output (a batch run's are Ready only once written).
        let mut actor = pipeline("Actor");
        actor.spec.input = None;
        actor.spec.output = None;
        let deployment = |available: i32| Deployment {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(k8s_openapi::api::apps::v1::DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(2),
                updated_replicas: Some(2),
                available_replicas: Some(available),
                ..Default::default()
            }),
        };
        let serving = |available: i32| {
            let d = deployment(available);
            compute(
                &actor,
                &Observed {
                    deployment: Some(&d),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            )
        };
        assert_eq!(
            ready(&serving(2)),
            (
                "True".into(),
                "Ready".into(),
                "the replicas serve the models".into()
            )
        );
        let (status, reason, _) = ready(&serving(1));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Progressing"));
        assert_eq!(
            serving(2).url.as_deref(),
            Some("http://p-zerocopy.default.svc"),
            "where the replicas answer"
        );
        assert_eq!(observe(&job(2, None)).url, None);
    }

    #[test]
    fn a_failing_weight_server_degrades_with_its_message() {
        let p = pipeline("Task");
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p-0".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                init_container_statuses: Some(vec![ContainerStatus {
                    name: SIDECAR_CONTAINER.into(),
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some("model \"m\": sha256 mismatch".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let j = job(0, None);
        let pods = [pod];
        let s = with_pods(&p, &j, &pods);
        let w = get(&s, ConditionType::WeightsReady);
        assert_eq!(
            (w.status.as_str(), w.reason.as_str()),
            ("False", "WeightServerFailed")
        );
        assert!(
            w.message.contains("sha256 mismatch") && w.message.contains("p-0"),
            "{}",
            w.message
        );
        assert_eq!(get(&s, ConditionType::Degraded).status, "True");
    }

    /// Node sharing: no weight server. A pod waiting for the node agent's volume shows the
    /// agent's refusal; once a worker runs, its models were mounted.
    #[test]
    fn node_sharing_weights_follow_the_agents_mounts() {
        let p = pipeline("Task");
        let j = job(0, None);
        let pod = |worker: Option<ContainerState>| Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p-0".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(
                    if worker.is_some() {
                        "Running"
                    } else {
                        "Pending"
                    }
                    .into(),
                ),
                container_statuses: worker.map(|state| {
                    vec![ContainerStatus {
                        name: WORKER_CONTAINER.into(),
                        state: Some(state),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let refusal = "the node agent did not mount pod p-0's models: model \"m\": sha256 mismatch";
        let waiting = [pod(None)];
        let s = compute(
            &p,
            &Observed {
                job: Some(&j),
                pods: &waiting,
                mount_failure: Some(refusal.into()),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        for t in [ConditionType::WeightsReady, ConditionType::Degraded] {
            let c = get(&s, t);
            assert_eq!(
                (c.reason.as_str(), c.message.as_str()),
                ("ModelsNotMounted", refusal),
                "{t:?}"
            );
        }
        assert_eq!(get(&s, ConditionType::WeightsReady).status, "False");
        assert_eq!(get(&s, ConditionType::Degraded).status, "True");
        // Still mounting, nothing refused: publishing.
        let s = with_pods(&p, &j, &waiting);
        assert_eq!(get(&s, ConditionType::WeightsReady).reason, "Publishing");
        // A worker that runs had its models mounted.
        let running = [pod(Some(ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        }))];
        let s = with_pods(&p, &j, &running);
        let w = get(&s, ConditionType::WeightsReady);
        assert_eq!(
            (w.status.as_str(), w.reason.as_str()),
            ("True", "Published")
        );
    }

    /// Each phase's event says what that phase means (both Running and Succeeded said "every
    /// model is published", the first True condition's message).
    #[test]
    fn each_phase_event_says_its_own_thing() {
        let p = pipeline("Task");
        let note = |j: &Job| phase_note(&with_pods(&p, j, &[])).unwrap();
        assert_eq!(note(&job(2, None)), "2/4 shards succeeded, 2 running");
        assert_eq!(note(&job(4, Some("Complete"))), "4/4 shards succeeded");
        assert_eq!(note(&job(1, Some("Failed"))), "why");
        let pending = compute(&p, &Observed::default(), Timestamp::UNIX_EPOCH);
        assert_eq!(phase_note(&pending).unwrap(), "creating the Job");
    }

    /// A finished pipeline whose spec changed runs again: Progressing says why (the replaced
    /// Job's note, then the new Job's annotation) until the new Job ends.
    #[test]
    fn a_rerun_says_why_until_the_new_job_ends() {
        let p = pipeline("Task");
        let why = "the spec changed (generation 3) since the finished Job ran: it is replaced, and all 4 shards run again";
        let progressing = |s: &InferencePipelineStatus| {
            let c = get(s, ConditionType::Progressing);
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let rerunning = ("True".to_string(), "Rerun".to_string(), why.to_string());
        // The old Job is still on its way out: no new one yet.
        let waiting = compute(
            &p,
            &Observed {
                rerun: Some(why.into()),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(waiting.phase, Some(Phase::Pending));
        assert_eq!(progressing(&waiting), rerunning);
        let rerun_job = |succeeded, end| {
            let mut j = job(succeeded, end);
            j.metadata.annotations =
                Some([(crate::controller::RERUN.to_string(), why.to_string())].into());
            j
        };
        let running = with_pods(&p, &rerun_job(1, None), &[]);
        assert_eq!(running.phase, Some(Phase::Running));
        assert_eq!(progressing(&running), rerunning);
        let done = with_pods(&p, &rerun_job(4, Some("Complete")), &[]);
        assert_eq!(done.phase, Some(Phase::Succeeded));
        assert_eq!(progressing(&done).1, "Finished");
        // A first run is never called a re-run.
        assert_eq!(
            progressing(&with_pods(&p, &job(1, None), &[])).1,
            "ShardsRunning"
        );
    }

    /// A held pipeline says so in its phase and why in Progressing, keeping its progress; a
    /// finished one is not held any more.
    #[test]
    fn a_held_pipeline_says_why_it_does_not_run() {
        let p = pipeline("Task");
        let held = |job: &Job, hold: Hold| {
            compute(
                &p,
                &Observed {
                    job: Some(job),
                    hold: Some(hold),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            )
        };
        let suspended = held(&job(1, None), Hold::suspended("the Job is suspended"));
        assert_eq!(suspended.phase, Some(Phase::Suspended));
        assert_eq!(suspended.progress.as_deref(), Some("1/4"));
        let progressing = get(&suspended, ConditionType::Progressing);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "Suspended")
        );
        assert_eq!(
            phase_note(&suspended).as_deref(),
            Some("spec.suspend is true: the Job is suspended; set it to false to go on")
        );
        let queued = held(&job(0, None), Hold::queued("team-a", Some("no quota")));
        assert_eq!(queued.phase, Some(Phase::Queued));
        let progressing = get(&queued, ConditionType::Progressing);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "WaitingForAdmission")
        );
        assert_eq!(
            progressing.message,
            "waiting for Kueue to admit the Job in LocalQueue team-a: no quota"
        );
        let conditions: Vec<&str> = queued.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            conditions.iter().filter(|c| **c == "Progressing").count(),
            1,
            "{conditions:?}"
        );
        let done = held(&job(4, Some("Complete")), Hold::suspended("nothing"));
        assert_eq!(done.phase, Some(Phase::Succeeded));
    }

    /// A Job failed by its pod failure policy: the condition says why in the worker's words.
    #[test]
    fn a_failed_task_names_the_workers_reason() {
        let p = pipeline("Task");
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p-1".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: WORKER_CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 3,
                            message: Some("the input folder /in holds 3 shard files\n".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let failed = job(0, Some("Failed"));
        let pods = [pod];
        let s = with_pods(&p, &failed, &pods);
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(
            get(&s, ConditionType::Failed).message,
            "worker in pod p-1 failed: the input folder /in holds 3 shard files (why)"
        );
    }

    /// A pending pod with a missing claim, and one whose image cannot be pulled: Degraded with
    /// the scheduler's and the kubelet's words, where the pipeline read "Running" before.
    #[test]
    fn pods_that_cannot_run_degrade_with_their_reason() {
        let p = pipeline("Task");
        let pending = |name: &str, status: PodStatus| Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                ..status
            }),
            ..Default::default()
        };
        let unschedulable = pending(
            "p-0",
            PodStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some("persistentvolumeclaim \"sentiment-data\" not found".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        );
        let no_image = pending(
            "p-1",
            PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: WORKER_CONTAINER.into(),
                    state: Some(ContainerState {
                        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                            reason: Some("ImagePullBackOff".into()),
                            message: Some("Back-off pulling image \"x\"".into()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        );
        let j = job(0, None);
        for (pod, reason, words) in [
            (
                unschedulable,
                Reason::PodsUnschedulable,
                "pod p-0 cannot be scheduled: persistentvolumeclaim \"sentiment-data\" not found",
            ),
            (
                no_image,
                Reason::PodsNotStarting,
                "pod p-1: container worker cannot start: ImagePullBackOff",
            ),
        ] {
            let pods = [pod];
            let s = with_pods(&p, &j, &pods);
            let d = get(&s, ConditionType::Degraded);
            assert_eq!(
                (d.status.as_str(), d.reason.as_str()),
                ("True", reason.as_str())
            );
            assert!(d.message.starts_with(words), "{}", d.message);
        }
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let mut p = pipeline("Task");
        let j = job(1, None);
        let first = compute(
            &p,
            &Observed {
                job: Some(&j),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        p.status = Some(first.clone());
        let later = Timestamp::from_second(1000).unwrap();
        let second = compute(
            &p,
            &Observed {
                job: Some(&j),
                ..Default::default()
            },
            later,
        );
        assert_eq!(
            get(&second, ConditionType::Progressing).last_transition_time,
            get(&first, ConditionType::Progressing).last_transition_time
        );
        let done = job(4, Some("Complete"));
        let third = compute(
            &p,
            &Observed {
                job: Some(&done),
                ..Default::default()
            },
            later,
        );
        assert_eq!(
            get(&third, ConditionType::Progressing)
                .last_transition_time
                .0,
            later
        );
    }

    #[test]
    fn refused_objects_block_with_the_reason_until_they_are_accepted() {
        for mode in ["Task", "Actor"] {
            let mut p = pipeline(mode);
            let blocked = compute(
                &p,
                &Observed {
                    blocked: Some(Blocked {
                        reason: Reason::ObjectsRefused,
                        message: "the API server refused ...".into(),
                    }),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            );
            assert_eq!(blocked.phase, Some(Phase::Blocked), "{mode}");
            let d = get(&blocked, ConditionType::Degraded);
            assert_eq!(
                (d.status.as_str(), d.reason.as_str(), d.message.as_str()),
                (
                    "True",
                    Reason::ObjectsRefused.as_str(),
                    "the API server refused ..."
                )
            );
            for t in [ConditionType::Progressing, ConditionType::WeightsReady] {
                assert_eq!(get(&blocked, t).status, "False", "{mode} {t:?}");
            }
            // Accepted after a change: the objects are applied and the condition clears.
            p.status = Some(blocked);
            let j = job(0, None);
            let allowed = compute(
                &p,
                &Observed {
                    job: Some(&j),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            );
            assert_ne!(allowed.phase, Some(Phase::Blocked), "{mode}");
            assert_eq!(
                (
                    get(&allowed, ConditionType::Degraded).status.as_str(),
                    get(&allowed, ConditionType::Degraded).reason.as_str()
                ),
                ("False", "AsExpected")
            );
        }
    }

    #[test]
    fn refused_spec_change_is_degraded_with_the_reason() {
        let p = pipeline("Task");
        let j = job(1, None);
        let s = compute(
            &p,
            &Observed {
                job: Some(&j),
                refused: Some("a running Job cannot change".into()),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        let d = get(&s, ConditionType::Degraded);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SpecChangeRefused")
        );
    }
}
