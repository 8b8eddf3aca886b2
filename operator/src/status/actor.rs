//! An Actor pipeline's status, from its Deployment and, for a batch run, its driver.

use super::pods::weights;
use super::{cond, Cond, ConditionType, Observed, Reason};
use crate::crd::{InferencePipeline, Phase};

pub(super) fn actor_status(observed: &Observed) -> (Phase, String, Vec<Cond>) {
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
pub(super) fn batch_status(
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
