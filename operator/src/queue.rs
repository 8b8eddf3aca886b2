//! Holding a pipeline back: `spec.suspend`, and admission by Kueue through its queue label.
//!
//! Kueue admits a Job that carries the label `kueue.x-k8s.io/queue-name` and was created
//! suspended: it creates a Workload for it (labelled with the Job's uid), waits until the
//! LocalQueue's ClusterQueue has quota, then unsuspends the Job. From then on the Job's
//! `suspend` is Kueue's: the operator creates the Job suspended once and never sets it again,
//! and suspends a queued pipeline by deactivating its Workload (Kueue then suspends the Job and
//! releases the quota), as Kueue's own users do.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::Client;
use serde_json::json;

use crate::crd::InferencePipeline;
use kube_zerocopy_contract::names;

/// The label that names the LocalQueue a Job waits in, as Kueue reads it.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The label that names the Workload's priority class: passed on with the queue's.
pub const PRIORITY_LABEL: &str = "kueue.x-k8s.io/priority-class";
/// The label Kueue gives a Workload: the uid of the Job it stands for.
const JOB_UID_LABEL: &str = "kueue.x-k8s.io/job-uid";

/// The LocalQueue the pipeline asks for (its label), if any.
pub fn queue_name(pipeline: &InferencePipeline) -> Option<&str> {
    pipeline
        .metadata
        .labels
        .as_ref()?
        .get(QUEUE_LABEL)
        .map(String::as_str)
        .filter(|q| !q.is_empty())
}

/// The Kueue labels of the pipeline, to be put on its Job.
pub fn kueue_labels(pipeline: &InferencePipeline) -> Vec<(String, String)> {
    let labels = pipeline.metadata.labels.iter().flatten();
    labels
        .filter(|(k, v)| (*k == QUEUE_LABEL || *k == PRIORITY_LABEL) && !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn suspended(pipeline: &InferencePipeline) -> bool {
    pipeline.spec.suspend == Some(true)
}

/// What the operator sets a running Job's spec.suspend to, if anything, for a pipeline that is
/// (`suspend`) or is not suspended.
pub fn suspend_change(job: &Job, suspend: bool) -> Option<bool> {
    let current = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let ours = job
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(names::SUSPENDED_BY_PIPELINE_ANNOTATION));
    match (suspend, current) {
        (true, false) => Some(true),
        (false, true) if ours => Some(false),
        _ => None,
    }
}

/// Whether another controller holds `job` suspended (see [`names::SUSPENDED_BY_PIPELINE_ANNOTATION`]).
pub fn held_by_another(job: &Job) -> bool {
    let suspended = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    suspended && suspend_change(job, false).is_none()
}

/// Why nothing (more) runs for now, when that is so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// spec.suspend is true: what is held, in words.
    Suspended(String),
    /// The Job waits for Kueue: in which queue, and the Workload's own words when it has some.
    Queued(String),
}

impl Hold {
    pub fn suspended(what: &str) -> Hold {
        Hold::Suspended(format!(
            "spec.suspend is true: {what}; set it to false to go on"
        ))
    }

    /// A Job without the queue label that another controller suspended.
    pub fn held_by_another() -> Hold {
        Hold::Queued(
            "the Job was suspended by another controller (Kueue, where it manages Jobs without \
             a queue label), which resumes it once it admits it; kube-zerocopy resumes only the \
             Jobs it suspended"
                .into(),
        )
    }

    /// A Job that waits for admission in `queue`; `why` is the Workload's pending message.
    pub fn queued(queue: &str, why: Option<&str>) -> Hold {
        let mut message = format!("waiting for Kueue to admit the Job in LocalQueue {queue}");
        if let Some(why) = why.filter(|w| !w.is_empty()) {
            message.push_str(": ");
            message.push_str(why);
        }
        Hold::Queued(message)
    }
}

fn workloads(client: Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", "Workload");
    Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk))
}

/// The Workload Kueue made for `job`, if it has made one yet (none where Kueue is not
/// installed: its API is then missing).
pub async fn workload_of(
    client: Client,
    ns: &str,
    job: &Job,
) -> Result<Option<DynamicObject>, kube::Error> {
    let Some(uid) = job.metadata.uid.as_deref() else {
        return Ok(None);
    };
    let listed = workloads(client, ns)
        .list(&ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")))
        .await;
    match listed {
        Ok(list) => Ok(list.items.into_iter().next()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why Kueue has not admitted a Workload yet: the message of its QuotaReserved condition
/// while that is False (e.g. "couldn't assign flavors to pod set main: insufficient unused
/// quota for cpu in flavor default-flavor, 1 more needed").
pub fn pending_reason(workload: &DynamicObject) -> Option<String> {
    workload.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "QuotaReserved" && c["status"] == "False")
        .and_then(|c| c["message"].as_str())
        .map(str::to_owned)
}

/// How long after a queued Job's creation Kueue is expected to have made its Workload.
const WORKLOAD_EXPECTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a queued Job waits, from its Workload: Kueue's words; with no Workload long after the
/// Job was made (`job_age`), what makes one (Kueue, within a second, when it runs and manages
/// batch/job); nothing to add before then.
pub fn waiting_reason(
    workload: Option<&DynamicObject>,
    job_age: std::time::Duration,
) -> Option<String> {
    match workload {
        Some(workload) => pending_reason(workload),
        None if job_age >= WORKLOAD_EXPECTED_WITHIN => Some(format!(
            "Kueue has made no Workload for it in {} s (is Kueue running, with batch/job among \
             its integrations?)",
            job_age.as_secs()
        )),
        None => None,
    }
}

/// Whether Kueue may admit the Workload (spec.active, true unless set).
pub fn is_active(workload: &DynamicObject) -> bool {
    workload.data["spec"]["active"].as_bool().unwrap_or(true)
}

/// Activates or deactivates a Workload: deactivated, Kueue evicts it (suspends its Job,
/// releases its quota); activated again, it queues anew.
pub async fn set_active(
    client: Client,
    ns: &str,
    workload: &DynamicObject,
    active: bool,
) -> Result<(), kube::Error> {
    let name = workload.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({"spec": {"active": active}});
    workloads(client, ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {

    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_job_the_operator_suspended_is_resumed_by_it() {
        let job = |suspend: bool, ours: bool| -> Job {
            let annotations = if ours {
                json!({names::SUSPENDED_BY_PIPELINE_ANNOTATION: "true"})
            } else {
                json!({})
            };
            serde_json::from_value(json!({
                "metadata": {"name": "p-zerocopy", "annotations": annotations},
                "spec": {"suspend": suspend, "template": {}},
            }))
            .unwrap()
        };
        assert_eq!(suspend_change(&job(false, false), true), Some(true));
        assert_eq!(suspend_change(&job(true, true), false), Some(false));
        // Suspended by Kueue (no annotation): left for Kueue to resume, and said so.
        assert_eq!(suspend_change(&job(true, false), false), None);
        assert!(held_by_another(&job(true, false)));
        assert!(!held_by_another(&job(true, true)));
        assert!(!held_by_another(&job(false, false)));
        assert_eq!(suspend_change(&job(true, false), true), None);
        assert_eq!(suspend_change(&job(false, false), false), None);
    }

    fn workload(data: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "Workload",
            "metadata": {"name": "job-batch-zerocopy-1a2b3"},
            "spec": data["spec"],
            "status": data["status"],
        }))
        .unwrap()
    }

    #[test]
    fn a_pending_workload_says_why_in_kueues_words() {
        let pending = workload(json!({
            "spec": {},
            "status": {"conditions": [{
                "type": "QuotaReserved", "status": "False", "reason": "Pending",
                "message": "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor, 1 more needed",
            }]},
        }));
        assert_eq!(
            Hold::queued("team-a", pending_reason(&pending).as_deref()),
            Hold::Queued(
                "waiting for Kueue to admit the Job in LocalQueue team-a: couldn't assign \
                 flavors to pod set main: insufficient unused quota for cpu in flavor \
                 default-flavor, 1 more needed"
                    .into()
            )
        );
        assert!(is_active(&pending));
        let admitted = workload(json!({
            "spec": {"active": false},
            "status": {"conditions": [{"type": "QuotaReserved", "status": "True", "message": "Quota reserved in ClusterQueue cq"}]},
        }));
        let (now, later) = (Duration::from_secs(1), Duration::from_secs(45));
        assert_eq!(waiting_reason(Some(&admitted), later), None);
        assert_eq!(waiting_reason(None, now), None);
        assert_eq!(
            waiting_reason(None, later).as_deref(),
            Some(
                "Kueue has made no Workload for it in 45 s (is Kueue running, with batch/job \
                 among its integrations?)"
            )
        );
        assert!(!is_active(&admitted));
        assert_eq!(
            Hold::queued("team-a", None),
            Hold::Queued("waiting for Kueue to admit the Job in LocalQueue team-a".into())
        );
    }

    #[test]
    fn only_kueues_own_labels_are_passed_on() {
        let pipeline: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata:\n  name: p\n  labels: {kueue.x-k8s.io/queue-name: team-a, kueue.x-k8s.io/priority-class: high, team: a}\nspec:\n  mode: Task\n  models: [{name: m, format: TorchScript, source: {uri: 'file:///m.pt'}}]\n",
        )
        .unwrap();
        assert_eq!(queue_name(&pipeline), Some("team-a"));
        assert_eq!(
            kueue_labels(&pipeline),
            [
                (PRIORITY_LABEL.to_owned(), "high".to_owned()),
                (QUEUE_LABEL.to_owned(), "team-a".to_owned())
            ]
        );
    }
}
