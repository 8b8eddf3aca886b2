//! What the pods say: whether the weights are ready, why a worker failed, why a pod cannot
//! start.

use k8s_openapi::api::core::v1::Pod;
use kube_zerocopy_contract::names;

use super::{cond, Cond, ConditionType, Observed, Reason};

/// The weights' state across the pods: ready, failing (with why), or still publishing. A worker
/// starts only once its weights are ready: its weight server's startup probe passed (Pod
/// sharing) or the node agent mounted its models (Node sharing).
pub(super) fn weights(observed: &Observed, any_worker_done: bool) -> Cond {
    let mut failure = None;
    let mut started = any_worker_done || observed.pods.iter().any(worker_started);
    for pod in observed.pods {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref());
        for s in statuses
            .into_iter()
            .flatten()
            .filter(|s| s.name == names::WEIGHT_SERVER_CONTAINER)
        {
            if s.started == Some(true) || s.ready {
                started = true;
            }
            let terminated = s
                .state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .or_else(|| s.last_state.as_ref().and_then(|st| st.terminated.as_ref()));
            if let Some(t) = terminated.filter(|t| t.exit_code != 0) {
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let why = t
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code));
                failure = Some(format!(
                    "weight server in pod {pod_name} failed: {}",
                    why.trim()
                ));
            }
        }
    }
    match (started, failure) {
        (_, Some(why)) => cond(
            ConditionType::WeightsReady,
            false,
            Reason::WeightServerFailed,
            why,
        ),
        (false, None) if observed.mount_failure.is_some() => cond(
            ConditionType::WeightsReady,
            false,
            Reason::ModelsNotMounted,
            observed.mount_failure.clone().unwrap_or_default(),
        ),
        (true, None) => cond(
            ConditionType::WeightsReady,
            true,
            Reason::Published,
            "every model is published in shared memory",
        ),
        (false, None) => cond(
            ConditionType::WeightsReady,
            false,
            Reason::Publishing,
            "the weight servers are publishing the models",
        ),
    }
}

fn worker_started(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    statuses.into_iter().flatten().any(|s| {
        s.name == names::WORKER_CONTAINER
            && s.state
                .as_ref()
                .is_some_and(|st| st.running.is_some() || st.terminated.is_some())
    })
}

/// The termination message of a worker that failed, with its pod's name.
pub(super) fn worker_failure(observed: &Observed) -> Option<String> {
    observed.pods.iter().find_map(|pod| {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        let status = statuses
            .iter()
            .find(|s| s.name == names::WORKER_CONTAINER)?;
        let terminated = status.state.as_ref()?.terminated.as_ref()?;
        let message = terminated.message.as_deref()?.trim();
        (terminated.exit_code != 0 && !message.is_empty()).then(|| {
            let pod = pod.metadata.name.as_deref().unwrap_or_default();
            format!("worker in pod {pod} failed: {message}")
        })
    })
}

/// Kubelet reasons for a container that will not start until something outside changes.
const NOT_STARTING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The first pending pod that cannot run, with the scheduler's or the kubelet's words: such
/// pods otherwise read as progress ("8 running").
pub fn stuck_pod(pods: &[Pod]) -> Option<(Reason, String)> {
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        if status.phase.as_deref() != Some("Pending") {
            continue;
        }
        let unscheduled = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(c) = unscheduled {
            let why = c
                .message
                .as_deref()
                .or(c.reason.as_deref())
                .unwrap_or("no reason given");
            return Some((
                Reason::PodsUnschedulable,
                format!("pod {name} cannot be scheduled: {why}"),
            ));
        }
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in containers {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            if let Some(reason) = waiting
                .reason
                .as_deref()
                .filter(|r| NOT_STARTING.contains(r))
            {
                let message = waiting.message.as_deref().unwrap_or_default();
                return Some((
                    Reason::PodsNotStarting,
                    format!(
                        "pod {name}: container {} cannot start: {reason}: {message}",
                        c.name
                    ),
                ));
            }
        }
    }
    None
}
