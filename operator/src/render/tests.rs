use super::*;
use crate::node_store::held_label;
use k8s_openapi::api::core::v1::{Container, PodSpec, ProjectedVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_zerocopy_contract::models::MODELS_ATTRIBUTE;
use kube_zerocopy_contract::pod;

/// A Task pipeline with `template` (YAML under spec) besides, its model and data on volumes
/// of the template (see [`runnable`]).
fn pipeline(template: &str) -> InferencePipeline {
    runnable(serde_yaml::from_str(&format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///opt/models/m.pt'}}}}]\n  input: {{uri: 'file:///data/in'}}\n  output: {{uri: 'file:///data/out'}}\n  task: {{shards: 2}}\n{template}"
    ))
    .unwrap())
}

/// `p` as a pipeline must be to run: an emptyDir volume mounted at the folder of each of its
/// `file://` paths that no mount of its template covers (`data` at /data, ...), and a size of
/// 1Mi for each model without one.
fn runnable(mut p: InferencePipeline) -> InferencePipeline {
    for model in &mut p.spec.models {
        model
            .source
            .size
            .get_or_insert_with(|| Quantity("1Mi".into()));
    }
    let uris: Vec<String> = p
        .spec
        .models
        .iter()
        .map(|m| m.source.uri.clone())
        .chain(p.spec.input.iter().map(|d| d.uri.clone()))
        .chain(p.spec.output.iter().map(|d| d.uri.clone()))
        .collect();
    let overrides = p.spec.template.get_or_insert_with(Default::default);
    for uri in uris {
        let Some(path) = uri.strip_prefix("file://") else {
            continue;
        };
        let folder = std::path::Path::new(path).parent().unwrap();
        let mounts = overrides.volume_mounts.get_or_insert_with(Vec::new);
        if mounts.iter().any(|m| folder.starts_with(&m.mount_path)) {
            continue;
        }
        let name = folder.file_name().unwrap().to_string_lossy().into_owned();
        mounts.push(VolumeMount {
            name: name.clone(),
            mount_path: folder.display().to_string(),
            ..Default::default()
        });
        overrides.volumes.get_or_insert_with(Vec::new).push(Volume {
            name,
            empty_dir: Some(Default::default()),
            ..Default::default()
        });
    }
    p
}

fn containers(p: &InferencePipeline) -> (Container, Container) {
    let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
        panic!("a Task pipeline renders a Job")
    };
    let pod = job.spec.unwrap().template.spec.unwrap();
    (
        pod.init_containers.unwrap()[0].clone(),
        pod.containers[0].clone(),
    )
}

#[test]
fn node_sharing_pods_prefer_the_nodes_that_hold_their_models() {
    let digest = "ab".repeat(32);
    let yaml = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Actor\n  sharing: SHARING\n  actor: {{replicas: 2}}\n  models:\n  - {{name: a, format: TorchScript, source: {{uri: 'https://m.example/a.pt', sha256: '{digest}'}}}}\n  - {{name: b, format: TorchScript, source: {{uri: 'https://m.example/b.pt'}}}}\n"
    );
    let affinity = |sharing: &str| {
        let p: InferencePipeline =
            runnable(serde_yaml::from_str(&yaml.replace("SHARING", sharing)).unwrap());
        let Rendered::Actor { deployment, .. } = render(&p, &Settings::default()).unwrap() else {
            panic!("an Actor pipeline renders a Deployment")
        };
        deployment.spec.unwrap().template.spec.unwrap().affinity
    };
    // One preference, for the model whose digest is known before it is fetched.
    let node = affinity("Node").unwrap().node_affinity.unwrap();
    assert!(node
        .required_during_scheduling_ignored_during_execution
        .is_none());
    let terms = node
        .preferred_during_scheduling_ignored_during_execution
        .unwrap();
    let [term] = &terms[..] else {
        panic!("{terms:?}")
    };
    let [requirement] = &term.preference.match_expressions.as_ref().unwrap()[..] else {
        panic!("{term:?}")
    };
    assert_eq!(requirement.key, held_label(&digest));
    assert_eq!(requirement.operator, "Exists");
    // Each pod holds its own copy with Pod sharing: no node is better.
    assert_eq!(affinity("Pod"), None);
}

/// A private model with Node sharing: the kubelet hands the one Secret to the node's
/// agent with the volume (nodePublishSecretRef), the volume's models name its keys, and no
/// container of the pod mounts it.
#[test]
fn a_private_model_s_secret_goes_to_the_node_agent_with_the_volume_alone() {
    let p: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Actor\n  sharing: Node\n  actor: {replicas: 1}\n  models:\n    - {name: a, format: TorchScript, source: {uri: 'https://hub.example/a.pt', bearerTokenSecret: {name: team-models, key: hub-token}}}\n    - {name: b, format: TorchScript, source: {uri: 's3://weights/b.pt', s3: {region: eu-west-1, credentialsSecret: team-models}}}\n",
    )
    .unwrap());
    let Rendered::Actor { deployment, .. } = render(&p, &Settings::default()).unwrap() else {
        panic!("an Actor pipeline renders a Deployment")
    };
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap();
    let csi = volumes
        .iter()
        .find_map(|v| v.csi.clone())
        .expect("a CSI volume");
    assert_eq!(csi.node_publish_secret_ref.unwrap().name, "team-models");
    let models = kube_zerocopy_contract::models::models_from_json(
        &csi.volume_attributes.unwrap()[MODELS_ATTRIBUTE],
    )
    .unwrap();
    use kube_zerocopy_contract::models::VOLUME_SECRET_DIR;
    assert_eq!(
        models[0].bearer_token_file.as_deref(),
        Some(format!("{VOLUME_SECRET_DIR}/hub-token").as_str())
    );
    assert_eq!(
        models[1].s3.as_ref().unwrap().credentials_dir.as_deref(),
        Some(VOLUME_SECRET_DIR)
    );
    assert!(volumes
        .iter()
        .all(|v| v.projected.is_none() && v.secret.is_none()));
}

fn mount_of<'a>(c: &'a Container, name: &str) -> &'a VolumeMount {
    let mounts = c.volume_mounts.as_ref().unwrap();
    mounts.iter().find(|m| m.name == name).unwrap()
}

#[test]
fn the_weight_server_mounts_the_templates_volumes_read_only() {
    let p = pipeline(
        "  template:\n    volumeMounts:\n      - {name: data, mountPath: /data}\n      - {name: models, mountPath: /opt/models, subPath: v2}\n",
    );
    let (sidecar, worker) = containers(&p);
    let data = mount_of(&sidecar, "data");
    assert_eq!(
        (data.mount_path.as_str(), data.read_only),
        ("/data", Some(true))
    );
    let models = mount_of(&sidecar, "models");
    assert_eq!(
        (models.sub_path.as_deref(), models.read_only),
        (Some("v2"), Some(true))
    );
    // The worker's mounts stay as the template says: it writes its output to /data.
    assert_eq!(mount_of(&worker, "data").read_only, None);
    // The sidecar's own volumes stay writable.
    assert_eq!(mount_of(&sidecar, STORE_VOLUME).read_only, Some(false));
}

/// The volumes of a Task pipeline's pods.
fn task_volumes(p: &InferencePipeline) -> Vec<Volume> {
    let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
        unreachable!()
    };
    job.spec.unwrap().template.spec.unwrap().volumes.unwrap()
}

fn projected_volume(volumes: &[Volume], name: &str) -> ProjectedVolumeSource {
    volumes
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.projected.clone())
        .unwrap()
}

/// The models as the weight server reads them from its environment.
fn models_of(sidecar: Container) -> Vec<kube_zerocopy_contract::models::ModelSource> {
    let models = sidecar
        .env
        .unwrap()
        .into_iter()
        .find(|e| e.name == kube_zerocopy_contract::models::MODELS_ENV)
        .and_then(|e| e.value)
        .unwrap();
    kube_zerocopy_contract::models::models_from_json(&models).unwrap()
}

#[test]
fn the_client_token_reaches_the_replicas_and_the_driver_only() {
    let p: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Actor\n  actor: {replicas: 2, tokenSecret: {name: clients, key: bearer}}\n  models: [{name: m, format: TorchScript, source: {uri: 'https://a.example/m.pt'}}]\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n",
    )
    .unwrap());
    let Rendered::Actor {
        deployment, run, ..
    } = render(&p, &Settings::default()).unwrap()
    else {
        panic!("an Actor pipeline renders a Deployment")
    };
    let token_file = Some("/kzc/client-token/token".to_owned());
    // The token file as the worker reads it, in either role.
    let env_of = |c: &Container| {
        let env: Vec<(String, String)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let file = |file: Option<std::path::PathBuf>| file.map(|f| f.display().to_string());
        match c.command.as_ref().map(|c| c[1].as_str()) {
            Some("actor") => file(pod::from_env::<pod::Actor>(&env).unwrap().client_token_file),
            Some("drive") => file(
                pod::from_env::<pod::Driver>(&env)
                    .unwrap()
                    .client_token_file,
            ),
            _ => env
                .iter()
                .any(|(_, v)| v.contains("client-token"))
                .then(|| "mentioned".to_owned()),
        }
    };
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let worker = &pod.containers[0];
    assert_eq!(env_of(worker), token_file);
    let mounted = mount_of(worker, CLIENT_TOKEN_VOLUME);
    assert_eq!(
        (mounted.mount_path.as_str(), mounted.read_only),
        ("/kzc/client-token", Some(true))
    );
    let weight_server = &pod.init_containers.unwrap()[0];
    assert_eq!(env_of(weight_server), None);
    assert!(weight_server
        .volume_mounts
        .iter()
        .flatten()
        .all(|m| m.name != CLIENT_TOKEN_VOLUME));
    let volumes = pod.volumes.unwrap();
    let projected = projected_volume(&volumes, CLIENT_TOKEN_VOLUME);
    assert_eq!(projected.default_mode, Some(0o440));
    let secret = projected.sources.unwrap()[0].secret.clone().unwrap();
    assert_eq!(secret.name, "clients");
    assert_eq!(secret.items.unwrap()[0].key, "bearer");

    let driver_pod = run.unwrap().job.spec.unwrap().template.spec.unwrap();
    let driver = &driver_pod.containers[0];
    assert_eq!(env_of(driver), token_file);
    assert_eq!(
        mount_of(driver, CLIENT_TOKEN_VOLUME).mount_path,
        "/kzc/client-token"
    );
    projected_volume(driver_pod.volumes.as_ref().unwrap(), CLIENT_TOKEN_VOLUME);

    // Without the setting, nothing of it.
    let mut open = p.clone();
    open.spec.actor.as_mut().unwrap().token_secret = None;
    let Rendered::Actor { deployment, .. } = render(&open, &Settings::default()).unwrap() else {
        panic!("an Actor pipeline renders a Deployment")
    };
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(env_of(&pod.containers[0]), None);
    assert!(pod
        .volumes
        .iter()
        .flatten()
        .all(|v| v.name != CLIENT_TOKEN_VOLUME));
}

#[test]
fn only_the_weight_server_mounts_a_models_token_and_ca_where_its_models_list_says() {
    let p: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - {name: open, format: TorchScript, source: {uri: 'https://a.example/m.pt', size: 2Ki}}\n    - name: private\n      format: TorchScript\n      source:\n        uri: https://b.example/m.pt\n        bearerTokenSecret: {name: hub, key: token}\n        caConfigMap: {name: corp-ca, key: bundle.pem}\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
    )
    .unwrap());
    let (sidecar, worker) = containers(&p);
    let source = mount_of(&sidecar, "kzc-source-1");
    assert_eq!(
        (source.mount_path.as_str(), source.read_only),
        ("/kzc/sources/private", Some(true))
    );
    let worker_mounts = worker.volume_mounts.unwrap();
    assert!(worker_mounts
        .iter()
        .all(|m| !m.name.starts_with(SOURCE_VOLUME_PREFIX)));
    let volumes = task_volumes(&p);
    let projected = projected_volume(&volumes, "kzc-source-1");
    assert_eq!(projected.default_mode, Some(0o440));
    let sources = projected.sources.unwrap();
    let secret = sources[0].secret.clone().unwrap();
    assert_eq!(secret.name, "hub");
    assert_eq!(secret.items.unwrap()[0].key, "token");
    let ca = sources[1].config_map.clone().unwrap();
    assert_eq!(
        (ca.name.as_str(), ca.items.unwrap()[0].key.as_str()),
        ("corp-ca", "bundle.pem")
    );
    // The first model names neither: no volume of its own.
    assert!(volumes.iter().all(|v| v.name != "kzc-source-0"));
    // What the weight server reads: the files where they are mounted, the size as a cap.
    let models = models_of(sidecar);
    assert_eq!(models[0].max_bytes, Some(2048));
    assert_eq!(models[0].bearer_token_file, None);
    assert_eq!(
        models[1].bearer_token_file.as_deref(),
        Some("/kzc/sources/private/token")
    );
    assert_eq!(
        models[1].ca_file.as_deref(),
        Some("/kzc/sources/private/ca.crt")
    );
}

#[test]
fn s3_credentials_are_mounted_for_the_weight_server_only_with_an_optional_session_token() {
    let p: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - name: head\n      format: Safetensors\n      architecture: Mlp\n      source:\n        uri: s3://weights/head.safetensors\n        s3: {endpoint: 'http://minio.storage:9000', region: eu-west-1, credentialsSecret: s3-reader}\n  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
    )
    .unwrap());
    let (sidecar, worker) = containers(&p);
    assert_eq!(
        mount_of(&sidecar, "kzc-source-0").mount_path,
        "/kzc/sources/head"
    );
    assert!(worker
        .volume_mounts
        .unwrap()
        .iter()
        .all(|m| !m.name.starts_with(SOURCE_VOLUME_PREFIX)));
    let sources = projected_volume(&task_volumes(&p), "kzc-source-0")
        .sources
        .unwrap();
    // Each projection as "secret: key->path, ... (optional)".
    let projected: Vec<String> = sources
        .into_iter()
        .map(|s| {
            let secret = s.secret.unwrap();
            let items: Vec<String> = secret
                .items
                .unwrap()
                .into_iter()
                .map(|i| format!("{}->{}", i.key, i.path))
                .collect();
            format!(
                "{}: {} ({:?})",
                secret.name,
                items.join(", "),
                secret.optional
            )
        })
        .collect();
    assert_eq!(
        projected,
        [
            "s3-reader: AWS_ACCESS_KEY_ID->s3/AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY->s3/AWS_SECRET_ACCESS_KEY (Some(false))",
            "s3-reader: AWS_SESSION_TOKEN->s3/AWS_SESSION_TOKEN (Some(true))",
        ]
    );
    let models = models_of(sidecar);
    assert_eq!(
        models[0].s3,
        Some(kube_zerocopy_contract::models::S3Access {
            endpoint: Some("http://minio.storage:9000".into()),
            region: Some("eu-west-1".into()),
            credentials_dir: Some("/kzc/sources/head/s3".into()),
        })
    );
}

/// An Azure model's account key goes to the weight server only, the data's to the workers
/// only, each under its own folder and named in the settings the process reads.
#[test]
fn azure_keys_are_mounted_where_they_are_read() {
    let p: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models:\n    - name: head\n      format: Safetensors\n      architecture: Mlp\n      source:\n        uri: az://weights/head.safetensors\n        azure: {account: models, credentialsSecret: az-models}\n  input: {uri: 'az://batch/in/', azure: {account: data, endpoint: 'http://azurite:10000/data', credentialsSecret: az-data}}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 1}\n",
    )
    .unwrap());
    let (sidecar, worker) = containers(&p);
    let names = |c: &Container| -> Vec<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| {
                m.name.starts_with(SOURCE_VOLUME_PREFIX) || m.name.ends_with("-credentials")
            })
            .map(|m| format!("{}@{}", m.name, m.mount_path))
            .collect()
    };
    assert_eq!(names(&sidecar), ["kzc-source-0@/kzc/sources/head"]);
    assert_eq!(names(&worker), ["kzc-input-credentials@/kzc/data/input"]);
    let key = |volume: &str| {
        let secret = projected_volume(&task_volumes(&p), volume).sources.unwrap()[0]
            .secret
            .clone()
            .unwrap();
        let item = &secret.items.unwrap()[0];
        format!("{}: {}->{}", secret.name, item.key, item.path)
    };
    assert_eq!(
        key("kzc-source-0"),
        "az-models: AZURE_STORAGE_ACCOUNT_KEY->azure/AZURE_STORAGE_ACCOUNT_KEY"
    );
    assert_eq!(
        key("kzc-input-credentials"),
        "az-data: AZURE_STORAGE_ACCOUNT_KEY->azure/AZURE_STORAGE_ACCOUNT_KEY"
    );
    assert_eq!(
        models_of(sidecar)[0].azure,
        Some(kube_zerocopy_contract::models::AzureAccess {
            account: "models".into(),
            endpoint: None,
            credentials_dir: Some("/kzc/sources/head/azure".into()),
        })
    );
    let env: Vec<(String, String)> = worker
        .env
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    let task: kube_zerocopy_contract::pod::Task =
        kube_zerocopy_contract::pod::from_env(&env).unwrap();
    assert_eq!(
        task.input.input_azure,
        Some(kube_zerocopy_contract::models::AzureAccess {
            account: "data".into(),
            endpoint: Some("http://azurite:10000/data".into()),
            credentials_dir: Some("/kzc/data/input/azure".into()),
        })
    );
}

/// With Pod sharing a model without a size is refused, saying what the size is for; with Node
/// sharing the node agent's store holds the weights and the size is not needed.
#[test]
fn a_model_of_unknown_size_is_refused_with_pod_sharing() {
    let mut p = pipeline("");
    p.spec.models[0].source.size = None;
    let Err(Error::Invalid(said)) = render(&p, &Settings::default()) else {
        panic!("a Pod-sharing model without a size is invalid")
    };
    assert!(
        said.to_string().starts_with(
            "spec.models[0].source.size is missing: with sharing: Pod it sizes each pod's memory"
        ),
        "{said}"
    );
    p.spec.sharing = crate::crd::Sharing::Node;
    assert!(render(&p, &Settings::default()).is_ok());
}

/// A `file://` path the pods would not see is refused in words that say what to mount: a model
/// or input on no volume of the template (unless the pipeline's own image may hold it), an
/// output on no volume whatever the image (the containers' files are read-only); with Node
/// sharing the node agent reads file:// models itself, from its own folders.
#[test]
fn file_paths_the_pods_cannot_see_are_refused_with_what_to_mount() {
    let task = |template: &str| -> InferencePipeline {
        serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///opt/models/m.pt', size: 1Mi}}}}]\n  input: {{uri: 'file:///data/in'}}\n  output: {{uri: 'file:///data/out'}}\n  task: {{shards: 2}}\n{template}"
        ))
        .unwrap()
    };
    let refused = |p: &InferencePipeline| match render(p, &Settings::default()) {
        Err(Error::Invalid(e)) => e.to_string(),
        other => panic!("refused as invalid, not {:?}", other.map(|_| ())),
    };
    let data = "  template:\n    volumes: [{name: data, persistentVolumeClaim: {claimName: batch}}]\n    volumeMounts: [{name: data, mountPath: /data}]\n";
    let said = refused(&task(data));
    assert!(
        said.contains("spec.models[0].source.uri file:///opt/models/m.pt: no volume of the template is mounted there")
            && said.contains("mount it at /opt/models (or a folder above) in template.volumeMounts, or build it into your own template.image"),
        "{said}"
    );
    // In the pipeline's own image, the model may be: it renders.
    let own_image = format!("{data}    image: registry.example/with-model:1\n");
    assert!(render(&task(&own_image), &Settings::default()).is_ok());
    // The output must be on a volume, whatever the image.
    let models_only = "  template:\n    image: registry.example/with-model:1\n    volumes: [{name: in, emptyDir: {}}]\n    volumeMounts: [{name: in, mountPath: /data/in/}]\n";
    let said = refused(&task(models_only));
    assert!(
        said.starts_with("spec.output.uri file:///data/out: no volume")
            && said.ends_with("mount it at /data (or a folder above) in template.volumeMounts"),
        "{said}"
    );
    // An output on a read-only mount could not be written.
    let read_only = "  template:\n    volumes: [{name: all, emptyDir: {}}]\n    volumeMounts: [{name: all, mountPath: /, readOnly: true}, {name: all, mountPath: /data/out, subPath: out}]\n";
    assert!(render(&task(read_only), &Settings::default()).is_ok());
    let read_only = "  template:\n    volumes: [{name: all, emptyDir: {}}]\n    volumeMounts: [{name: all, mountPath: /, readOnly: true}]\n";
    let said = refused(&task(read_only));
    assert!(
        said.starts_with("spec.output.uri file:///data/out: the volume \"all\" holding it is mounted read-only at /"),
        "{said}"
    );
    // A batch run's input is read by its driver, which runs the operator's image.
    let mut batch = task(&own_image);
    batch.spec.mode = Mode::Actor;
    batch.spec.task = None;
    batch.spec.actor = Some(serde_json::from_value(serde_json::json!({"replicas": 1})).unwrap());
    batch.spec.template.as_mut().unwrap().volume_mounts = Some(vec![]);
    batch.spec.models[0].source.uri = "https://m.example/m.pt".into();
    let said = refused(&batch);
    assert!(
        said.starts_with("spec.input.uri file:///data/in: no volume")
            && said.ends_with("in template.volumeMounts"),
        "{said}"
    );
    // A mount of the folder above covers it; with Node sharing the model is the agent's.
    let node = format!("  sharing: Node\n{data}");
    assert!(render(&task(&node), &Settings::default()).is_ok());
    let above = "  template:\n    volumes: [{name: all, emptyDir: {}}]\n    volumeMounts: [{name: all, mountPath: /}]\n";
    assert!(render(&task(above), &Settings::default()).is_ok());
}

#[test]
fn model_sizes_that_add_up_past_the_bound_are_refused_not_wrapped() {
    let two = |size: &str| {
        let mut p = pipeline("");
        let model = |name: &str| {
            serde_json::json!({"name": name, "format": "Safetensors", "architecture": "Mlp",
                "source": {"uri": format!("file:///{name}"), "size": size}})
        };
        p.spec.models =
            serde_json::from_value(serde_json::json!([model("a"), model("b")])).unwrap();
        p
    };
    for (size, last) in [("8Ei", "a"), ("600Pi", "b")] {
        let err = total_model_bytes(&two(size)).unwrap_err();
        let expected = format!("add up to more than 1Ei (model {last:?})");
        assert!(format!("{err:#}").contains(&expected), "{err:#}");
    }
    assert_eq!(total_model_bytes(&two("1Gi")).unwrap(), Some(2 << 30));
}

#[test]
fn cuda_pipelines_run_the_cuda_runtime_image_unless_the_template_names_one() {
    let settings = Settings::default();
    let images = |p: &InferencePipeline| {
        let (sidecar, worker) = containers(p);
        (sidecar.image.unwrap(), worker.image.unwrap())
    };
    // The defaults themselves: the chart's two images, not one for both.
    assert!(settings.runtime_image.starts_with("kube-zerocopy/runtime:"));
    assert!(settings
        .cuda_runtime_image
        .starts_with("kube-zerocopy/runtime-cuda:"));
    let cpu = images(&pipeline(""));
    assert_eq!(
        cpu,
        (settings.runtime_image.clone(), settings.runtime_image)
    );
    let cuda = images(&pipeline("  device: cuda\n"));
    assert_eq!(
        cuda,
        (
            settings.cuda_runtime_image.clone(),
            settings.cuda_runtime_image
        )
    );
    let custom = images(&pipeline(
        "  device: cuda\n  template: {image: 'registry.example/own:1'}\n",
    ));
    assert_eq!(custom.1, "registry.example/own:1");
}

/// GPUs are requested as much as limited (the API server refuses anything else): one by
/// default, the template's count, or a MIG slice instead of a whole GPU.
#[test]
fn gpus_are_requested_as_much_as_they_are_limited() {
    let gpus = |template: &str| {
        let (_, worker) = containers(&pipeline(&format!("  device: cuda\n{template}")));
        let r = worker.resources.unwrap();
        let amounts = |m: Option<BTreeMap<String, Quantity>>| -> Vec<(String, String)> {
            m.unwrap_or_default()
                .into_iter()
                .filter(|(n, _)| n.contains('/'))
                .map(|(n, q)| (n, q.0))
                .collect()
        };
        let (requests, limits) = (amounts(r.requests), amounts(r.limits));
        assert_eq!(requests, limits, "{template}");
        limits
    };
    let one = |name: &str, count: &str| vec![(name.to_owned(), count.to_owned())];
    assert_eq!(gpus(""), one("nvidia.com/gpu", "1"));
    assert_eq!(
        gpus("  template: {resources: {limits: {nvidia.com/gpu: 2}}}\n"),
        one("nvidia.com/gpu", "2")
    );
    assert_eq!(
        gpus("  template: {resources: {requests: {nvidia.com/gpu: 4}}}\n"),
        one("nvidia.com/gpu", "4")
    );
    assert_eq!(
        gpus("  template: {resources: {limits: {nvidia.com/mig-1g.10gb: 1}}}\n"),
        one("nvidia.com/mig-1g.10gb", "1")
    );
}

/// A queued Task pipeline's Job carries the queue label and starts suspended, for Kueue to
/// admit; an unqueued one runs at once; an Actor pipeline is not queued.
#[test]
fn a_queued_job_starts_suspended_with_the_queue_label() {
    let job = |p: &InferencePipeline| {
        let Rendered::Task { job } = render(p, &Settings::default()).unwrap() else {
            panic!("a Task pipeline renders a Job")
        };
        job
    };
    let plain = job(&pipeline(""));
    assert_eq!(plain.spec.unwrap().suspend, None);
    let mut queued = pipeline("");
    queued.metadata.labels = Some(BTreeMap::from([(
        crate::queue::QUEUE_LABEL.to_owned(),
        "team-a".to_owned(),
    )]));
    let queued_job = job(&queued);
    assert_eq!(
        queued_job.labels().get(crate::queue::QUEUE_LABEL),
        Some(&"team-a".to_owned())
    );
    assert_eq!(queued_job.spec.unwrap().suspend, Some(true));
    let mut actor: InferencePipeline = runnable(serde_yaml::from_str(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: a}\nspec:\n  mode: Actor\n  models: [{name: m, format: TorchScript, source: {uri: 'file:///opt/models/m.pt'}}]\n  actor: {replicas: 1}\n",
    )
    .unwrap());
    actor.metadata.labels = queued.metadata.labels.clone();
    let refused = render(&actor, &Settings::default())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("an Actor pipeline's replicas are not queued"),
        "{refused}"
    );
}

/// What the template adds to every pod of a pipeline: the worker's environment after the
/// operator's, the pull Secrets, the PriorityClass, the annotations, the labels (beside the
/// operator's) and the affinity, to which Node sharing adds its preference for the nodes that
/// hold the models; the planning Job's pod is placed and labelled the same way.
#[test]
fn the_templates_environment_placement_and_annotations_reach_every_pod() {
    let digest = "ab".repeat(32);
    let template = "  sharing: Node\n  template:\n    env: [{name: OMP_NUM_THREADS, value: '4'}]\n    imagePullSecrets: [{name: registry}]\n    priorityClassName: batch\n    runtimeClassName: gvisor\n    annotations: {sidecar.istio.io/inject: 'false'}\n    labels: {team: search}\n    affinity:\n      nodeAffinity:\n        requiredDuringSchedulingIgnoredDuringExecution:\n          nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [a]}]}]\n";
    let mut p = pipeline(template);
    p.spec.models[0].source.uri = "https://m.example/m.pt".into();
    p.spec.models[0].source.sha256 = Some(digest.clone());
    let settings = Settings {
        policy: PipelinePolicy {
            priority_classes: vec!["batch".into()],
            runtime_classes: vec!["gvisor".into()],
            ..PipelinePolicy::default()
        },
        ..Settings::default()
    };
    let Rendered::Task { job } = render(&p, &settings).unwrap() else {
        panic!("a Task pipeline renders a Job")
    };
    let template = job.spec.unwrap().template;
    let metadata = template.metadata.unwrap();
    assert_eq!(
        metadata.annotations.unwrap()["sidecar.istio.io/inject"],
        "false"
    );
    let labels = metadata.labels.unwrap();
    assert_eq!(labels["team"], "search");
    assert_eq!(labels[names::PIPELINE_LABEL], "p");
    let pod = template.spec.unwrap();
    // The template's first: where a name were given twice, the operator's (last) would win.
    let env = pod.containers[0].env.clone().unwrap();
    let first = env.first().unwrap();
    assert_eq!(
        (first.name.as_str(), first.value.as_deref()),
        ("OMP_NUM_THREADS", Some("4"))
    );
    assert!(env
        .iter()
        .any(|v| v.name == kube_zerocopy_contract::models::MODELS_ENV));
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    assert_eq!(pod.priority_class_name.as_deref(), Some("batch"));
    assert_eq!(pod.runtime_class_name.as_deref(), Some("gvisor"));
    let node = pod.affinity.unwrap().node_affinity.unwrap();
    let required = node
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(
        required.node_selector_terms[0]
            .match_expressions
            .as_ref()
            .unwrap()[0]
            .key,
        "topology.kubernetes.io/zone"
    );
    let preferred = node
        .preferred_during_scheduling_ignored_during_execution
        .unwrap();
    let held = &preferred[0].preference.match_expressions.as_ref().unwrap()[0];
    assert_eq!(held.key, held_label(&digest));

    // Planned shards: the planning Job's pod carries the same placement.
    p.spec.task.as_mut().unwrap().shards = None;
    let Rendered::Plan { job } = render(&p, &settings).unwrap() else {
        panic!("an unplanned Task renders its planning Job")
    };
    let template = job.spec.unwrap().template;
    assert_eq!(template.metadata.unwrap().labels.unwrap()["team"], "search");
    let pod = template.spec.unwrap();
    assert_eq!(pod.priority_class_name.as_deref(), Some("batch"));
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    assert!(pod.affinity.is_some());
    // It lists the input with the template's settings, as the workers read it.
    let env = pod.containers[0].env.clone().unwrap();
    assert_eq!(env[0].name, "OMP_NUM_THREADS");
}

#[test]
fn models_run_by_python_code_are_run_by_the_python_worker_and_the_rest_by_the_worker() {
    let python = "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: MODE\n  models: [{name: m, format: Safetensors, python: {entryPoint: 'models:build'}, source: {uri: 'https://m.example/m.safetensors'}}]\n  template: {image: 'registry.example/mine:1'}\n";
    let command = |yaml: &str| -> Vec<String> {
        let p: InferencePipeline = runnable(serde_yaml::from_str(yaml).unwrap());
        let pod = match render(&p, &Settings::default()).unwrap() {
            Rendered::Task { job } => job.spec.unwrap().template.spec.unwrap(),
            Rendered::Actor { deployment, .. } => deployment.spec.unwrap().template.spec.unwrap(),
            _ => panic!("a Task Job or an Actor Deployment"),
        };
        pod.containers[0].command.clone().unwrap()
    };
    let task = python.replace("MODE", "Task")
        + "  input: {uri: 'file:///data/in'}\n  output: {uri: 'file:///data/out'}\n  task: {shards: 2}\n";
    assert_eq!(command(&task), ["kube-zerocopy-python-worker", "task"]);
    let actor = python.replace("MODE", "Actor") + "  actor: {replicas: 1}\n";
    assert_eq!(command(&actor), ["kube-zerocopy-python-worker", "actor"]);
    let (_, worker) = containers(&pipeline(""));
    assert_eq!(worker.command.unwrap(), ["kube-zerocopy-worker", "task"]);
}

/// The pods of an Actor pipeline of 2 replicas with a batch run whose `template` holds these
/// lines: the replicas' and the driver's.
fn batch_run_pods(template: &str) -> (PodSpec, PodSpec) {
    let p: InferencePipeline = runnable(serde_yaml::from_str(&format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p}}\nspec:\n  mode: Actor\n  actor: {{replicas: 2}}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://a.example/m.pt'}}}}]\n  input: {{uri: 'file:///data/in'}}\n  output: {{uri: 'file:///data/out'}}\n  template:\n{template}"
    ))
    .unwrap());
    let Rendered::Actor {
        deployment, run, ..
    } = render(&p, &Settings::default()).unwrap()
    else {
        panic!("an Actor pipeline renders a Deployment")
    };
    (
        deployment.spec.unwrap().template.spec.unwrap(),
        run.unwrap().job.spec.unwrap().template.spec.unwrap(),
    )
}

#[test]
fn the_batch_runs_driver_takes_nothing_of_the_templates_environment() {
    let (replica, driver) =
        batch_run_pods("    env: [{name: LD_PRELOAD, value: /data/in/hook.so}]\n");
    let names =
        |c: &Container| -> Vec<String> { c.env.iter().flatten().map(|v| v.name.clone()).collect() };
    assert!(names(&replica.containers[0]).contains(&"LD_PRELOAD".to_owned()));
    // The driver holds its account's token: a tenant's variable must not reach its process.
    let driver_env = names(&driver.containers[0]);
    assert!(
        !driver_env.contains(&"LD_PRELOAD".to_owned()),
        "{driver_env:?}"
    );
}

#[test]
fn helper_pods_go_to_the_workers_nodes_without_their_pod_anti_affinity() {
    let (replica, driver) = batch_run_pods(
        "    affinity:\n      nodeAffinity:\n        requiredDuringSchedulingIgnoredDuringExecution:\n          nodeSelectorTerms: [{matchExpressions: [{key: pool, operator: In, values: [batch]}]}]\n      podAntiAffinity:\n        requiredDuringSchedulingIgnoredDuringExecution:\n          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {kube-zerocopy.io/pipeline: p}}}\n",
    );
    assert!(replica.affinity.unwrap().pod_anti_affinity.is_some());
    // The driver runs on the pipeline's nodes, wherever a replica is.
    let driver = driver.affinity.unwrap();
    assert!(driver.node_affinity.is_some());
    assert!(driver.pod_anti_affinity.is_none() && driver.pod_affinity.is_none());
}
