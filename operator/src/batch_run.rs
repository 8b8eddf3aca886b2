//! An Actor pipeline's batch run: given an input and an output, a driver Job streams the
//! input's shard files through the replicas (`kube-zerocopy-worker drive`), and the replicas are
//! scaled away once it is done. The driver finds the replicas in their Service's EndpointSlices
//! and writes `status.batches` as it goes, with a ServiceAccount of its own that may do only
//! that.
//!
//! A run is one set of models, input and output ([`run_name`]): changing the replicas, the
//! batching or the batches in flight leaves it running; changing what it computes starts
//! another (the driver of the old one is replaced, and finished outputs are not reused).

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::crd::{InferencePipeline, Mode};
use crate::k8s_ext::{JobExt, COMPLETE, FAILED};
use kube_zerocopy_contract::names;

/// Whether the pipeline is an Actor with data to run through it.
pub fn is_batch(pipeline: &InferencePipeline) -> bool {
    pipeline.spec.mode == Mode::Actor && pipeline.spec.input.is_some()
}

/// The driver's Job, ServiceAccount, Role and RoleBinding: `<pipeline>-zerocopy-driver`, like
/// the pipeline's other objects, so as not to meet the namespace's own (a `spark-driver`).
/// The operator still touches none of these that the pipeline does not own.
pub fn driver_name(pipeline: &InferencePipeline) -> String {
    format!("{}-zerocopy-driver", pipeline.name_any())
}

/// The run: the pipeline's uid prefix and a digest of what it computes (models, input,
/// output), so that its records and manifest are its own.
pub fn run_name(pipeline: &InferencePipeline) -> String {
    let uid = pipeline.metadata.uid.as_deref().unwrap_or("local");
    let spec = &pipeline.spec;
    let what = serde_json::json!([spec.models, spec.input, spec.output]);
    let digest = hex::encode(Sha256::digest(what.to_string()));
    format!("{}-{}", uid.split('-').next().unwrap_or(uid), &digest[..12])
}

/// How the driver Job of this run stands.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// None yet.
    Missing,
    /// One of another run (the spec changed what it computes): to be replaced.
    Outdated,
    Running,
    Failed(String),
    Done,
}

pub fn state(pipeline: &InferencePipeline, job: Option<&Job>) -> State {
    let Some(job) = job else {
        return State::Missing;
    };
    if job.annotations().get(names::RUN_ANNOTATION) != Some(&run_name(pipeline)) {
        return State::Outdated;
    }
    if job.condition(COMPLETE).is_some() {
        return State::Done;
    }
    if let Some(failed) = job.condition(FAILED) {
        let why = failed.message.clone();
        return State::Failed(why.unwrap_or_else(|| "the driver Job failed".into()));
    }
    State::Running
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(replicas: i32, input: &str) -> InferencePipeline {
        serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, uid: 1234abcd-00}}\nspec:\n  mode: Actor\n  actor: {{replicas: {replicas}}}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///opt/m.pt'}}}}]\n  input: {{uri: 'file://{input}'}}\n  output: {{uri: 'file:///data/out'}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_run_is_what_it_computes_not_how_many_replicas_compute_it() {
        let run = run_name(&pipeline(2, "/data/in"));
        assert!(run.starts_with("1234abcd-"), "{run}");
        assert_eq!(run_name(&pipeline(5, "/data/in")), run);
        assert_ne!(run_name(&pipeline(2, "/data/other")), run);
    }

    #[test]
    fn the_driver_job_says_how_the_run_stands() {
        let p = pipeline(2, "/data/in");
        let job = |run: &str, condition: Option<(&str, &str)>| -> Job {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p-zerocopy-driver", "annotations": {names::RUN_ANNOTATION: run}},
                "status": {"conditions": condition.map(|(t, m)| vec![serde_json::json!({
                    "type": t, "status": "True", "message": m})]).unwrap_or_default()},
            }))
            .unwrap()
        };
        let run = run_name(&p);
        assert_eq!(state(&p, None), State::Missing);
        assert_eq!(state(&p, Some(&job("old", None))), State::Outdated);
        assert_eq!(state(&p, Some(&job(&run, None))), State::Running);
        assert_eq!(
            state(&p, Some(&job(&run, Some(("Complete", ""))))),
            State::Done
        );
        assert_eq!(
            state(&p, Some(&job(&run, Some(("Failed", "exit 3"))))),
            State::Failed("exit 3".into())
        );
    }
}
