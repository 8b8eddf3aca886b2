//! A Task pipeline's Indexed Job: created once per generation of what it computes, rescaled
//! in place, replaced once finished, refused while running (the pure [`task_step`]), and held
//! or let go on for spec.suspend and Kueue.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use kube_zerocopy_contract::names;
use serde_json::json;

use super::owned::{delete_seen, foreign};
use super::{Applied, TaskJob};
use crate::crd::InferencePipeline;
use crate::k8s_ext::JobExt;
use crate::queue::{self, Hold};
use crate::reconcile::{record, Context};
use crate::render;
use crate::status::Reason;

/// Applies a Task pipeline's Job (see [`apply_task`]) and holds it back or lets it go on
/// (see [`hold_task`]).
pub(super) async fn apply(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    job: Job,
) -> Result<Applied, kube::Error> {
    let name = render::object_name(pipeline);
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(ns));
    // The cache holds only the operator's Jobs: look for another of the same name.
    if cached.is_none() {
        if let Some(blocked) = foreign(&jobs, pipeline, ns, &name).await? {
            return Ok(Applied::Blocked(blocked));
        }
    }
    let mut applied = apply_task(ctx, pipeline, &jobs, cached, job).await?;
    if applied.hold.is_none() {
        applied.hold = hold_task(ctx, pipeline, ns, &jobs, applied.job.as_ref()).await?;
    }
    Ok(Applied::Task(Box::new(applied)))
}

/// What to do with a pipeline's Job.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskStep {
    /// No Job yet: create it.
    Create,
    /// The Job was rendered from this generation: leave it as it is, running or finished
    /// (a Job's template cannot change, and a finished one must not run again).
    Keep,
    /// The spec changed only in how many shards run at once: the Job takes the new
    /// parallelism and generation in place, running or finished (its outputs stay valid).
    Rescale,
    /// The spec changed and the old Job finished: delete it, the next reconcile creates the
    /// new one (every shard runs again).
    Replace,
    /// The spec changed while the Job runs: refuse, with this reason.
    Refuse(&'static str),
}

pub const SPEC_CHANGED_WHILE_RUNNING: &str = "the spec changed while the pipeline's Job is running, and a \
    running Job cannot change: wait for it to finish (it is then replaced), or delete and re-create the pipeline";

/// The Task decision, from the cached Job (if any), the pipeline's generation and the digest
/// of its work ([`work_digest`]). A Job of an operator that did not annotate generations
/// counts as current: never re-run by accident.
pub fn task_step(current: Option<&Job>, generation: Option<i64>, work: &str) -> TaskStep {
    let Some(current) = current else {
        return TaskStep::Create;
    };
    let rendered_from = current.annotations().get(names::GENERATION_ANNOTATION);
    let same = match (rendered_from, generation) {
        (Some(from), Some(generation)) => from.parse::<i64>().ok() == Some(generation),
        _ => true,
    };
    let same_work = current
        .annotations()
        .get(names::WORK_ANNOTATION)
        .map(String::as_str)
        == Some(work);
    match (same, same_work, current.is_finished()) {
        (true, _, _) => TaskStep::Keep,
        (false, true, _) => TaskStep::Rescale,
        (false, false, true) => TaskStep::Replace,
        (false, false, false) => TaskStep::Refuse(SPEC_CHANGED_WHILE_RUNNING),
    }
}

/// The digest of what a Task pipeline computes: its spec without `task.parallelism`, which
/// changes only how many shards run at once, `suspend` and `ttlSecondsAfterFinished`. Not the
/// rendered Job's, which an operator upgrade changes too.
pub fn work_digest(spec: &crate::crd::InferencePipelineSpec) -> String {
    let mut work = spec.clone();
    // Whether it is held, and how long it is kept once finished, change nothing it computes:
    // suspending a running Job (or giving a finished one a TTL) must not replace it.
    work.suspend = None;
    work.ttl_seconds_after_finished = None;
    earlier_work_digest(&work)
}

/// The work digest as earlier operators computed it (`suspend` and `ttlSecondsAfterFinished`
/// counted), which the Jobs they made carry.
fn earlier_work_digest(spec: &crate::crd::InferencePipelineSpec) -> String {
    let mut work = spec.clone();
    if let Some(task) = work.task.as_mut() {
        task.parallelism = None;
    }
    let json = serde_json::to_vec(&work).expect("a spec serializes");
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&json))
}

/// The digest to compare a Job's with: the earlier operators' when the Job carries that one
/// (the same work, as they counted it), else [`work_digest`].
pub fn work_of(current: Option<&Job>, spec: &crate::crd::InferencePipelineSpec) -> String {
    let carried = current.and_then(|j| j.annotations().get(names::WORK_ANNOTATION));
    let earlier = earlier_work_digest(spec);
    if carried == Some(&earlier) {
        earlier
    } else {
        work_digest(spec)
    }
}

/// Marks a Job with the generation and the work it was rendered from and, for a re-run, why.
pub(super) fn annotate(
    job: &mut Job,
    generation: Option<i64>,
    work: String,
    rerun: Option<String>,
) {
    let annotations = job
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    if let Some(generation) = generation {
        annotations.insert(names::GENERATION_ANNOTATION.into(), generation.to_string());
    }
    annotations.insert(names::WORK_ANNOTATION.into(), work);
    if let Some(why) = rerun {
        annotations.insert(names::RERUN_ANNOTATION.into(), why);
    }
}

/// Carries out [`task_step`]. Returns the Job as it is now and, when refused, why; when
/// replaced, why every shard runs again. `current` is the cached Job: should the cache lag
/// behind, creating fails (it exists) and the reconcile retries.
async fn apply_task(
    ctx: &Context,
    pipeline: &InferencePipeline,
    api: &Api<Job>,
    current: Option<Arc<Job>>,
    mut job: Job,
) -> Result<TaskJob, kube::Error> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let generation = pipeline.metadata.generation;
    let step = task_step(
        current.as_deref(),
        generation,
        &work_of(current.as_deref(), &pipeline.spec),
    );
    let work = work_digest(&pipeline.spec);
    // Held: no new Job (a finished one stays until the pipeline goes on).
    if queue::suspended(pipeline) && matches!(step, TaskStep::Create | TaskStep::Replace) {
        return Ok(TaskJob {
            job: current.map(|j| (*j).clone()),
            hold: Some(Hold::suspended("no Job is created")),
            ..Default::default()
        });
    }
    match step {
        TaskStep::Create => {
            annotate(&mut job, generation, work, None);
            let created = api
                .patch(
                    &name,
                    &PatchParams::apply(names::MANAGER).force(),
                    &Patch::Apply(&job),
                )
                .await?;
            Ok(TaskJob::job(created))
        }
        TaskStep::Keep => Ok(TaskJob {
            job: current.map(|j| (*j).clone()),
            ..Default::default()
        }),
        TaskStep::Rescale => {
            // A merge patch of these fields alone: the Job's template cannot change, its
            // parallelism can. The work's digest is written as this operator counts it.
            let patch = json!({
                "metadata": {"annotations": {
                    names::GENERATION_ANNOTATION: generation.map(|g| g.to_string()),
                    names::WORK_ANNOTATION: work,
                }},
                "spec": {"parallelism": job.spec.as_ref().and_then(|s| s.parallelism)},
            });
            let patched = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(TaskJob::job(patched))
        }
        TaskStep::Replace => {
            let shards = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(0);
            let why = format!(
                "the spec changed (generation {}) since the finished Job ran: it is replaced, \
                 and all {shards} shards run again",
                generation.unwrap_or_default()
            );
            // Only the finished Job that was seen: a reconcile that read a stale cache must
            // not delete the new one.
            let finished_uid = current.as_ref().and_then(|j| j.metadata.uid.clone());
            if delete_seen(api, &name, finished_uid).await? {
                record(
                    ctx,
                    pipeline,
                    EventType::Normal,
                    Reason::Rerun.as_str(),
                    Some(why.clone()),
                )
                .await
            }
            // The new Job carries why it runs, for the status while it runs.
            annotate(&mut job, generation, work, Some(why.clone()));
            match api
                .patch(
                    &name,
                    &PatchParams::apply(names::MANAGER).force(),
                    &Patch::Apply(&job),
                )
                .await
            {
                Ok(created) => Ok(TaskJob::job(created)),
                // The finished Job is still on its way out: the next reconcile creates the new.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => Ok(TaskJob {
                    rerun: Some(why),
                    ..Default::default()
                }),
                Err(e) => Err(e),
            }
        }
        TaskStep::Refuse(why) => Ok(TaskJob {
            job: current.map(|j| (*j).clone()),
            refused: Some(why.into()),
            ..Default::default()
        }),
    }
}

/// Holds a Task pipeline's Job back or lets it go on (see [`crate::queue`]), and says why it
/// does not run when it does not: spec.suspend is mirrored onto the Job, or, for a Job that
/// Kueue admits (it carries the queue label), onto its Workload's spec.active.
async fn hold_task(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    jobs: &Api<Job>,
    job: Option<&Job>,
) -> Result<Option<Hold>, kube::Error> {
    let suspend = queue::suspended(pipeline);
    let Some(job) = job.filter(|j| !j.is_finished()) else {
        return Ok(None);
    };
    // The Job's own label, as it was created: Kueue admits it or not by that.
    let Some(queue_name) = job.labels().get(queue::QUEUE_LABEL) else {
        suspend_job(jobs, job, suspend).await?;
        if suspend {
            return Ok(Some(Hold::suspended(
                "the Job is suspended and its pods stopped (the shards done stay done)",
            )));
        }
        return Ok(queue::held_by_another(job).then(Hold::held_by_another));
    };
    let waiting = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    // Admitted and running, and not to be held: its Workload is active, nothing to say. (A
    // deactivated Workload's Job is suspended by Kueue.) No list on every reconcile of a run.
    if !suspend && !waiting {
        return Ok(None);
    }
    let workload = queue::workload_of(ctx.client.clone(), ns, job).await?;
    if let Some(workload) = workload.as_ref().filter(|w| queue::is_active(w) == suspend) {
        queue::set_active(ctx.client.clone(), ns, workload, !suspend).await?;
    }
    if suspend {
        return Ok(Some(Hold::suspended(
            "the Job's Workload is deactivated (Kueue suspends the Job and releases its quota)",
        )));
    }
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let age = created.map_or(0, |t| Timestamp::now().as_second() - t.as_second());
    let age = Duration::from_secs(age.max(0) as u64);
    let why = queue::waiting_reason(workload.as_ref(), age);
    Ok(waiting.then(|| Hold::queued(queue_name, why.as_deref())))
}

/// Suspends a running Job for spec.suspend, or resumes one it suspended (see
/// [`queue::suspend_change`]): the Job controller stops its pods, or starts them again (an
/// Indexed Job's completed indexes stay completed).
pub(super) async fn suspend_job(
    jobs: &Api<Job>,
    job: &Job,
    suspend: bool,
) -> Result<(), kube::Error> {
    let change = queue::suspend_change(job, suspend).filter(|_| !job.is_finished());
    if let Some(suspend) = change {
        let ours = suspend.then_some("true");
        let patch = json!({
            "metadata": {"annotations": {names::SUSPENDED_BY_PIPELINE_ANNOTATION: ours}},
            "spec": {"suspend": suspend},
        });
        jobs.patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{task_step, work_digest, TaskStep, SPEC_CHANGED_WHILE_RUNNING};
    use crate::crd::InferencePipeline;
    use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
    use kube_zerocopy_contract::names;

    /// A Job rendered from `generation` (None: by an operator that did not say), finished or not.
    fn job(generation: Option<i64>, finished: Option<&str>) -> Job {
        let mut job = Job::default();
        if let Some(g) = generation {
            job.metadata.annotations =
                Some([(names::GENERATION_ANNOTATION.to_string(), g.to_string())].into());
        }
        job.status = finished.map(|type_| JobStatus {
            conditions: Some(vec![JobCondition {
                type_: type_.into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        job
    }

    #[test]
    fn a_finished_job_runs_again_only_for_a_new_generation() {
        for end in ["Complete", "Failed"] {
            let done = job(Some(3), Some(end));
            // An operator upgrade or a changed chart value renders another Job: same generation.
            assert_eq!(task_step(Some(&done), Some(3), "other"), TaskStep::Keep);
            assert_eq!(task_step(Some(&done), Some(4), "other"), TaskStep::Replace);
        }
    }

    #[test]
    fn a_running_job_is_kept_or_its_change_refused() {
        let running = job(Some(3), None);
        assert_eq!(task_step(Some(&running), Some(3), "other"), TaskStep::Keep);
        assert_eq!(
            task_step(Some(&running), Some(4), "other"),
            TaskStep::Refuse(SPEC_CHANGED_WHILE_RUNNING)
        );
        // "Suspended" or other conditions are not an end.
        let suspended = job(Some(3), Some("Suspended"));
        assert!(matches!(
            task_step(Some(&suspended), Some(4), "other"),
            TaskStep::Refuse(_)
        ));
    }

    #[test]
    fn no_job_is_created_and_an_unannotated_one_is_kept() {
        assert_eq!(task_step(None, Some(1), "w"), TaskStep::Create);
        assert_eq!(
            task_step(Some(&job(None, Some("Complete"))), Some(9), "w"),
            TaskStep::Keep
        );
        assert_eq!(
            task_step(Some(&job(None, None)), Some(9), "w"),
            TaskStep::Keep
        );
    }

    /// A Task pipeline's spec over 30 shards: `input` its input folder, `task` its task
    /// settings, `extra` more lines of the spec.
    fn task_spec(input: &str, task: &str, extra: &str) -> crate::crd::InferencePipelineSpec {
        let p: InferencePipeline = serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n  input: {{uri: 'file:///{input}'}}\n  output: {{uri: 'file:///out'}}\n  task: {{shards: 30{task}}}\n{extra}"
        ))
        .unwrap();
        p.spec
    }

    /// A job of the operator (`generation`, finished or not) that carries `work`.
    fn job_of_work(generation: i64, end: Option<&str>, work: &str) -> Job {
        let mut current = job(Some(generation), end);
        current
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(names::WORK_ANNOTATION.into(), work.into());
        current
    }

    /// A change of parallelism alone is applied in place, to a running Job or a finished one,
    /// which then does not run again; any other change of the spec changes the work.
    #[test]
    fn a_new_parallelism_is_applied_in_place() {
        let spec = |parallelism: i32, input: &str| {
            task_spec(input, &format!(", parallelism: {parallelism}"), "")
        };
        let work = work_digest(&spec(1, "in"));
        assert_eq!(work, work_digest(&spec(8, "in")));
        assert_ne!(work, work_digest(&spec(1, "elsewhere")));
        for end in [None, Some("Complete")] {
            let current = job_of_work(3, end, &work);
            assert_eq!(task_step(Some(&current), Some(4), &work), TaskStep::Rescale);
            let other = work_digest(&spec(8, "elsewhere"));
            assert_ne!(
                task_step(Some(&current), Some(4), &other),
                TaskStep::Rescale
            );
        }
    }

    /// Holding a running Job (spec.suspend) or giving a finished one a TTL is applied in place:
    /// neither is a change of what it computes, so neither refuses nor replaces the Job.
    #[test]
    fn suspending_or_a_ttl_never_replaces_the_job() {
        let spec = |extra: &str| task_spec("in", "", extra);
        let work = work_digest(&spec(""));
        for extra in [
            "  suspend: true\n",
            "  suspend: false\n",
            "  ttlSecondsAfterFinished: 60\n",
        ] {
            let changed = work_digest(&spec(extra));
            assert_eq!(changed, work, "{extra}");
            for end in [None, Some("Complete")] {
                let current = job_of_work(3, end, &work);
                assert_eq!(
                    task_step(Some(&current), Some(4), &changed),
                    TaskStep::Rescale
                );
            }
        }
    }

    /// A Job an earlier operator made carries the digest as it counted it (suspend and the
    /// TTL in): after an upgrade, that Job is still the pipeline's work, rescaled in place, not
    /// refused or replaced.
    #[test]
    fn a_job_of_an_earlier_operator_keeps_its_work() {
        let spec = task_spec("in", "", "  ttlSecondsAfterFinished: 86400\n");
        let earlier = super::earlier_work_digest(&spec);
        assert_ne!(earlier, work_digest(&spec));
        for end in [None, Some("Complete")] {
            let made = job_of_work(3, end, &earlier);
            let work = super::work_of(Some(&made), &spec);
            assert_eq!(task_step(Some(&made), Some(4), &work), TaskStep::Rescale);
        }
        // A Job of this operator, or none: today's digest.
        assert_eq!(super::work_of(None, &spec), work_digest(&spec));
    }
}

/// The step against a scripted API server: what it asks of it, and what it leaves alone.
#[cfg(test)]
mod apply_tests {
    use super::super::mock_api::{answer, api_server, context};
    use super::*;
    use crate::render::{render, Rendered, Settings};
    use http::Method;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    const JOB_PATH: &str = "/apis/batch/v1/namespaces/tenant/jobs/p-zerocopy";
    const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/tenant/events";

    /// The pipeline at `generation`, running model `model`, and the Job it renders.
    fn pipeline(generation: i64, model: &str) -> (InferencePipeline, Job) {
        let mut pipeline: InferencePipeline = serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, namespace: tenant, generation: {generation}}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://m.example/{model}.pt', size: 1Mi}}}}]\n  input: {{uri: 'file:///data/in'}}\n  output: {{uri: 'file:///data/out'}}\n  task: {{shards: 2}}\n  template: {{volumes: [{{name: data, emptyDir: {{}}}}], volumeMounts: [{{name: data, mountPath: /data}}]}}\n"
        ))
        .unwrap();
        pipeline.metadata.uid = Some("pipeline-uid".into());
        let Ok(Rendered::Task { job }) = render(&pipeline, &Settings::default()) else {
            panic!("a planned Task renders its Job")
        };
        (pipeline, *job)
    }

    /// The Job as the operator created it for `generation` (its uid `uid`), finished or not.
    fn created(generation: i64, model: &str, uid: &str, finished: bool) -> Job {
        let (pipeline, mut job) = pipeline(generation, model);
        annotate(
            &mut job,
            Some(generation),
            work_digest(&pipeline.spec),
            None,
        );
        job.metadata.uid = Some(uid.into());
        job.status = finished.then(|| JobStatus {
            conditions: Some(vec![JobCondition {
                type_: "Complete".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        job
    }

    #[tokio::test]
    async fn a_job_that_runs_is_never_replaced_by_a_changed_spec() {
        let running = created(1, "old", "running-uid", false);
        let (pipeline, job) = pipeline(2, "new");
        let (client, server) = api_server(vec![]);
        let applied = apply(&context(client, vec![running]), &pipeline, "tenant", job)
            .await
            .unwrap();
        let Applied::Task(task) = applied else {
            panic!("the Task's Job")
        };
        assert_eq!(task.refused.as_deref(), Some(SPEC_CHANGED_WHILE_RUNNING));
        assert_eq!(
            task.job.unwrap().metadata.uid.as_deref(),
            Some("running-uid")
        );
        assert_eq!(
            server.await.unwrap().len(),
            0,
            "nothing asked of the API server"
        );
    }

    #[tokio::test]
    async fn a_finished_job_of_another_spec_is_deleted_as_seen_and_the_new_one_applied() {
        let finished = created(1, "old", "finished-uid", true);
        let (pipeline, job) = pipeline(2, "new");
        let new = serde_json::to_value(created(2, "new", "new-uid", false)).unwrap();
        let (client, server) = api_server(vec![
            answer(Method::DELETE, JOB_PATH, 200, serde_json::json!({})),
            answer(Method::POST, EVENTS_PATH, 201, serde_json::json!({})),
            answer(Method::PATCH, JOB_PATH, 200, new),
        ]);
        let applied = apply(&context(client, vec![finished]), &pipeline, "tenant", job)
            .await
            .unwrap();
        let Applied::Task(task) = applied else {
            panic!("the Task's Job")
        };
        assert_eq!(task.job.unwrap().metadata.uid.as_deref(), Some("new-uid"));
        let seen = server.await.unwrap();
        let [delete, event, patch] = &seen[..] else {
            panic!("delete, event, apply: {} requests", seen.len())
        };
        // Only the Job that was seen: a newer one of the same name is not deleted.
        assert_eq!(delete.body["preconditions"]["uid"], "finished-uid");
        assert_eq!(event.body["reason"], Reason::Rerun.as_str());
        assert!(patch.uri.contains("force=true"), "{}", patch.uri);
        let annotations = &patch.body["metadata"]["annotations"];
        assert_eq!(annotations[names::GENERATION_ANNOTATION], "2");
        let said = annotations.to_string();
        assert!(said.contains("all 2 shards run again"), "{said}");
    }
}
