//! A pipeline's status, computed from what its objects report: pure, tested without a server.
//! Conditions are built here and only here.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{InferencePipeline, InferencePipelineStatus, Mode, ShardStatus};

pub const WEIGHTS_READY: &str = "WeightsReady";
pub const PROGRESSING: &str = "Progressing";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";
pub const DEGRADED: &str = "Degraded";

/// Degraded (and the others) when the namespace's Pod Security level forbids Node sharing.
pub const POD_SECURITY_FORBIDS_NODE_SHARING: &str = "PodSecurityForbidsNodeSharing";
/// The pipeline cannot become objects (a check the schema cannot express failed).
pub const INVALID_PIPELINE: &str = "InvalidPipeline";
/// The template adds what the operator's policy forbids (hostPath, a ServiceAccount).
pub const FORBIDDEN_BY_POLICY: &str = "ForbiddenByPolicy";
/// The API server refused the pipeline's Job, Deployment or Service.
pub const OBJECTS_REFUSED: &str = "ObjectsRefused";
/// Pods of the pipeline that the scheduler cannot place (a missing claim, no node fits).
pub const PODS_UNSCHEDULABLE: &str = "PodsUnschedulable";
/// Pods whose containers cannot start (an image that cannot be pulled, a missing Secret).
pub const PODS_NOT_STARTING: &str = "PodsNotStarting";
/// An object of the pipeline's name exists and belongs to someone else: it is not taken over.
pub const OBJECT_NOT_OWNED: &str = "ObjectNotOwned";

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
    /// Set when nothing could be applied: the namespace's Pod Security level forbids the pods
    /// (see [`crate::pod_security`]), or the pipeline's objects cannot be made or were refused.
    pub blocked: Option<Blocked>,
}

/// Why nothing of a pipeline runs: a condition reason and a message a user can act on.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

struct Cond {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

fn cond(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// The weight servers' state across the pods: ready, failing (with why), or still publishing.
fn weights(observed: &Observed, any_worker_done: bool) -> Cond {
    let mut failure = None;
    let mut started = any_worker_done;
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
        (_, Some(why)) => cond(WEIGHTS_READY, false, "WeightServerFailed", why),
        (true, None) => cond(
            WEIGHTS_READY,
            true,
            "Published",
            "every model is published in shared memory",
        ),
        (false, None) => cond(
            WEIGHTS_READY,
            false,
            "Publishing",
            "the weight servers are publishing the models",
        ),
    }
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

fn task_status(job: Option<&Job>, observed: &Observed) -> (String, Option<ShardStatus>, Vec<Cond>) {
    let spec = job.and_then(|j| j.spec.as_ref());
    let total = spec.and_then(|s| s.completions).unwrap_or(0);
    let st = job.and_then(|j| j.status.as_ref());
    let shards = ShardStatus {
        total,
        succeeded: st.and_then(|s| s.succeeded).unwrap_or(0),
        failed: st.and_then(|s| s.failed).unwrap_or(0),
        active: st.and_then(|s| s.active).unwrap_or(0),
    };
    let job_condition = |t: &str| {
        st.and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == "True"))
    };
    let weights = weights(observed, shards.succeeded > 0);
    let mut conds = vec![];
    let phase = if job_condition("Complete").is_some() {
        conds.push(cond(
            SUCCEEDED,
            true,
            "AllShardsSucceeded",
            format!("{}/{} shards succeeded", shards.succeeded, total),
        ));
        conds.push(cond(FAILED, false, "AllShardsSucceeded", ""));
        conds.push(cond(PROGRESSING, false, "Finished", "the Job is complete"));
        "Succeeded"
    } else if let Some(c) = job_condition("Failed") {
        // The Job says which pod failed how; the worker's own message says why.
        let why = match worker_failure(observed) {
            Some(worker) => format!("{worker} ({})", c.message.clone().unwrap_or_default()),
            None => c.message.clone().unwrap_or_default(),
        };
        conds.push(cond(SUCCEEDED, false, "JobFailed", ""));
        conds.push(cond(
            FAILED,
            true,
            c.reason.as_deref().unwrap_or("JobFailed"),
            why,
        ));
        conds.push(cond(PROGRESSING, false, "Finished", "the Job failed"));
        "Failed"
    } else if job.is_some() {
        conds.push(cond(
            PROGRESSING,
            true,
            "ShardsRunning",
            format!(
                "{}/{} shards succeeded, {} running",
                shards.succeeded, total, shards.active
            ),
        ));
        if shards.active > 0 || shards.succeeded > 0 {
            "Running"
        } else {
            "Pending"
        }
    } else {
        conds.push(cond(PROGRESSING, true, "Creating", "creating the Job"));
        "Pending"
    };
    let mut all = vec![weights];
    all.extend(conds);
    (phase.into(), Some(shards), all)
}

fn actor_status(observed: &Observed) -> (String, String, Vec<Cond>) {
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
            "Ready",
            vec![cond(
                PROGRESSING,
                false,
                "RolledOut",
                format!("{available}/{desired} replicas available"),
            )],
        )
    } else {
        let degraded = weights.reason == "WeightServerFailed";
        (
            if degraded {
                "Degraded"
            } else if d.is_some() {
                "Progressing"
            } else {
                "Pending"
            },
            vec![cond(
                PROGRESSING,
                true,
                "RollingOut",
                format!("{available}/{desired} replicas available, {updated} updated"),
            )],
        )
    };
    let mut all = vec![weights];
    all.extend(conds);
    (phase.into(), progress, all)
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
fn stuck_pod(pods: &[Pod]) -> Option<(&'static str, String)> {
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
                PODS_UNSCHEDULABLE,
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
                    PODS_NOT_STARTING,
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
                cond(WEIGHTS_READY, false, blocked.reason, no_pods),
                cond(PROGRESSING, false, blocked.reason, no_pods),
            ];
            ("Blocked".to_string(), None, None, conds)
        }
        (None, Mode::Task) => {
            let (phase, shards, conds) = task_status(observed.job, observed);
            let progress = shards
                .as_ref()
                .map(|s| format!("{}/{}", s.succeeded, s.total));
            (phase, progress, shards, conds)
        }
        (None, Mode::Actor) => {
            let (phase, progress, conds) = actor_status(observed);
            (phase, Some(progress), None, conds)
        }
    };
    let weights_failed = conds
        .iter()
        .any(|c| c.type_ == WEIGHTS_READY && c.reason == "WeightServerFailed");
    let stuck = stuck_pod(observed.pods);
    let degraded = match (&observed.blocked, &observed.refused, weights_failed, stuck) {
        (Some(blocked), ..) => cond(DEGRADED, true, blocked.reason, blocked.message.clone()),
        (None, Some(why), ..) => cond(DEGRADED, true, "SpecChangeRefused", why.clone()),
        (None, None, true, _) => cond(
            DEGRADED,
            true,
            "WeightServerFailed",
            "a weight server cannot publish the models",
        ),
        (None, None, false, Some((reason, why))) => cond(DEGRADED, true, reason, why),
        (None, None, false, None) => cond(DEGRADED, false, "AsExpected", ""),
    };
    if degraded.status
        && pipeline.spec.mode == Mode::Actor
        && !matches!(phase.as_str(), "Ready" | "Blocked")
    {
        phase = "Degraded".into();
    }
    conds.push(degraded);

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
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.into(),
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
        conditions,
        observed_generation: generation,
    }
}

/// What the event of a transition into `status`'s phase says: the message of the condition that
/// phase stands for (each phase its own), else the progress.
pub fn phase_note(status: &InferencePipelineStatus) -> Option<String> {
    let condition = match status.phase.as_deref() {
        Some("Succeeded") => SUCCEEDED,
        Some("Failed") => FAILED,
        Some("Blocked" | "Degraded") => DEGRADED,
        _ => PROGRESSING,
    };
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition && !c.message.is_empty())
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

    fn get<'a>(s: &'a InferencePipelineStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
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
            (s.phase.as_deref(), s.progress.as_deref()),
            (Some("Running"), Some("2/4"))
        );
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert_eq!(get(&s, WEIGHTS_READY).status, "True");
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
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(get(&s, SUCCEEDED).status, "True");
        let failed = job(1, Some("Failed"));
        let s = compute(
            &p,
            &Observed {
                job: Some(&failed),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(get(&s, FAILED).message, "why");
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
        let w = get(&s, WEIGHTS_READY);
        assert_eq!(
            (w.status.as_str(), w.reason.as_str()),
            ("False", "WeightServerFailed")
        );
        assert!(
            w.message.contains("sha256 mismatch") && w.message.contains("p-0"),
            "{}",
            w.message
        );
        assert_eq!(get(&s, DEGRADED).status, "True");
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
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(
            get(&s, FAILED).message,
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
                PODS_UNSCHEDULABLE,
                "pod p-0 cannot be scheduled: persistentvolumeclaim \"sentiment-data\" not found",
            ),
            (
                no_image,
                PODS_NOT_STARTING,
                "pod p-1: container worker cannot start: ImagePullBackOff",
            ),
        ] {
            let pods = [pod];
            let s = with_pods(&p, &j, &pods);
            let d = get(&s, DEGRADED);
            assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", reason));
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
            get(&second, PROGRESSING).last_transition_time,
            get(&first, PROGRESSING).last_transition_time
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
        assert_eq!(get(&third, PROGRESSING).last_transition_time.0, later);
    }

    #[test]
    fn a_namespace_that_forbids_the_pods_blocks_with_the_reason_until_it_allows_them() {
        for mode in ["Task", "Actor"] {
            let mut p = pipeline(mode);
            let blocked = compute(
                &p,
                &Observed {
                    blocked: Some(Blocked {
                        reason: POD_SECURITY_FORBIDS_NODE_SHARING,
                        message: "namespace ml enforces ...".into(),
                    }),
                    ..Default::default()
                },
                Timestamp::UNIX_EPOCH,
            );
            assert_eq!(blocked.phase.as_deref(), Some("Blocked"), "{mode}");
            let d = get(&blocked, DEGRADED);
            assert_eq!(
                (d.status.as_str(), d.reason.as_str(), d.message.as_str()),
                (
                    "True",
                    POD_SECURITY_FORBIDS_NODE_SHARING,
                    "namespace ml enforces ..."
                )
            );
            for t in [PROGRESSING, WEIGHTS_READY] {
                assert_eq!(get(&blocked, t).status, "False", "{mode} {t}");
            }
            // Allowed again: the objects are applied and the condition clears.
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
            assert_ne!(allowed.phase.as_deref(), Some("Blocked"), "{mode}");
            assert_eq!(
                (
                    get(&allowed, DEGRADED).status.as_str(),
                    get(&allowed, DEGRADED).reason.as_str()
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
        let d = get(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SpecChangeRefused")
        );
    }
}
