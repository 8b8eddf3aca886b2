//! The `InferencePipeline`'s status: its phase, conditions' companions, batch and shard progress,
//! and what planning found.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pending, Running, Succeeded, Failed (Task); Pending, Progressing, Ready, Degraded (Actor);
/// Blocked (both: nothing could be applied, the Degraded condition says why).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Progressing,
    Ready,
    Degraded,
    Blocked,
    /// spec.suspend is true: nothing runs until it is false.
    Suspended,
    /// The Job waits for Kueue to admit it (the pipeline's queue has no room for it yet).
    Queued,
    // A phase written by another version of the operator: read, never written, so that a
    // rollback does not stop the watch of every pipeline on one it cannot decode.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Blocked => "Blocked",
            Phase::Suspended => "Suspended",
            Phase::Queued => "Queued",
            Phase::Unknown => "Unknown",
        }
    }

    /// Nothing changes until the spec or the cluster does: the pipeline is looked at rarely.
    /// (Blocked is not: the namespace watch brings a relabelled namespace, and this covers a
    /// cache that has not caught up with it yet.)
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::Ready | Phase::Suspended
        )
    }

    /// A phase that needs a person's attention: its event is a Warning.
    pub fn is_warning(self) -> bool {
        matches!(self, Phase::Failed | Phase::Degraded | Phase::Blocked)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator observed: phase, progress, conditions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Task: shards succeeded/total. Actor: replicas available/desired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Task: the Job's shards by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardStatus>,
    /// Task without spec.task.shards: what planning found in the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_input: Option<PlannedInput>,
    /// Actor: where the replicas answer the Open Inference Protocol inside the cluster (their
    /// Service): `http://<name>-zerocopy.<namespace>.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An Actor's batch run, as its driver reports it (the driver writes this field alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchProgress>,
    /// WeightsReady, Progressing, Succeeded, Failed, Degraded, Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The pipeline's generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// How an Actor's batch run stands: written by its driver as it goes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchProgress {
    /// Shard files in the input: one batch each.
    pub total: i64,
    /// Batches whose output is written and committed (by this run, before a restart too).
    pub done: i64,
    /// Sends that failed (a replica gone, busy or broken) and went to another replica.
    pub retried: i64,
    /// Batches that could not be done, by input file, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedBatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FailedBatch {
    /// The shard file, as named under the input.
    pub input: String,
    /// Why it could not be done (the models' refusal, or the last of its failed sends).
    pub reason: String,
}

/// A Task pipeline's shards (the Indexed Job's completions) by state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ShardStatus {
    /// Shards in all (spec.task.shards, or as planned).
    pub total: i32,
    /// Shards whose output is written.
    pub succeeded: i32,
    /// Pods that failed (a shard is retried up to the Job's backoff limit).
    pub failed: i32,
    /// Pods running now.
    pub active: i32,
    /// The shards that failed every retry, as the Job lists them ("1,3-5").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_indexes: Option<String>,
}

/// What listing a Task pipeline's input found, when its Job was made.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedInput {
    /// Shard files found: the Job's completions.
    pub shards: i32,
    /// sha256 of the listing (names, sizes, versions): every shard checks that the input it
    /// reads still lists the same.
    pub input_digest: String,
}
