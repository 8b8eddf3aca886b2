//! The names that the operator writes on the objects it makes and that its binaries, the chart
//! and the tests find them by: field managers, labels, annotations and container names.

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "kube-zerocopy";
/// The batch-run driver's field manager when it writes its pipeline's `status.batches`.
pub const DRIVER_MANAGER: &str = "kube-zerocopy-driver";

/// Every object the operator makes carries this label with [`MANAGED_BY_VALUE`]: its watches
/// select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "kube-zerocopy";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// What a pod is for: `task`, `actor` or `driver`.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The pipeline a pod or object belongs to (its name): selects a pipeline's pods.
pub const PIPELINE_LABEL: &str = "kube-zerocopy.io/pipeline";
/// On a helper Job and its pods: the step it runs for its pipeline (see [`PLAN_STEP`],
/// [`DRIVE_STEP`]); absent on the workers.
pub const STEP_LABEL: &str = "kube-zerocopy.io/step";
pub const PLAN_STEP: &str = "plan";
pub const DRIVE_STEP: &str = "drive";

/// The pipeline generation a Job was rendered from. A Job runs again only for a new generation
/// (the user changed the spec), never because the operator renders it differently (an upgrade,
/// a changed chart value): that would overwrite a finished pipeline's outputs.
pub const GENERATION_ANNOTATION: &str = "kube-zerocopy.io/pipeline-generation";
/// A Job's annotation: the digest of the work of the pipeline it was rendered from (its spec
/// without what changes only how fast it runs).
pub const WORK_ANNOTATION: &str = "kube-zerocopy.io/work-digest";
/// A Job's annotation when it replaced a finished one for a changed spec: why all its shards
/// run again (the status says it while the Job runs).
pub const RERUN_ANNOTATION: &str = "kube-zerocopy.io/rerun";
/// A planned Task Job's annotation: the digest of the input listing its shards were planned
/// from.
pub const INPUT_DIGEST_ANNOTATION: &str = "kube-zerocopy.io/input-digest";
/// The driver Job's annotation: the batch run it drives.
pub const RUN_ANNOTATION: &str = "kube-zerocopy.io/run";
/// On a Job that the operator suspended for `spec.suspend`. It resumes only such Jobs: one that
/// another controller holds (Kueue, when it manages Jobs without its queue label too) is that
/// controller's to resume, or its pods would start without admission.
pub const SUSPENDED_BY_PIPELINE_ANNOTATION: &str = "kube-zerocopy.io/suspended-by-pipeline";

/// The weight server's container (a native sidecar) in every Pod-sharing pod.
pub const WEIGHT_SERVER_CONTAINER: &str = "weight-server";
/// The worker's container: a Task's shard or an Actor's replica.
pub const WORKER_CONTAINER: &str = "worker";
/// The planning Job's container, which lists the input's shards.
pub const PLAN_CONTAINER: &str = "plan";
/// The batch-run driver's container.
pub const DRIVER_CONTAINER: &str = "driver";
