//! Step 1b: the objects of a valid pipeline, given its shards' plan once planning found it.

use crate::crd::{InferencePipeline, PlannedInput};
use crate::render::{self, Rendered, Settings};
use crate::status::Blocked;

/// [`render::build`]; a pipeline whose objects cannot be made (a planned shard count its name
/// cannot carry) is blocked, as an invalid one is.
pub(super) fn build(
    pipeline: &InferencePipeline,
    settings: &Settings,
    plan: Option<&PlannedInput>,
) -> Result<Rendered, Blocked> {
    render::build(pipeline, settings, plan)
        .map_err(|e| super::validate::blocked(&render::Error::Invalid(e)))
}
