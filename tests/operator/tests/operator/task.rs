//! Task pipelines: an Indexed Job with the rendered pod template, run to completion by kwok;
//! what a changed spec does to it.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;

use crate::support::{events_of, task_pipeline, wait_phase, Env, MINUTE};

/// The Job is the rendered one, owned by the pipeline; the pipeline succeeds with its
/// progress, and each phase is announced by one event with its own words.
pub async fn a_task_pipeline_succeeds_with_one_event_per_phase(env: Arc<Env>) {
    let ns = env.namespace("task").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let task = pipelines
        .create(&PostParams::default(), &task_pipeline("batch", &ns, 3))
        .await
        .unwrap();
    let job = eventually("the Job", MINUTE, || async {
        jobs.get_opt("batch-zerocopy").await.unwrap()
    })
    .await;
    let got = job.spec.clone().unwrap();
    assert_eq!(
        (
            got.completions,
            got.parallelism,
            got.completion_mode.as_deref()
        ),
        (Some(3), Some(2), Some("Indexed"))
    );
    // The pod as this pipeline needs it, written out (the renderer's own tests check the
    // rest): the weight server as a native sidecar, the worker told where everything is.
    let pod = got.template.spec.unwrap();
    let sidecar = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        sidecar.command.clone().unwrap(),
        ["kube-zerocopy-weight-server", "serve"]
    );
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let env_of_worker: Vec<(String, String)> = pod.containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    let (models, rest) = env_of_worker.split_first().unwrap();
    assert_eq!(models.0, "KZC_MODELS");
    let models = kube_zerocopy_contract::models::models_from_json(&models.1).unwrap();
    assert_eq!(
        models
            .iter()
            .map(|m| (m.name.as_str(), m.uri.as_str(), m.max_bytes))
            .collect::<Vec<_>>(),
        [("encoder", "file:///models/encoder.pt", Some(64 << 20))]
    );
    // The run: this pipeline's uid (its first group) and generation.
    let uid = task.uid().unwrap();
    let run = format!("{}-1", uid.split('-').next().unwrap());
    let expected = [
        ("KZC_STORE", "/kzc/store"),
        ("KZC_BINDINGS", "/kzc/bindings"),
        ("KZC_INPUT", "/data/in"),
        ("KZC_OUTPUT", "/data/out"),
        ("KZC_SHARDS", "3"),
        ("KZC_RUN", &run),
        ("KZC_DEVICE", "cpu"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(rest, expected);
    assert_eq!(job.owner_references()[0].uid, task.uid().unwrap());
    let done = wait_phase(&pipelines, "batch", Phase::Succeeded, None, 3 * MINUTE).await;
    assert_eq!(done.progress.as_deref(), Some("3/3"));
    assert_eq!(done.observed_generation, task.metadata.generation);
    let events: Api<Event> = env.api(&ns);
    let recorded = eventually("the Succeeded event", MINUTE, || async {
        let recorded = events_of(&events, "batch").await;
        recorded
            .iter()
            .any(|e| e.0 == "Succeeded")
            .then_some(recorded)
    })
    .await;
    println!("events of the Task pipeline: {recorded:?}");
    // Each phase once: Pending (the Job just made) and Succeeded always; Running at most once,
    // since kwok may run and complete the pods between two looks of the operator.
    for (phase, least) in [("Pending", 1), ("Running", 0), ("Succeeded", 1)] {
        let sent: i32 = recorded.iter().filter(|e| e.0 == phase).map(|e| e.3).sum();
        assert!(
            (least..=1).contains(&sent),
            "{phase} announced {sent} times: {recorded:?}"
        );
    }
    let succeeded = recorded.iter().find(|e| e.0 == "Succeeded").unwrap();
    assert_eq!(succeeded.2, "3/3 shards succeeded", "{recorded:?}");
    assert!(
        recorded
            .iter()
            .filter(|e| e.0 != "Succeeded")
            .all(|e| e.2 != succeeded.2),
        "another phase's event says the same as Succeeded's: {recorded:?}"
    );
}

/// More shards at once: the running Job takes it in place (same Job, no refusal). Another
/// model while the Job runs: refused with a condition (a Job cannot change), then carried out
/// once that Job has finished, with an event saying every shard runs again. 30 shards one at
/// a time keep the Job running long enough on kwok.
pub async fn more_parallelism_applies_in_place_and_a_new_model_reruns_with_an_event(env: Arc<Env>) {
    let ns = env.namespace("changed-task").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    pipelines
        .create(
            &PostParams::default(),
            &kube_zerocopy_test_env::task_pipeline("long", &ns, 30, 1),
        )
        .await
        .unwrap();
    eventually("the long Job to run", MINUTE, || async {
        let j = jobs.get_opt("long-zerocopy").await.unwrap()?;
        (j.status?.active? > 0).then_some(())
    })
    .await;
    let long_uid = jobs.get("long-zerocopy").await.unwrap().uid();
    pipelines
        .patch(
            "long",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"task": {"parallelism": 2}}})),
        )
        .await
        .unwrap();
    eventually(
        "the running Job to run 2 shards at once",
        MINUTE,
        || async {
            let j = jobs.get("long-zerocopy").await.unwrap();
            (j.spec.as_ref()?.parallelism == Some(2)).then_some(())
        },
    )
    .await;
    assert_eq!(jobs.get("long-zerocopy").await.unwrap().uid(), long_uid);
    let status = pipelines.get("long").await.unwrap().status.unwrap();
    assert!(
        !status
            .conditions
            .iter()
            .any(|c| c.reason == "SpecChangeRefused" && c.status == "True"),
        "{:?}",
        status.conditions
    );
    let new_model = json!({"spec": {"models": [{"name": "encoder", "format": "TorchScript",
        "source": {"uri": "file:///models/encoder-v2.pt", "size": "64Mi"}}]}});
    pipelines
        .patch("long", &PatchParams::default(), &Patch::Merge(new_model))
        .await
        .unwrap();
    let refused = eventually(
        "the change to be refused with a condition",
        MINUTE,
        || async {
            let s = pipelines.get("long").await.unwrap().status?;
            s.conditions.into_iter().find(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "SpecChangeRefused"
            })
        },
    )
    .await;
    println!("refused: {}", refused.message);
    assert!(refused.message.contains("running Job cannot change"));
    let running = jobs.get("long-zerocopy").await.unwrap();
    assert!(
        !format!("{:?}", running.spec).contains("encoder-v2"),
        "a running Job was changed"
    );
    eventually(
        "the finished Job to be replaced by one with the new model",
        3 * MINUTE,
        || async {
            let j = jobs.get_opt("long-zerocopy").await.unwrap()?;
            format!("{:?}", j.spec).contains("encoder-v2").then_some(())
        },
    )
    .await;
    // While the new Job runs, the status says why (30 shards at 2 at a time on kwok: a while).
    let progressing = eventually(
        "the status to say why the shards run again",
        MINUTE,
        || async {
            let s = pipelines.get("long").await.unwrap().status?;
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Progressing" && c.status == "True" && c.reason == "Rerun")
        },
    )
    .await;
    assert!(
        progressing.message.contains("all 30 shards run again"),
        "{}",
        progressing.message
    );
    let events: Api<Event> = env.api(&ns);
    let rerun = eventually("an event saying the shards run again", MINUTE, || async {
        events_of(&events, "long")
            .await
            .into_iter()
            .find(|e| e.0 == "Rerun")
    })
    .await;
    assert!(rerun.2.contains("all 30 shards run again"), "{rerun:?}");
}

/// A pipeline with ttlSecondsAfterFinished is deleted that long after it succeeds, its Job
/// with it. Its Job retries each shard alone (backoffLimitPerIndex), starts a replacement pod
/// only once the failed one is gone (podReplacementPolicy Failed), and stops at the failed
/// shards it is allowed (maxFailedIndexes): the API server takes all three.
pub async fn a_finished_pipeline_is_deleted_once_its_ttl_is_up(env: Arc<Env>) {
    let ns = env.namespace("ttl").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut pipeline = task_pipeline("short", &ns, 2);
    pipeline.spec.ttl_seconds_after_finished = Some(15);
    let task = pipeline.spec.task.as_mut().unwrap();
    task.retries_per_shard = Some(1);
    task.max_failed_shards = Some(1);
    pipelines
        .create(&PostParams::default(), &pipeline)
        .await
        .unwrap();
    let job = eventually("the Job", MINUTE, || async {
        jobs.get_opt("short-zerocopy").await.unwrap()
    })
    .await;
    let spec = job.spec.unwrap();
    assert_eq!(
        (
            spec.backoff_limit_per_index,
            spec.max_failed_indexes,
            spec.pod_replacement_policy.as_deref()
        ),
        (Some(1), Some(1), Some("Failed"))
    );
    // Deleted once it succeeded: a loaded operator may see the Job complete only after the
    // ttl is up, and then deletes it in the same reconcile, so no poll of its status need see
    // Succeeded; its event says it did.
    eventually("the pipeline deleted after its ttl", 4 * MINUTE, || async {
        pipelines
            .get_opt("short")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually("its Job deleted with it", MINUTE, || async {
        jobs.get_opt("short-zerocopy")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let events = events_of(&env.api(&ns), "short").await;
    assert!(
        events.iter().any(|e| e.0 == "Succeeded"),
        "deleted without having succeeded: {events:?}"
    );
}
