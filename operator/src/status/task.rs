//! A Task pipeline's status, from its Indexed Job.

use k8s_openapi::api::batch::v1::Job;
use kube_zerocopy_contract::names;

use super::pods::{weights, worker_failure};
use super::{cond, Cond, ConditionType, Observed, Reason};
use crate::crd::{Phase, ShardStatus};
use crate::k8s_ext::{JobExt, COMPLETE, FAILED};

/// Why the shards run again: said by the reconcile that replaced the finished Job, then by
/// the new Job's annotation until it ends.
fn rerun(observed: &Observed) -> Option<String> {
    observed.rerun.clone().or_else(|| {
        observed
            .job?
            .metadata
            .annotations
            .as_ref()?
            .get(names::RERUN_ANNOTATION)
            .cloned()
    })
}

pub(super) fn task_status(
    job: Option<&Job>,
    observed: &Observed,
) -> (Phase, Option<ShardStatus>, Vec<Cond>) {
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
    let job_condition = |t: &str| job.and_then(|j| j.condition(t));
    let weights = weights(observed, shards.succeeded > 0);
    let mut conds = vec![];
    let phase = if job_condition(COMPLETE).is_some() {
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
    } else if let Some(c) = job_condition(FAILED) {
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
