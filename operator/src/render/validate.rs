//! What a pipeline may not ask for, checked before anything is built: the operator's policy,
//! the worker's resources, Node sharing's one Secret, Kueue's label on an Actor.

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::ResourceRequirements;

use super::Settings;
use crate::crd::{InferencePipeline, Mode, Sharing};
use crate::policy::{self};
use crate::quantity;

/// The worker's resources must be quantities: the API server does not check them inside a
/// pipeline, and would refuse the Job with an internal error.
pub(super) fn check_resources(resources: Option<&ResourceRequirements>) -> Result<()> {
    let Some(r) = resources else { return Ok(()) };
    for (kind, list) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, value) in list.iter().flatten() {
            if !quantity::is_quantity(&value.0) {
                bail!(
                    "template.resources.{kind}.{name}: {:?} is not a quantity (such as 500m, 2 or 4Gi)",
                    value.0
                );
            }
        }
    }
    Ok(())
}

/// Why a pipeline cannot become objects. [`Error::Refused`] is the operator's policy speaking;
/// every other check says the pipeline is invalid.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error(transparent)]
    Refused(#[from] policy::Refusal),
    #[error(transparent)]
    Invalid(#[from] anyhow::Error),
}

/// Refuses what a pipeline may not ask for, before anything is built: what the operator's
/// policy forbids, resources that are not quantities, Node sharing with more than one
/// credentials Secret, an Actor queued with Kueue.
pub fn validate(pipeline: &InferencePipeline, settings: &Settings) -> Result<(), Error> {
    let spec = &pipeline.spec;
    policy::check(spec, &settings.policy)?;
    check_resources(spec.template.as_ref().and_then(|t| t.resources.as_ref()))?;
    if spec.sharing == Sharing::Node {
        spec.volume_secret()?;
    }
    if let (Mode::Actor, Some(queue)) = (spec.mode, crate::queue::queue_name(pipeline)) {
        return Err(anyhow::anyhow!(
            "the label {}={queue} queues a Task pipeline's Job with Kueue; an Actor \
             pipeline's replicas are not queued: remove the label, or use spec.suspend",
            crate::queue::QUEUE_LABEL
        )
        .into());
    }
    Ok(())
}
