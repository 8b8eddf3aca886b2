//! What the operator asks of the Jobs and pods it watches, said once: the Job controller's
//! conditions and a pod's phase.

use k8s_openapi::api::batch::v1::{Job, JobCondition};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

/// The Job controller's terminal conditions.
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";

pub trait JobExt {
    /// The condition of `type_` that holds (status True), if any.
    fn condition(&self, type_: &str) -> Option<&JobCondition>;

    /// Whether the Job is over: Complete or Failed.
    fn is_finished(&self) -> bool {
        self.condition(COMPLETE).is_some() || self.condition(FAILED).is_some()
    }

    /// When a finished Job finished: its completion time, or when it was marked Failed.
    fn finished_at(&self) -> Option<Timestamp>;
}

impl JobExt for Job {
    fn condition(&self, type_: &str) -> Option<&JobCondition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_ && c.status == "True")
    }

    fn finished_at(&self) -> Option<Timestamp> {
        let completed = self.status.as_ref()?.completion_time.as_ref();
        completed
            .or_else(|| self.condition(FAILED)?.last_transition_time.as_ref())
            .map(|t| t.0)
    }
}

pub trait PodExt {
    /// Whether the pod has not started all its containers yet (phase Pending).
    fn is_pending(&self) -> bool;
}

impl PodExt for Pod {
    fn is_pending(&self) -> bool {
        self.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::JobStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job(conditions: &[(&str, &str)]) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(type_, status)| JobCondition {
                            type_: (*type_).into(),
                            status: (*status).into(),
                            last_transition_time: Some(Time(Timestamp::from_second(7).unwrap())),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_condition_that_holds_ends_a_job() {
        assert!(job(&[(COMPLETE, "True")]).is_finished());
        assert!(job(&[(FAILED, "True")]).is_finished());
        assert!(!job(&[(FAILED, "False"), ("Suspended", "True")]).is_finished());
        assert!(!Job::default().is_finished());
    }

    #[test]
    fn a_failed_job_finished_when_it_was_marked_failed() {
        let at = job(&[(FAILED, "True")]).finished_at();
        assert_eq!(at, Some(Timestamp::from_second(7).unwrap()));
        assert_eq!(job(&[("Suspended", "True")]).finished_at(), None);
    }
}
