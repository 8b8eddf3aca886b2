//! The planning of a Task pipeline's shards: its planning Job, carried on until it found them.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube_zerocopy_contract::names;

use super::owned::{delete_seen, foreign};
use super::task::{annotate, work_digest};
use super::{Applied, TaskJob};
use crate::crd::InferencePipeline;
use crate::plan;
use crate::queue::{self, Hold};
use crate::reconcile::Context;
use crate::status::{self, Blocked, Reason};

/// Carries the planning of a Task pipeline's shards on (see [`plan::state`]): creates this
/// generation's planning Job, deletes one of another generation, whose pod is gone, or that
/// failed a while ago (the next reconcile plans again), and says how it stands.
pub(super) async fn apply(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    mut job: Job,
) -> Result<Applied, kube::Error> {
    let name = plan::job_name(pipeline);
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(ns));
    if cached.is_none() {
        if let Some(blocked) = foreign(&api, pipeline, ns, &name).await? {
            return Ok(Applied::Blocked(blocked));
        }
    }
    let input = pipeline.spec.input.as_ref().map_or("", |i| i.uri.as_str());
    let listing = format!("planning the shards: Job {name} lists the input {input}");
    let generation = pipeline.metadata.generation;
    let uid = cached.as_ref().and_then(|j| j.metadata.uid.clone());
    let pods = ctx.pods_of(pipeline, ns, true);
    match plan::state(cached.as_deref(), &pods, generation, Timestamp::now()) {
        plan::State::Missing if queue::suspended(pipeline) => {
            Ok(Applied::Task(Box::new(TaskJob {
                hold: Some(Hold::suspended("the input's shards are not planned")),
                ..Default::default()
            })))
        }
        plan::State::Missing => {
            annotate(&mut job, generation, work_digest(&pipeline.spec), None);
            api.patch(
                &name,
                &PatchParams::apply(names::MANAGER).force(),
                &Patch::Apply(&job),
            )
            .await?;
            Ok(Applied::Planning(listing))
        }
        // A planning pod that cannot start (its input's Secret missing, an image that cannot
        // be pulled) says why, as the workers' pods do.
        plan::State::Running | plan::State::Done(_) => match status::stuck_pod(&pods) {
            Some((reason, why)) => Ok(Applied::Blocked(Blocked {
                reason,
                message: format!("planning the shards: {why}"),
            })),
            None => Ok(Applied::Planning(listing)),
        },
        plan::State::Outdated => {
            delete_seen(&api, &name, uid).await?;
            Ok(Applied::Planning(format!(
                "planning the shards again for generation {}",
                generation.unwrap_or_default()
            )))
        }
        plan::State::Failed { why, retry } => {
            if retry {
                delete_seen(&api, &name, uid).await?;
            }
            Ok(Applied::Blocked(Blocked {
                reason: Reason::InputNotPlanned,
                message: format!(
                    "planning the shards failed: {why} (Job {name}; planned again every minute, or \
                     give spec.task.shards)"
                ),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock_api::{answer, api_server, context, not_found};
    use super::*;
    use crate::render::{render, Rendered, Settings};
    use http::Method;
    use serde_json::json;

    const JOB_PATH: &str = "/apis/batch/v1/namespaces/tenant/jobs/p-plan";

    /// A Task pipeline whose shards are not declared: it is planned first.
    fn unplanned() -> (InferencePipeline, Job) {
        let mut pipeline: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p, namespace: tenant, generation: 3}\nspec:\n  mode: Task\n  models: [{name: m, format: TorchScript, source: {uri: 'https://m.example/m.pt', size: 1Mi}}]\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  template: {volumes: [{name: data, emptyDir: {}}], volumeMounts: [{name: data, mountPath: /data}]}\n",
        )
        .unwrap();
        pipeline.metadata.uid = Some("pipeline-uid".into());
        let Ok(Rendered::Plan { job }) = render(&pipeline, &Settings::default()) else {
            panic!("an unplanned Task renders its planning Job")
        };
        (pipeline, *job)
    }

    #[tokio::test]
    async fn a_missing_planning_job_is_applied_by_the_operator_with_its_generation() {
        let (pipeline, job) = unplanned();
        let (client, server) = api_server(vec![
            answer(Method::GET, JOB_PATH, 404, not_found()),
            answer(Method::PATCH, JOB_PATH, 200, json!({})),
        ]);
        let applied = apply(&context(client, vec![]), &pipeline, "tenant", job)
            .await
            .unwrap();
        let Applied::Planning(said) = applied else {
            panic!("the shards are being planned")
        };
        assert!(
            said.contains("Job p-plan lists the input file:///data/in"),
            "{said}"
        );
        let seen = server.await.unwrap();
        let [_, patch] = &seen[..] else {
            panic!("a GET, then the apply: {} requests", seen.len())
        };
        assert!(
            patch.uri.contains("fieldManager=kube-zerocopy"),
            "{}",
            patch.uri
        );
        assert!(patch.uri.contains("force=true"), "{}", patch.uri);
        let annotations = &patch.body["metadata"]["annotations"];
        assert_eq!(annotations[names::GENERATION_ANNOTATION], "3");
        assert!(
            annotations[names::WORK_ANNOTATION].is_string(),
            "{annotations}"
        );
    }

    #[tokio::test]
    async fn another_job_of_the_planning_jobs_name_is_left_alone() {
        let (pipeline, job) = unplanned();
        let theirs = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "p-plan", "namespace": "tenant", "uid": "their-uid"},
        });
        let (client, server) = api_server(vec![answer(Method::GET, JOB_PATH, 200, theirs)]);
        let applied = apply(&context(client, vec![]), &pipeline, "tenant", job)
            .await
            .unwrap();
        let Applied::Blocked(blocked) = applied else {
            panic!("another's Job is not taken over")
        };
        assert_eq!(blocked.reason, Reason::ObjectNotOwned);
        assert_eq!(
            server.await.unwrap().len(),
            1,
            "only the GET: nothing written"
        );
    }
}
