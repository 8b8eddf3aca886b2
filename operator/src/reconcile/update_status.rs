//! Step 5: the new status announced, by an event per transition, and written.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use kube_zerocopy_contract::names;
use serde_json::json;
use tracing::debug;

use super::{record, Context, Error};
use crate::crd::{InferencePipeline, InferencePipelineStatus};
use crate::status::{self, ConditionType};

/// One event per transition: into a new phase, and into Degraded with a new reason.
pub(super) async fn announce_transitions(
    ctx: &Context,
    pipeline: &InferencePipeline,
    api: &Api<InferencePipeline>,
    new: &InferencePipelineStatus,
) {
    let old = pipeline.status.as_ref();
    if let Some(phase) = new.phase.filter(|p| old.and_then(|s| s.phase) != Some(*p)) {
        if !phase_already_written(api, &pipeline.name_any(), new).await {
            let type_ = if phase.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            record(
                ctx,
                pipeline,
                type_,
                phase.as_str(),
                status::phase_note(new),
            )
            .await;
        }
    }
    /// The reason and message of a Degraded condition that holds.
    fn degraded(s: &InferencePipelineStatus) -> Option<(&str, &str)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Degraded.as_str() && c.status == "True")
            .map(|c| (c.reason.as_str(), c.message.as_str()))
    }
    let before = old.and_then(degraded).map(|(reason, _)| reason);
    if let Some((reason, message)) = degraded(new).filter(|(reason, _)| before != Some(*reason)) {
        record(
            ctx,
            pipeline,
            EventType::Warning,
            reason,
            Some(message.into()),
        )
        .await;
    }
}

/// Writes the status by server-side apply, unless unchanged (a condition keeps its
/// transition time while it holds).
pub(super) async fn patch(
    pipeline: &InferencePipeline,
    api: &Api<InferencePipeline>,
    new: &InferencePipelineStatus,
) -> Result<(), Error> {
    // status.batches is the driver's: the operator neither writes nor compares it.
    let current = pipeline
        .status
        .clone()
        .map(|s| InferencePipelineStatus { batches: None, ..s });
    if current.as_ref() == Some(new) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": InferencePipeline::api_version(&()),
        "kind": InferencePipeline::kind(&()),
        "status": new,
    });
    match api
        .patch_status(
            &pipeline.name_any(),
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        // Deleted while this reconcile ran: there is no status left to write, nothing failed.
        Err(kube::Error::Api(e)) if e.code == 404 => {
            debug!(pipeline = %pipeline.name_any(), "deleted before its status was written");
            Ok(())
        }
        other => other.map(|_| ()).map_err(Error::PatchStatus),
    }
}

/// Whether the API server already holds `new`'s phase: a reconcile that follows its
/// predecessor's status write before the cache has it sees the old phase, and would announce
/// the same transition twice. Asked only on a transition; when the answer cannot be had, the
/// event goes out.
async fn phase_already_written(
    api: &Api<InferencePipeline>,
    name: &str,
    new: &InferencePipelineStatus,
) -> bool {
    match api.get_status(name).await {
        Ok(current) => current.status.and_then(|s| s.phase) == new.phase,
        Err(_) => false,
    }
}
