use super::*;
use k8s_openapi::api::batch::v1::{JobCondition, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
};
use kube_zerocopy_contract::names;

fn pipeline(mode: &str) -> InferencePipeline {
    let yaml = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, generation: 3}}\nspec:\n  mode: {mode}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n  input: {{uri: 'file:///in'}}\n  output: {{uri: 'file:///out'}}\n  task: {{shards: 4}}\n"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn job(succeeded: i32, condition: Option<&str>) -> Job {
    Job {
        spec: Some(JobSpec {
            completions: Some(4),
            ..Default::default()
        }),
        status: Some(JobStatus {
            succeeded: Some(succeeded),
            active: Some(4 - succeeded),
            conditions: condition.map(|c| {
                vec![JobCondition {
                    type_: c.into(),
                    status: "True".into(),
                    message: Some("why".into()),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The status of a Task pipeline whose Job is `job` and whose pods are `pods`.
fn with_pods(p: &InferencePipeline, job: &Job, pods: &[Pod]) -> InferencePipelineStatus {
    compute(
        p,
        &Observed {
            job: Some(job),
            pods,
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    )
}

fn get(s: &InferencePipelineStatus, t: ConditionType) -> &Condition {
    s.conditions.iter().find(|c| c.type_ == t.as_str()).unwrap()
}

#[test]
fn task_progress_and_success() {
    let p = pipeline("Task");
    let j = job(2, None);
    let s = compute(
        &p,
        &Observed {
            job: Some(&j),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(
        (s.phase, s.progress.as_deref()),
        (Some(Phase::Running), Some("2/4"))
    );
    assert_eq!(get(&s, ConditionType::Progressing).status, "True");
    assert_eq!(get(&s, ConditionType::WeightsReady).status, "True");
    assert_eq!(s.observed_generation, Some(3));
    let done = job(4, Some("Complete"));
    let s = compute(
        &p,
        &Observed {
            job: Some(&done),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(s.phase, Some(Phase::Succeeded));
    assert_eq!(get(&s, ConditionType::Succeeded).status, "True");
    let failed = job(1, Some("Failed"));
    let s = compute(
        &p,
        &Observed {
            job: Some(&failed),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(get(&s, ConditionType::Failed).message, "why");
}

/// `kubectl wait --for=condition=Ready`: a Task once every output is written (not while it
/// runs, nor when it failed), an Actor once its replicas are rolled out, each with why not.
#[test]
fn ready_says_whether_the_pipeline_has_what_it_is_for() {
    let ready = |s: &InferencePipelineStatus| {
        let c = get(s, ConditionType::Ready);
        (c.status.clone(), c.reason.clone(), c.message.clone())
    };
    let p = pipeline("Task");
    let observe = |j: &Job| {
        compute(
            &p,
            &Observed {
                job: Some(j),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        )
    };
    let (status, reason, _) = ready(&observe(&job(2, None)));
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Running"));
    assert_eq!(
        ready(&observe(&job(4, Some("Complete")))),
        (
            "True".into(),
            "Succeeded".into(),
            "every output is written".into()
        )
    );
    assert_eq!(
        ready(&observe(&job(1, Some("Failed")))),
        ("False".into(), "Failed".into(), "why".into())
    );

    // Serving requests: no input or output (a batch run's are Ready only once written).
    let mut actor = pipeline("Actor");
    actor.spec.input = None;
    actor.spec.output = None;
    let deployment = |available: i32| Deployment {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
            replicas: Some(2),
            ..Default::default()
        }),
        status: Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(available),
            ..Default::default()
        }),
    };
    let serving = |available: i32| {
        let d = deployment(available);
        compute(
            &actor,
            &Observed {
                deployment: Some(&d),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        )
    };
    assert_eq!(
        ready(&serving(2)),
        (
            "True".into(),
            "Ready".into(),
            "the replicas serve the models".into()
        )
    );
    let (status, reason, _) = ready(&serving(1));
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Progressing"));
    assert_eq!(
        serving(2).url.as_deref(),
        Some("http://p-zerocopy.default.svc"),
        "where the replicas answer"
    );
    assert_eq!(observe(&job(2, None)).url, None);
}

#[test]
fn a_failing_weight_server_degrades_with_its_message() {
    let p = pipeline("Task");
    let pod = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("p-0".into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: names::WEIGHT_SERVER_CONTAINER.into(),
                last_state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 1,
                        message: Some("model \"m\": sha256 mismatch".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let j = job(0, None);
    let pods = [pod];
    let s = with_pods(&p, &j, &pods);
    let w = get(&s, ConditionType::WeightsReady);
    assert_eq!(
        (w.status.as_str(), w.reason.as_str()),
        ("False", "WeightServerFailed")
    );
    assert!(
        w.message.contains("sha256 mismatch") && w.message.contains("p-0"),
        "{}",
        w.message
    );
    assert_eq!(get(&s, ConditionType::Degraded).status, "True");
}

/// Node sharing: no weight server. A pod waiting for the node agent's volume shows the
/// agent's refusal; once a worker runs, its models were mounted.
#[test]
fn node_sharing_weights_follow_the_agents_mounts() {
    let p = pipeline("Task");
    let j = job(0, None);
    let pod = |worker: Option<ContainerState>| Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("p-0".into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            phase: Some(
                if worker.is_some() {
                    "Running"
                } else {
                    "Pending"
                }
                .into(),
            ),
            container_statuses: worker.map(|state| {
                vec![ContainerStatus {
                    name: names::WORKER_CONTAINER.into(),
                    state: Some(state),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refusal = "the node agent did not mount pod p-0's models: model \"m\": sha256 mismatch";
    let waiting = [pod(None)];
    let s = compute(
        &p,
        &Observed {
            job: Some(&j),
            pods: &waiting,
            mount_failure: Some(refusal.into()),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    for t in [ConditionType::WeightsReady, ConditionType::Degraded] {
        let c = get(&s, t);
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("ModelsNotMounted", refusal),
            "{t:?}"
        );
    }
    assert_eq!(get(&s, ConditionType::WeightsReady).status, "False");
    assert_eq!(get(&s, ConditionType::Degraded).status, "True");
    // Still mounting, nothing refused: publishing.
    let s = with_pods(&p, &j, &waiting);
    assert_eq!(get(&s, ConditionType::WeightsReady).reason, "Publishing");
    // A worker that runs had its models mounted.
    let running = [pod(Some(ContainerState {
        running: Some(Default::default()),
        ..Default::default()
    }))];
    let s = with_pods(&p, &j, &running);
    let w = get(&s, ConditionType::WeightsReady);
    assert_eq!(
        (w.status.as_str(), w.reason.as_str()),
        ("True", "Published")
    );
}

/// Each phase's event says what that phase means (both Running and Succeeded said "every
/// model is published", the first True condition's message).
#[test]
fn each_phase_event_says_its_own_thing() {
    let p = pipeline("Task");
    let note = |j: &Job| phase_note(&with_pods(&p, j, &[])).unwrap();
    assert_eq!(note(&job(2, None)), "2/4 shards succeeded, 2 running");
    assert_eq!(note(&job(4, Some("Complete"))), "4/4 shards succeeded");
    assert_eq!(note(&job(1, Some("Failed"))), "why");
    let pending = compute(&p, &Observed::default(), Timestamp::UNIX_EPOCH);
    assert_eq!(phase_note(&pending).unwrap(), "creating the Job");
}

/// A finished pipeline whose spec changed runs again: Progressing says why (the replaced
/// Job's note, then the new Job's annotation) until the new Job ends.
#[test]
fn a_rerun_says_why_until_the_new_job_ends() {
    let p = pipeline("Task");
    let why = "the spec changed (generation 3) since the finished Job ran: it is replaced, and all 4 shards run again";
    let progressing = |s: &InferencePipelineStatus| {
        let c = get(s, ConditionType::Progressing);
        (c.status.clone(), c.reason.clone(), c.message.clone())
    };
    let rerunning = ("True".to_string(), "Rerun".to_string(), why.to_string());
    // The old Job is still on its way out: no new one yet.
    let waiting = compute(
        &p,
        &Observed {
            rerun: Some(why.into()),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(waiting.phase, Some(Phase::Pending));
    assert_eq!(progressing(&waiting), rerunning);
    let rerun_job = |succeeded, end| {
        let mut j = job(succeeded, end);
        j.metadata.annotations =
            Some([(names::RERUN_ANNOTATION.to_string(), why.to_string())].into());
        j
    };
    let running = with_pods(&p, &rerun_job(1, None), &[]);
    assert_eq!(running.phase, Some(Phase::Running));
    assert_eq!(progressing(&running), rerunning);
    let done = with_pods(&p, &rerun_job(4, Some("Complete")), &[]);
    assert_eq!(done.phase, Some(Phase::Succeeded));
    assert_eq!(progressing(&done).1, "Finished");
    // A first run is never called a re-run.
    assert_eq!(
        progressing(&with_pods(&p, &job(1, None), &[])).1,
        "ShardsRunning"
    );
}

/// A held pipeline says so in its phase and why in Progressing, keeping its progress; a
/// finished one is not held any more.
#[test]
fn a_held_pipeline_says_why_it_does_not_run() {
    let p = pipeline("Task");
    let held = |job: &Job, hold: Hold| {
        compute(
            &p,
            &Observed {
                job: Some(job),
                hold: Some(hold),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        )
    };
    let suspended = held(&job(1, None), Hold::suspended("the Job is suspended"));
    assert_eq!(suspended.phase, Some(Phase::Suspended));
    assert_eq!(suspended.progress.as_deref(), Some("1/4"));
    let progressing = get(&suspended, ConditionType::Progressing);
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "Suspended")
    );
    assert_eq!(
        phase_note(&suspended).as_deref(),
        Some("spec.suspend is true: the Job is suspended; set it to false to go on")
    );
    let queued = held(&job(0, None), Hold::queued("team-a", Some("no quota")));
    assert_eq!(queued.phase, Some(Phase::Queued));
    let progressing = get(&queued, ConditionType::Progressing);
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "WaitingForAdmission")
    );
    assert_eq!(
        progressing.message,
        "waiting for Kueue to admit the Job in LocalQueue team-a: no quota"
    );
    let conditions: Vec<&str> = queued.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        conditions.iter().filter(|c| **c == "Progressing").count(),
        1,
        "{conditions:?}"
    );
    let done = held(&job(4, Some("Complete")), Hold::suspended("nothing"));
    assert_eq!(done.phase, Some(Phase::Succeeded));
}

/// A Job failed by its pod failure policy: the condition says why in the worker's words.
#[test]
fn a_failed_task_names_the_workers_reason() {
    let p = pipeline("Task");
    let pod = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("p-1".into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: names::WORKER_CONTAINER.into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 3,
                        message: Some("the input folder /in holds 3 shard files\n".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let failed = job(0, Some("Failed"));
    let pods = [pod];
    let s = with_pods(&p, &failed, &pods);
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(
        get(&s, ConditionType::Failed).message,
        "worker in pod p-1 failed: the input folder /in holds 3 shard files (why)"
    );
}

/// A pending pod with a missing claim, and one whose image cannot be pulled: Degraded with
/// the scheduler's and the kubelet's words, where the pipeline read "Running" before.
#[test]
fn pods_that_cannot_run_degrade_with_their_reason() {
    let p = pipeline("Task");
    let pending = |name: &str, status: PodStatus| Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            phase: Some("Pending".into()),
            ..status
        }),
        ..Default::default()
    };
    let unschedulable = pending(
        "p-0",
        PodStatus {
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("persistentvolumeclaim \"sentiment-data\" not found".into()),
                ..Default::default()
            }]),
            ..Default::default()
        },
    );
    let no_image = pending(
        "p-1",
        PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: names::WORKER_CONTAINER.into(),
                state: Some(ContainerState {
                    waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                        reason: Some("ImagePullBackOff".into()),
                        message: Some("Back-off pulling image \"x\"".into()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
    );
    let j = job(0, None);
    for (pod, reason, words) in [
        (
            unschedulable,
            Reason::PodsUnschedulable,
            "pod p-0 cannot be scheduled: persistentvolumeclaim \"sentiment-data\" not found",
        ),
        (
            no_image,
            Reason::PodsNotStarting,
            "pod p-1: container worker cannot start: ImagePullBackOff",
        ),
    ] {
        let pods = [pod];
        let s = with_pods(&p, &j, &pods);
        let d = get(&s, ConditionType::Degraded);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", reason.as_str())
        );
        assert!(d.message.starts_with(words), "{}", d.message);
    }
}

#[test]
fn transition_time_is_kept_while_the_status_holds() {
    let mut p = pipeline("Task");
    let j = job(1, None);
    let first = compute(
        &p,
        &Observed {
            job: Some(&j),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    p.status = Some(first.clone());
    let later = Timestamp::from_second(1000).unwrap();
    let second = compute(
        &p,
        &Observed {
            job: Some(&j),
            ..Default::default()
        },
        later,
    );
    assert_eq!(
        get(&second, ConditionType::Progressing).last_transition_time,
        get(&first, ConditionType::Progressing).last_transition_time
    );
    let done = job(4, Some("Complete"));
    let third = compute(
        &p,
        &Observed {
            job: Some(&done),
            ..Default::default()
        },
        later,
    );
    assert_eq!(
        get(&third, ConditionType::Progressing)
            .last_transition_time
            .0,
        later
    );
}

#[test]
fn refused_objects_block_with_the_reason_until_they_are_accepted() {
    for mode in ["Task", "Actor"] {
        let mut p = pipeline(mode);
        let blocked = compute(
            &p,
            &Observed {
                blocked: Some(Blocked {
                    reason: Reason::ObjectsRefused,
                    message: "the API server refused ...".into(),
                }),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(blocked.phase, Some(Phase::Blocked), "{mode}");
        let d = get(&blocked, ConditionType::Degraded);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str(), d.message.as_str()),
            (
                "True",
                Reason::ObjectsRefused.as_str(),
                "the API server refused ..."
            )
        );
        for t in [ConditionType::Progressing, ConditionType::WeightsReady] {
            assert_eq!(get(&blocked, t).status, "False", "{mode} {t:?}");
        }
        // Accepted after a change: the objects are applied and the condition clears.
        p.status = Some(blocked);
        let j = job(0, None);
        let allowed = compute(
            &p,
            &Observed {
                job: Some(&j),
                ..Default::default()
            },
            Timestamp::UNIX_EPOCH,
        );
        assert_ne!(allowed.phase, Some(Phase::Blocked), "{mode}");
        assert_eq!(
            (
                get(&allowed, ConditionType::Degraded).status.as_str(),
                get(&allowed, ConditionType::Degraded).reason.as_str()
            ),
            ("False", "AsExpected")
        );
    }
}

#[test]
fn refused_spec_change_is_degraded_with_the_reason() {
    let p = pipeline("Task");
    let j = job(1, None);
    let s = compute(
        &p,
        &Observed {
            job: Some(&j),
            refused: Some("a running Job cannot change".into()),
            ..Default::default()
        },
        Timestamp::UNIX_EPOCH,
    );
    let d = get(&s, ConditionType::Degraded);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "SpecChangeRefused")
    );
}
