//! Planning a Task pipeline's input when `spec.task.shards` is not given: nobody counts shard
//! files by hand. A short Job runs `kube-zerocopy-worker plan` with the input's volumes and
//! credentials (the operator never reads a pipeline's data nor its Secrets); it lists the input
//! and ends with the plan (shard count, listing digest) as its termination message, which the
//! operator reads from the pod's status. The Indexed Job is then made from the plan, which it
//! carries (completions and an annotation): each pipeline generation is planned once.
//!
//! Pure functions here; the controller carries them out.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::crd::{InferencePipeline, InferencePipelineSpec, Mode, PlannedInput};
use crate::k8s_ext::{JobExt, COMPLETE, FAILED};
use kube_zerocopy_contract::names;

/// A failed plan is tried again after this long: the input may be in place by then.
pub const RETRY_FAILED_AFTER: SignedDuration = SignedDuration::from_secs(60);
/// The label the Job controller puts on its pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// Whether the pipeline's shards must be found by planning.
pub fn needed(spec: &InferencePipelineSpec) -> bool {
    spec.mode == Mode::Task && spec.task.as_ref().and_then(|t| t.shards).is_none()
}

/// `<pipeline>-plan`: a Job's name must fit in a label value (63 characters), and
/// `<pipeline>-zerocopy-plan` would not for the longest pipeline names.
pub fn job_name(pipeline: &InferencePipeline) -> String {
    format!(
        "{}-plan",
        pipeline.metadata.name.as_deref().unwrap_or("pipeline")
    )
}

/// The plan an Indexed Job was made from, if it was planned.
pub fn of_job(job: &Job) -> Option<PlannedInput> {
    Some(PlannedInput {
        shards: job.spec.as_ref()?.completions?,
        input_digest: job
            .annotations()
            .get(names::INPUT_DIGEST_ANNOTATION)?
            .clone(),
    })
}

/// The most shards a plan may have: an Indexed Job with a backoff per index takes at most
/// 100 000 completions.
pub const MAX_SHARDS: i32 = 100_000;

/// The plan if it is one the operator can run: its pod wrote it (with the pipeline's image,
/// which a template may choose), so its bounds are checked as a spec's are.
fn checked(plan: PlannedInput) -> Result<PlannedInput, String> {
    if !(1..=MAX_SHARDS).contains(&plan.shards) {
        return Err(format!(
            "the planning pod planned {} shards; a plan has 1 to {MAX_SHARDS}",
            plan.shards
        ));
    }
    let hex = |d: &str| d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !hex(&plan.input_digest) {
        return Err("the planning pod's input digest is not a sha256 in hex".into());
    }
    Ok(plan)
}

/// Where the planning of a generation stands.
#[derive(Debug, PartialEq)]
pub enum State {
    /// No planning Job: create it.
    Missing,
    /// A planning Job of another generation: delete it, the next reconcile plans again.
    Outdated,
    Running,
    /// The plan could not be made: why, and whether it is time to try again.
    Failed {
        why: String,
        retry: bool,
    },
    Done(PlannedInput),
}

/// Where the planning Job `job` (if any) stands for `generation`, from it and its pods.
pub fn state(job: Option<&Job>, pods: &[Pod], generation: Option<i64>, now: Timestamp) -> State {
    let Some(job) = job else {
        return State::Missing;
    };
    let planned_for = job
        .annotations()
        .get(names::GENERATION_ANNOTATION)
        .and_then(|g| g.parse::<i64>().ok());
    if planned_for != generation {
        return State::Outdated;
    }
    let name = job.name_any();
    let terminated: Vec<_> = pods
        .iter()
        .filter(|p| p.labels().get(JOB_NAME_LABEL) == Some(&name))
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find(|c| c.name == names::PLAN_CONTAINER)?
                .state
                .as_ref()?
                .terminated
                .clone()
        })
        .collect();
    if let Some(ended) = job.condition(COMPLETE) {
        let plan = terminated
            .iter()
            .filter(|t| t.exit_code == 0)
            // What `kube-zerocopy-worker plan` writes is the status's own shape.
            .find_map(|t| serde_json::from_str::<PlannedInput>(t.message.as_deref()?).ok());
        match plan.map(checked) {
            Some(Ok(plan)) => return State::Done(plan),
            Some(Err(why)) => {
                return State::Failed {
                    why,
                    retry: retry_due(ended, now),
                }
            }
            None => {}
        }
    }
    // Complete without a plan to read (its pod deleted, or no termination message): as a
    // failure, tried again after a while rather than at once, over and over.
    if let Some(ended) = job.condition(COMPLETE) {
        return State::Failed {
            why: "the planning pod ended without its plan (its pod was deleted, or it wrote no \
                  termination message)"
                .into(),
            retry: retry_due(ended, now),
        };
    }
    if let Some(failed) = job.condition(FAILED) {
        // The worker's own words, else the Job's.
        let why = terminated
            .iter()
            .filter(|t| t.exit_code != 0)
            .find_map(|t| t.message.clone().filter(|m| !m.trim().is_empty()))
            .or_else(|| failed.message.clone())
            .unwrap_or_else(|| "the planning Job failed".into());
        return State::Failed {
            why: why.trim().to_owned(),
            retry: retry_due(failed, now),
        };
    }
    State::Running
}

fn retry_due(ended: &k8s_openapi::api::batch::v1::JobCondition, now: Timestamp) -> bool {
    ended
        .last_transition_time
        .as_ref()
        .is_some_and(|t| now.duration_since(t.0) >= RETRY_FAILED_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobSpec, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn job(generation: i64, condition: Option<(&str, Timestamp)>) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some("p-plan".into()),
                annotations: Some(
                    [(names::GENERATION_ANNOTATION.into(), generation.to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(JobSpec::default()),
            status: condition.map(|(type_, at)| JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    message: Some("BackoffLimitExceeded".into()),
                    last_transition_time: Some(Time(at)),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn pod(exit_code: i32, message: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some([(JOB_NAME_LABEL.into(), "p-plan".into())].into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: names::PLAN_CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code,
                            message: Some(message.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_plan_is_read_from_its_pods_termination_message() {
        let now = Timestamp::now();
        let done = job(3, Some(("Complete", now)));
        let digest = "ab12".repeat(16);
        let plan = |shards: i64, digest: &str| {
            [pod(
                0,
                &format!(r#"{{"shards":{shards},"inputDigest":"{digest}"}}"#),
            )]
        };
        let pods = plan(12, &digest);
        assert_eq!(
            state(Some(&done), &pods, Some(3), now),
            State::Done(PlannedInput {
                shards: 12,
                input_digest: digest.clone()
            })
        );
        // A plan out of bounds is a failed plan, in words.
        for (shards, digest, words) in [
            (0, digest.as_str(), "planned 0 shards"),
            (100_001, &digest, "planned 100001 shards"),
            (12, "ab12", "not a sha256"),
            (12, &"AB12".repeat(16), "not a sha256"),
        ] {
            let State::Failed { why, .. } = state(Some(&done), &plan(shards, digest), Some(3), now)
            else {
                panic!("{shards} {digest} accepted")
            };
            assert!(why.contains(words), "{why}");
        }
        // Another generation's plan: planned again.
        assert_eq!(state(Some(&done), &pods, Some(4), now), State::Outdated);
        // One whose pod is gone: after a minute, not over and over.
        assert!(matches!(
            state(Some(&done), &[], Some(3), now),
            State::Failed { retry: false, .. }
        ));
        assert_eq!(state(None, &pods, Some(3), now), State::Missing);
        assert_eq!(
            state(Some(&job(3, None)), &[], Some(3), now),
            State::Running
        );
    }

    #[test]
    fn a_failed_plan_says_the_workers_words_and_is_retried_after_a_minute() {
        let failed_at = Timestamp::now();
        let failed = job(1, Some(("Failed", failed_at)));
        let pods = [pod(
            3,
            "the input s3://b/in/ holds no .safetensors shard files\n",
        )];
        let soon = failed_at + SignedDuration::from_secs(10);
        assert_eq!(
            state(Some(&failed), &pods, Some(1), soon),
            State::Failed {
                why: "the input s3://b/in/ holds no .safetensors shard files".into(),
                retry: false
            }
        );
        let later = failed_at + RETRY_FAILED_AFTER;
        assert_eq!(
            state(Some(&failed), &[], Some(1), later),
            State::Failed {
                why: "BackoffLimitExceeded".into(),
                retry: true
            }
        );
    }
}
