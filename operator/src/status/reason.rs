//! The types and reasons of a pipeline's conditions.

/// The conditions of a pipeline's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Every pod's weight server has published the models.
    WeightsReady,
    Progressing,
    Succeeded,
    Failed,
    /// Something a person must look at: the reason says what.
    Degraded,
    /// The pipeline has what it is for: an Actor's replicas serve, a Task's or batch run's
    /// outputs are all written (`kubectl wait --for=condition=Ready`).
    Ready,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::WeightsReady => "WeightsReady",
            ConditionType::Progressing => "Progressing",
            ConditionType::Succeeded => "Succeeded",
            ConditionType::Failed => "Failed",
            ConditionType::Degraded => "Degraded",
            ConditionType::Ready => "Ready",
        }
    }
}

/// The reasons of the conditions the operator sets. (A failed Job's own reason, such as
/// BackoffLimitExceeded, is passed on as it is.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The pipeline cannot become objects (a check the schema cannot express failed).
    InvalidPipeline,
    /// The template adds what the operator's policy forbids (hostPath, a ServiceAccount).
    ForbiddenByPolicy,
    /// The API server refused the pipeline's Job, Deployment or Service.
    ObjectsRefused,
    /// An object of the pipeline's name exists and belongs to someone else: not taken over.
    ObjectNotOwned,
    /// Pods of the pipeline that the scheduler cannot place (a missing claim, no node fits).
    PodsUnschedulable,
    /// Pods whose containers cannot start (an image that cannot be pulled, a missing Secret).
    PodsNotStarting,
    /// A changed spec that a running Job cannot take.
    SpecChangeRefused,
    /// A finished Task runs again for a changed spec: Progressing, until the new Job ends.
    Rerun,
    /// A Task pipeline's input is being listed to find its shards.
    Planning,
    /// Listing the input failed (no shard files, no access): nothing runs until it can.
    InputNotPlanned,
    WeightServerFailed,
    /// The node agent refused or failed to mount a Node-sharing pod's models (its words, from
    /// the kubelet's FailedMount event).
    ModelsNotMounted,
    Published,
    Publishing,
    AllShardsSucceeded,
    JobFailed,
    Finished,
    ShardsRunning,
    Creating,
    RolledOut,
    RollingOut,
    /// spec.suspend is true: Progressing is False until it is not.
    Suspended,
    /// The Job waits for Kueue to admit it.
    WaitingForAdmission,
    /// Degraded is False.
    AsExpected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidPipeline => "InvalidPipeline",
            Reason::ForbiddenByPolicy => "ForbiddenByPolicy",
            Reason::ObjectsRefused => "ObjectsRefused",
            Reason::ObjectNotOwned => "ObjectNotOwned",
            Reason::PodsUnschedulable => "PodsUnschedulable",
            Reason::PodsNotStarting => "PodsNotStarting",
            Reason::SpecChangeRefused => "SpecChangeRefused",
            Reason::Rerun => "Rerun",
            Reason::Planning => "Planning",
            Reason::InputNotPlanned => "InputNotPlanned",
            Reason::WeightServerFailed => "WeightServerFailed",
            Reason::ModelsNotMounted => "ModelsNotMounted",
            Reason::Published => "Published",
            Reason::Publishing => "Publishing",
            Reason::AllShardsSucceeded => "AllShardsSucceeded",
            Reason::JobFailed => "JobFailed",
            Reason::Finished => "Finished",
            Reason::ShardsRunning => "ShardsRunning",
            Reason::Creating => "Creating",
            Reason::RolledOut => "RolledOut",
            Reason::RollingOut => "RollingOut",
            Reason::Suspended => "Suspended",
            Reason::WaitingForAdmission => "WaitingForAdmission",
            Reason::AsExpected => "AsExpected",
        }
    }
}

impl Reason {
    /// The weights cannot be made ready without a change: the pipeline is Degraded.
    pub(super) fn weights_failed(reason: &str) -> bool {
        [Reason::WeightServerFailed, Reason::ModelsNotMounted]
            .iter()
            .any(|r| r.as_str() == reason)
    }
}
