//! What the repository commits from `kube-zerocopy` must match what it generates now
//! (`make generate` rewrites them): the CRDs, in crds/ and in the chart, and the rendered
//! examples. And the rendered pods keep their promises.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::CustomResourceExt;
use kube_zerocopy::crd::{InferencePipeline, Mode, PlannedInput, Sharing};
use kube_zerocopy::local::load_pipeline;
use kube_zerocopy::node_store::NodeStore;
use kube_zerocopy::render::{
    render, render_planned, Rendered, Settings, BINDINGS_VOLUME, DOWNLOADS_VOLUME, MODELS_VOLUME,
    STORE_VOLUME,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_crds_match_the_generated_ones() {
    for crd in [InferencePipeline::crd(), NodeStore::crd()] {
        let generated = serde_yaml::to_string(&crd).unwrap();
        let file = format!("{}.yaml", crd.metadata.name.unwrap());
        for folder in ["crds", "charts/kube-zerocopy/files/crds"] {
            let path = format!("{folder}/{file}");
            assert!(
                read(&path) == generated,
                "{path} drifted from `kube-zerocopy crd`: run `make generate`"
            );
        }
    }
}

#[test]
fn the_committed_reference_is_the_crds_own() {
    let generated =
        kube_zerocopy::reference::markdown(&[InferencePipeline::crd(), NodeStore::crd()]);
    assert!(
        read("docs/reference.md") == generated,
        "docs/reference.md drifted from `kube-zerocopy reference`: run `make generate`"
    );
}

const EXAMPLES: [&str; 4] = [
    "task-torchscript",
    "task-safetensors",
    "actor-torchscript",
    "actor-safetensors",
];

fn pipeline(name: &str) -> InferencePipeline {
    load_pipeline(&repo().join(format!("examples/{name}.yaml"))).unwrap()
}

/// The objects of an example; one whose shards are planned as once its plan found 4.
fn rendered(name: &str) -> Rendered {
    render_planned(&pipeline(name), &Settings::default(), Some(&planned())).unwrap()
}

fn planned() -> PlannedInput {
    PlannedInput {
        shards: 4,
        input_digest: "ab".repeat(32),
    }
}

#[test]
fn committed_renders_match_the_examples() {
    for name in EXAMPLES {
        let yaml = rendered(name).to_yaml().unwrap();
        assert!(
            read(&format!("examples/rendered/{name}.yaml")) == yaml,
            "examples/rendered/{name}.yaml drifted: run `make generate`"
        );
    }
}

fn pod_spec(r: &Rendered) -> PodSpec {
    match r {
        Rendered::Task { job } | Rendered::Plan { job } => {
            job.spec.clone().unwrap().template.spec.unwrap()
        }
        Rendered::Actor { deployment, .. } => {
            deployment.spec.clone().unwrap().template.spec.unwrap()
        }
    }
}

fn env_of(c: &Container) -> Vec<(String, String)> {
    c.env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect()
}

#[test]
fn rendered_pods_keep_their_promises() {
    for name in EXAMPLES {
        let pipeline = pipeline(name);
        let spec = pod_spec(&rendered(name));
        // Non-root everywhere, read-only root file systems, no escalation.
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let worker = &spec.containers[0];
        for c in spec.init_containers.iter().flatten().chain([worker]) {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(
                (
                    sc.run_as_non_root,
                    sc.allow_privilege_escalation,
                    sc.read_only_root_filesystem
                ),
                (Some(true), Some(false), Some(true)),
                "{name}/{}",
                c.name
            );
        }
        // cuda asks for a GPU.
        let gpu = worker
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .is_some();
        assert_eq!(gpu, name == "task-safetensors", "{name}");
        // What the worker runs, written out: its subcommand by mode, its device, its data
        // folders from the pipeline, the port the Service and the probe use.
        let mode = match pipeline.spec.mode {
            Mode::Task => "task",
            Mode::Actor => "actor",
        };
        assert_eq!(
            worker.command.clone().unwrap(),
            ["kube-zerocopy-worker", mode],
            "{name}"
        );
        let worker_env = env_of(worker);
        let names =
            |env: &[(String, String)]| env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        // Both Task examples declare their shard count.
        let expected_worker: &[&str] = match mode {
            "task" => &[
                "KZC_MODELS",
                "KZC_STORE",
                "KZC_BINDINGS",
                "KZC_INPUT",
                "KZC_OUTPUT",
                "KZC_SHARDS",
                "KZC_RUN",
                "KZC_DEVICE",
            ],
            _ => &[
                "KZC_MODELS",
                "KZC_STORE",
                "KZC_BINDINGS",
                "KZC_DEVICE",
                "KZC_LISTEN",
                "KZC_MODEL_NAME",
            ],
        };
        assert_eq!(
            names(&worker_env),
            expected_worker,
            "{name}: the worker's variables"
        );
        let value = |env: &[(String, String)], key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name}: no {key}"))
        };
        let device = match name {
            "task-safetensors" => "cuda",
            _ => "cpu",
        };
        assert_eq!(value(&worker_env, "KZC_DEVICE"), device, "{name}");
        if mode == "task" {
            let folder = |d: &Option<kube_zerocopy::crd::DataLocation>| {
                d.as_ref()
                    .unwrap()
                    .uri
                    .strip_prefix("file://")
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(
                value(&worker_env, "KZC_INPUT"),
                folder(&pipeline.spec.input)
            );
            assert_eq!(
                value(&worker_env, "KZC_OUTPUT"),
                folder(&pipeline.spec.output)
            );
            let shards = pipeline.spec.task.as_ref().and_then(|t| t.shards).unwrap();
            assert_eq!(value(&worker_env, "KZC_SHARDS"), shards.to_string());
        } else {
            assert_eq!(value(&worker_env, "KZC_LISTEN"), "0.0.0.0:8080", "{name}");
        }
        // The worker reads the models as the pipeline names them.
        let models = value(&worker_env, "KZC_MODELS");
        let listed: Vec<_> = pipeline
            .spec
            .models
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(
            kube_zerocopy_contract::models::models_from_json(&models)
                .unwrap()
                .iter()
                .map(|m| m.name.clone())
                .collect::<Vec<_>>(),
            listed,
            "{name}"
        );
        // Every path a container is given lies inside the volume it belongs to.
        let inside = |c: &Container, env: &[(String, String)], key: &str, volume: &str| {
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volume)
                .unwrap_or_else(|| panic!("{name}/{}: {volume} is not mounted", c.name));
            assert_eq!(
                (volume, mount.read_only),
                (volume, Some(c.name != "weight-server")),
                "{name}/{}: only the weight server writes its volumes",
                c.name
            );
            let path = value(env, key);
            Path::new(&path)
                .strip_prefix(&mount.mount_path)
                .unwrap_or_else(|_| {
                    panic!(
                        "{name}/{}: {key}={path} lies outside {volume}'s mount {}",
                        c.name, mount.mount_path
                    )
                })
                .to_owned()
        };
        match pipeline.spec.sharing {
            Sharing::Pod => {
                // The weight server is a native sidecar with a startup probe, before any
                // worker; worker and weight server find the store and the bindings at the
                // same place in their volumes.
                let sidecar = &spec.init_containers.as_ref().unwrap()[0];
                assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"), "{name}");
                let probe = sidecar.startup_probe.as_ref().unwrap();
                let probe = probe.exec.as_ref().unwrap().command.clone().unwrap();
                assert_eq!(probe, ["kube-zerocopy-weight-server", "probe"], "{name}");
                assert_eq!(
                    sidecar.command.clone().unwrap(),
                    ["kube-zerocopy-weight-server", "serve"],
                    "{name}"
                );
                let sidecar_env = env_of(sidecar);
                assert_eq!(
                    names(&sidecar_env),
                    [
                        "KZC_MODELS",
                        "KZC_STORE",
                        "KZC_BINDINGS",
                        "KZC_DOWNLOAD_DIR",
                        "KZC_LISTEN"
                    ],
                    "{name}: the weight server's variables"
                );
                assert_eq!(value(&sidecar_env, "KZC_LISTEN"), "0.0.0.0:8471", "{name}");
                assert_eq!(models, value(&sidecar_env, "KZC_MODELS"), "{name}");
                inside(sidecar, &sidecar_env, "KZC_DOWNLOAD_DIR", DOWNLOADS_VOLUME);
                for (key, volume) in [
                    ("KZC_STORE", STORE_VOLUME),
                    ("KZC_BINDINGS", BINDINGS_VOLUME),
                ] {
                    assert_eq!(
                        inside(worker, &worker_env, key, volume),
                        inside(sidecar, &sidecar_env, key, volume),
                        "{name}: worker and weight server disagree on {key} inside {volume}"
                    );
                }
            }
            Sharing::Node => {
                // No weight server: one read-only volume of the node agent's driver naming
                // the worker's models, the view's root its store, bindings/ its bindings.
                assert!(spec.init_containers.is_none(), "{name}: a weight server");
                let volumes = spec.volumes.clone().unwrap();
                let models_volume = volumes.iter().find(|v| v.name == MODELS_VOLUME).unwrap();
                let csi = models_volume.csi.as_ref().unwrap();
                assert_eq!(
                    (csi.driver.as_str(), csi.read_only),
                    ("models.kube-zerocopy.io", Some(true)),
                    "{name}"
                );
                let attributes = csi.volume_attributes.clone().unwrap();
                assert_eq!(attributes.keys().collect::<Vec<_>>(), ["models"], "{name}");
                assert_eq!(attributes["models"], models, "{name}");
                let at = |key| inside(worker, &worker_env, key, MODELS_VOLUME);
                assert_eq!(
                    (at("KZC_STORE"), at("KZC_BINDINGS")),
                    (PathBuf::new(), PathBuf::from("bindings")),
                    "{name}"
                );
                // Nothing of the node's and nothing writable of the operator's.
                let operator_volumes: Vec<_> = volumes
                    .iter()
                    .filter(|v| v.name.starts_with("kzc-"))
                    .map(|v| v.name.as_str())
                    .collect();
                assert_eq!(operator_volumes, [MODELS_VOLUME], "{name}");
                assert!(volumes.iter().all(|v| v.host_path.is_none()), "{name}");
            }
        }
    }
}

fn store_volume(spec: &PodSpec) -> &k8s_openapi::api::core::v1::Volume {
    spec.volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "kzc-store")
        .unwrap()
}

#[test]
fn memory_is_sized_from_the_models() {
    // task-torchscript: one 400Mi model, in the pod's own store, charged to its weight server.
    let spec = pod_spec(&rendered("task-torchscript"));
    let store = store_volume(&spec);
    let empty_dir = store.empty_dir.as_ref().unwrap();
    assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
    assert_eq!(empty_dir.size_limit.as_ref().unwrap().0, "436Mi");
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let limits = sidecar.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "528Mi");
    // Node sharing: the weights are the node agent's memory; the pod asks for what its
    // pipeline's template asks for, nothing more.
    for name in ["actor-safetensors", "task-safetensors"] {
        let pipeline = pipeline(name);
        let spec = pod_spec(&rendered(name));
        assert_eq!(spec.containers.len(), 1, "{name}");
        let requested = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("memory"))
            .map(|q| q.0.clone());
        let asked = pipeline
            .spec
            .template
            .as_ref()
            .and_then(|t| t.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("memory"))
            .map(|q| q.0.clone());
        assert_eq!(requested, asked, "{name}");
    }
}

#[test]
fn owned_objects_point_back_at_the_pipeline() {
    let mut pipeline = pipeline("actor-torchscript");
    pipeline.metadata.uid = Some("1234".into());
    let Rendered::Actor {
        deployment,
        service,
        ..
    } = render(&pipeline, &Settings::default()).unwrap()
    else {
        panic!("an Actor pipeline renders a Deployment and a Service")
    };
    for meta in [&deployment.metadata, &service.metadata] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            ("InferencePipeline", "ranker", "1234", Some(true))
        );
    }
    assert_eq!(deployment.spec.unwrap().replicas, Some(4));
}

/// Every pipeline of examples/ that runs on a cluster: all but the local-* ones, which
/// `kube-zerocopy local` runs with the host's paths (and `make generate` skips too).
fn cluster_examples() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|f| f.strip_suffix(".yaml").map(str::to_owned))
        .filter(|n| !n.starts_with("local-"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_weight_server_can_read_every_file_model_and_writes_only_its_own_volumes() {
    let names = cluster_examples();
    assert!(names.len() >= EXAMPLES.len(), "{names:?}");
    let mut file_models = 0;
    for name in names {
        let pipeline = pipeline(&name);
        let spec = pod_spec(&rendered(&name));
        // Node sharing has no weight server: the node agent reads the sources.
        let Some(sidecar) = spec.init_containers.as_ref().map(|c| &c[0]) else {
            assert_eq!(pipeline.spec.sharing, Sharing::Node, "{name}");
            continue;
        };
        let mounts = sidecar.volume_mounts.clone().unwrap();
        for m in &pipeline.spec.models {
            let Some(path) = m.source.uri.strip_prefix("file://") else {
                continue;
            };
            file_models += 1;
            // Path::starts_with compares whole components: /models-old is not under /models.
            assert!(
                mounts
                    .iter()
                    .any(|mount| Path::new(path).starts_with(&mount.mount_path)),
                "{name}: model {} ({path}) is under none of the weight server's mounts {:?}",
                m.name,
                mounts.iter().map(|m| &m.mount_path).collect::<Vec<_>>()
            );
        }
        for mount in &mounts {
            let own =
                [STORE_VOLUME, BINDINGS_VOLUME, DOWNLOADS_VOLUME].contains(&mount.name.as_str());
            if !own {
                assert_eq!(
                    mount.read_only,
                    Some(true),
                    "{name}: the weight server must mount {} read-only",
                    mount.name
                );
            }
        }
    }
    // A Pod-sharing example reads its model from a PVC: the check above is not empty.
    assert!(file_models > 0);
}

/// A Task pipeline on S3 prefixes without a shard count: first the planning Job, one
/// restricted container that lists the input with the input's credentials only (no weight
/// server, no models, no output credentials); then, planned, the Indexed Job whose workers
/// carry the plan and mount both prefixes' credentials, which the weight server never mounts.
#[test]
fn an_unplanned_task_is_planned_first_and_only_the_workers_mount_the_datas_credentials() {
    let pipeline = pipeline("task-s3");
    let Rendered::Plan { job } = render(&pipeline, &Settings::default()).unwrap() else {
        panic!("task-s3 without a plan renders its planning Job");
    };
    assert_eq!(job.metadata.name.as_deref(), Some("embed-s3-plan"));
    let spec = job.spec.clone().unwrap();
    assert_eq!(spec.completions, None);
    let pod = spec.template.spec.unwrap();
    assert!(pod.init_containers.is_none(), "no weight server");
    assert_eq!(pod.containers.len(), 1);
    let planner = &pod.containers[0];
    assert_eq!(planner.name, "plan");
    assert_eq!(
        planner.command.clone().unwrap(),
        ["kube-zerocopy-worker", "plan"]
    );
    let sc = planner.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.read_only_root_filesystem),
        (Some(true), Some(true))
    );
    let env = env_of(planner);
    assert!(
        env.contains(&("KZC_INPUT".into(), "s3://batch/inputs/".into())),
        "{env:?}"
    );
    let s3 = &env.iter().find(|(k, _)| k == "KZC_INPUT_S3").unwrap().1;
    assert!(
        s3.contains(r#""credentialsDir":"/kzc/data/input/s3""#),
        "{s3}"
    );
    assert!(
        !env.iter()
            .any(|(k, _)| k.starts_with("KZC_OUTPUT") || k == "KZC_MODELS"),
        "{env:?}"
    );
    let volumes: Vec<String> = pod
        .volumes
        .unwrap()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(volumes, ["kzc-input-credentials"]);

    let Rendered::Task { job } = rendered("task-s3") else {
        panic!("task-s3 with a plan renders its Job");
    };
    assert_eq!(
        job.metadata.annotations.as_ref().unwrap()["kube-zerocopy.io/input-digest"],
        "ab".repeat(32)
    );
    let spec = job.spec.unwrap();
    assert_eq!(spec.completions, Some(4));
    let pod = spec.template.spec.unwrap();
    let worker = &pod.containers[0];
    let env = env_of(worker);
    for (k, v) in [
        ("KZC_SHARDS", "4".to_owned()),
        ("KZC_INPUT_DIGEST", "ab".repeat(32)),
    ] {
        assert!(env.contains(&(k.into(), v)), "{k}: {env:?}");
    }
    let mounted = |c: &Container| -> Vec<(String, String)> {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name.ends_with("-credentials"))
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect()
    };
    assert_eq!(
        mounted(worker),
        [
            ("kzc-input-credentials".into(), "/kzc/data/input".into()),
            ("kzc-output-credentials".into(), "/kzc/data/output".into())
        ]
    );
    let sidecar = &pod.init_containers.as_ref().unwrap()[0];
    assert!(mounted(sidecar).is_empty(), "{:?}", mounted(sidecar));
}

/// examples/actor-batch.yaml: the replicas behind a Service that selects only them, and a
/// driver Job under its own ServiceAccount, whose Role lets it list EndpointSlices and patch its
/// own pipeline's status, nothing else; the driver streams the input through the Service's
/// replicas as the pipeline's model, its run named after what it computes.
#[test]
fn a_batch_run_is_driven_by_a_job_that_may_only_find_the_replicas_and_report() {
    let mut pipeline = pipeline("actor-batch");
    pipeline.metadata.uid = Some("1234abcd-ef".into());
    let Rendered::Actor {
        deployment,
        service,
        run: Some(run),
        ..
    } = render(&pipeline, &Settings::default()).unwrap()
    else {
        panic!("an Actor with an input renders a batch run")
    };
    let selector = service.spec.unwrap().selector.unwrap();
    assert_eq!(selector["app.kubernetes.io/component"], "actor");
    let replicas = deployment
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap();
    assert!(selector.iter().all(|(k, v)| replicas.get(k) == Some(v)));
    let driver_pod = run.job.spec.as_ref().unwrap().template.clone();
    let driver_labels = driver_pod.metadata.unwrap().labels.unwrap();
    assert!(
        !selector
            .iter()
            .all(|(k, v)| driver_labels.get(k) == Some(v)),
        "the Service would send requests to the driver"
    );

    let name = "reviews-zerocopy-driver";
    let job_spec = run.job.spec.as_ref().unwrap();
    assert_eq!(job_spec.pod_replacement_policy.as_deref(), Some("Failed"));
    let spec = driver_pod.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some(name));
    assert_eq!(run.account.metadata.name.as_deref(), Some(name));
    assert_eq!(run.binding.role_ref.name, name);
    let subject = &run.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", name)
    );
    let rules = serde_json::to_value(&run.role.rules).unwrap();
    assert_eq!(
        rules,
        serde_json::json!([
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
            {"apiGroups": ["kube-zerocopy.io"], "resources": ["inferencepipelines/status"],
             "resourceNames": ["reviews"], "verbs": ["patch"]},
        ])
    );
    let env = env_of(&spec.containers[0]);
    let value = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(spec.containers[0].command.as_ref().unwrap()[1], "drive");
    assert_eq!(value("KZC_SERVICE"), Some("reviews-zerocopy"));
    assert_eq!(value("KZC_MODEL_NAME"), Some("reviews"));
    assert_eq!(value("KZC_PIPELINE"), Some("reviews"));
    assert_eq!(value("KZC_INPUT"), Some("/data/input"));
    assert_eq!(value("KZC_OUTPUT"), Some("/data/output"));
    assert_eq!(value("KZC_IN_FLIGHT_PER_REPLICA"), Some("2"));
    let run_name = kube_zerocopy::batch_run::run_name(&pipeline);
    assert_eq!(value("KZC_RUN"), Some(run_name.as_str()));
    assert_eq!(
        run.job.metadata.annotations.as_ref().unwrap()
            [kube_zerocopy_contract::names::RUN_ANNOTATION],
        run_name
    );
    for meta in [
        &run.job.metadata,
        &run.account.metadata,
        &run.role.metadata,
        &run.binding.metadata,
    ] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, "1234abcd-ef");
    }
}

/// The driver holds a token for the pipeline's status: it runs the project's image whatever
/// the template names, so that a tenant's image never runs with it. The replicas run theirs.
#[test]
fn a_batch_run_s_driver_runs_the_project_s_image_not_the_template_s() {
    let mut pipeline = pipeline("actor-batch");
    let template = pipeline.spec.template.get_or_insert_with(Default::default);
    template.image = Some("tenant/own:1".into());
    let settings = Settings::default();
    let Rendered::Actor {
        deployment,
        run: Some(run),
        ..
    } = render(&pipeline, &settings).unwrap()
    else {
        panic!("an Actor with an input renders a batch run")
    };
    let image = |pod: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        pod.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    assert_eq!(
        image(&run.job.spec.unwrap().template),
        settings.runtime_image
    );
    assert_eq!(image(&deployment.spec.unwrap().template), "tenant/own:1");
}

/// The replicas answer only the pods of their pipeline's namespace (the driver among them):
/// the NetworkPolicy selects the replicas alone and admits a peer of that namespace only.
#[test]
fn an_actor_s_replicas_admit_only_their_namespace() {
    let pipeline = pipeline("actor-batch");
    let Rendered::Actor {
        service,
        network_policy,
        ..
    } = render(&pipeline, &Settings::default()).unwrap()
    else {
        panic!("an Actor pipeline renders a NetworkPolicy")
    };
    let spec = serde_json::to_value(network_policy.spec.unwrap()).unwrap();
    let selector = serde_json::to_value(service.spec.unwrap().selector.unwrap()).unwrap();
    assert_eq!(spec["podSelector"]["matchLabels"], selector);
    assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(
        spec["ingress"],
        serde_json::json!([{"from": [{"podSelector": {}}]}])
    );
}

/// The pod contract: every container of every example (planning Jobs, Task workers, Actor
/// replicas, batch-run drivers, weight servers and their probes) sets only variables its
/// binary reads, and its binary's own parsers accept each value, giving back what the
/// pipeline says.
#[test]
fn every_rendered_container_s_environment_is_read_by_its_binary() {
    use kube_zerocopy_contract::pod::{self, from_env, variables};
    fn check<T: clap::Args + clap::FromArgMatches>(
        env: &[(String, String)],
        claimed: &mut Vec<String>,
    ) -> T {
        claimed.extend(variables::<T>());
        from_env(env).unwrap_or_else(|e| panic!("{e}"))
    }
    let mut checked = std::collections::BTreeSet::new();
    for name in cluster_examples() {
        let pipeline = pipeline(&name);
        let mut pods = vec![pod_spec(&rendered(&name))];
        if let Ok(plan @ Rendered::Plan { .. }) = render(&pipeline, &Settings::default()) {
            pods.push(pod_spec(&plan));
        }
        if let Rendered::Actor { run: Some(run), .. } = rendered(&name) {
            pods.push(run.job.spec.unwrap().template.spec.unwrap());
        }
        for pod in pods {
            let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
            for container in containers {
                let env = env_of(container);
                let command = container.command.clone().unwrap();
                let mut probe = container
                    .startup_probe
                    .as_ref()
                    .and_then(|p| p.exec.as_ref()?.command.clone());
                let mut claimed = vec![];
                let role = format!("{name}: {}", command.join(" "));
                match &command.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                    ["kube-zerocopy-worker", "plan"] => {
                        let input: pod::Input = check(&env, &mut claimed);
                        assert_eq!(
                            Some(&input.input),
                            pipeline
                                .spec
                                .input
                                .as_ref()
                                .map(|i| i.uri.trim_start_matches("file://").to_owned())
                                .as_ref()
                        );
                    }
                    ["kube-zerocopy-worker" | "kube-zerocopy-python-worker", "task"] => {
                        let models: pod::PodModels = check(&env, &mut claimed);
                        assert_eq!(models.models().unwrap().len(), pipeline.spec.models.len());
                        let _: pod::Device = check(&env, &mut claimed);
                        let task: pod::Task = check(&env, &mut claimed);
                        // Declared, or as planned.
                        let declared = pipeline.spec.task.as_ref().and_then(|t| t.shards);
                        let shards = declared.unwrap_or(planned().shards) as usize;
                        assert_eq!(task.shards, Some(shards), "{role}");
                    }
                    ["kube-zerocopy-worker" | "kube-zerocopy-python-worker", "actor"] => {
                        let models: pod::PodModels = check(&env, &mut claimed);
                        assert_eq!(models.models().unwrap().len(), pipeline.spec.models.len());
                        let _: pod::Device = check(&env, &mut claimed);
                        let actor: pod::Actor = check(&env, &mut claimed);
                        assert_eq!(actor.model_name, name_of(&pipeline));
                    }
                    ["kube-zerocopy-worker", "drive"] => {
                        let driver: pod::Driver = check(&env, &mut claimed);
                        assert_eq!(driver.pipeline.as_deref(), Some(&name_of(&pipeline)[..]));
                    }
                    ["kube-zerocopy-weight-server", "serve"] => {
                        let models: pod::PodModels = check(&env, &mut claimed);
                        assert_eq!(models.models().unwrap().len(), pipeline.spec.models.len());
                        let _: pod::WeightServer = check(&env, &mut claimed);
                        let _: pod::Serve = check(&env, &mut claimed);
                        // The startup probe runs `probe` with the same store and models.
                        let probe = probe.take().expect("the weight server has a probe");
                        assert_eq!(probe[..2], ["kube-zerocopy-weight-server", "probe"]);
                    }
                    other => panic!("{name}: a container runs {other:?}, which no test reads"),
                }
                for (variable, _) in &env {
                    assert!(
                        claimed.contains(variable),
                        "{role} sets {variable}, which its binary does not read"
                    );
                }
                checked.insert(command.join(" "));
            }
        }
    }
    // Every kind of container was seen (the Python worker's Task in the Python example).
    assert_eq!(checked.len(), 6, "{checked:?}");
}

fn name_of(pipeline: &InferencePipeline) -> String {
    pipeline.metadata.name.clone().unwrap()
}
