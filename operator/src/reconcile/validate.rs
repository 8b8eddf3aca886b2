//! Step 1a: what the pipeline may not ask for blocks it, with the reason a person acts on.

use crate::crd::InferencePipeline;
use crate::policy::Refusal;
use crate::render::{self, Settings};
use crate::status::{Blocked, Reason};

/// The pipeline as [`render::validate`] judges it: the operator's policy forbids
/// (ForbiddenByPolicy) or the pipeline is invalid (InvalidPipeline).
pub(super) fn validate(pipeline: &InferencePipeline, settings: &Settings) -> Result<(), Blocked> {
    render::validate(pipeline, settings).map_err(|e| blocked(&e))
}

/// A pipeline that cannot become objects, with why.
pub(super) fn blocked(error: &render::Error) -> Blocked {
    let reason = match error {
        render::Error::Refused(Refusal::Forbidden(_)) => Reason::ForbiddenByPolicy,
        render::Error::Refused(Refusal::Reserved(_)) | render::Error::Invalid(_) => {
            Reason::InvalidPipeline
        }
    };
    Blocked {
        reason,
        message: format!("cannot make the pipeline's objects: {error:#}"),
    }
}
