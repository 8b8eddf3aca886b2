//! The node agent as the kubelet drives it: its binary on a real unix socket, called through
//! the CSI services' own protocol. A volume holds exactly the models it
//! names, read-only; volumes naming the same model share one copy in the store; a worker runs
//! from a volume; bad requests are refused with their cause and leave nothing mounted.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use kube_zerocopy_agent::activity::Activity;
use kube_zerocopy_agent::proto::csi::identity_client::IdentityClient;
use kube_zerocopy_agent::proto::csi::node_client::NodeClient;
use kube_zerocopy_agent::proto::csi::volume_capability::{AccessType, MountVolume};
use kube_zerocopy_agent::proto::csi::{
    GetPluginInfoRequest, NodeGetInfoRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
    ProbeRequest, VolumeCapability,
};
use kube_zerocopy_agent::report::status;
use kube_zerocopy_e2e::cluster::free_port;
use kube_zerocopy_e2e::cluster::real::serve_folder_on;
use kube_zerocopy_e2e::{
    bin, make_model, metric_value, read_output, sha256_of, source, succeeded, terminate,
};
use kube_zerocopy_fetch::config::models_to_json;
use kube_zerocopy_fetch::{ModelFormat, ModelSource, Store};
use kube_zerocopy_worker::task::read_input;
use kube_zerocopy_worker::LoadedModel;
use tonic::transport::{Channel, Endpoint, Uri};

/// The agent process, its store and socket in a fresh folder of /dev/shm.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    /// Its /metrics.
    metrics: String,
}

impl Agent {
    /// `file_sources`: the folder whose files volumes may name (KZC_FILE_SOURCES).
    fn start(file_sources: Option<&Path>) -> Agent {
        Self::start_with(file_sources, &[])
    }

    /// Started with `env` besides (and over) the test's defaults.
    fn start_with(file_sources: Option<&Path>, env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("kzc-agent-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let socket = dir.path().join("csi/csi.sock");
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let child = Self::spawn(dir.path(), &socket, &listen, file_sources, env);
        Agent {
            child,
            dir,
            socket,
            metrics: format!("http://{listen}/metrics"),
        }
    }

    fn spawn(
        dir: &Path,
        socket: &Path,
        listen: &str,
        file_sources: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Child {
        let mut command = std::process::Command::new(bin("kube-zerocopy-agent"));
        if let Some(folder) = file_sources {
            command.env("KZC_FILE_SOURCES", folder);
        }
        // Collections every second, of any model unmounted: what is kept is kept for its mounts.
        let child = command
            .env("KZC_COLLECT_EVERY", "1")
            .env("KZC_KEEP_UNUSED", "0")
            .env("KZC_CSI_SOCKET", socket)
            .env("KZC_METRICS_LISTEN", listen)
            .env("NODE_NAME", "node-a")
            .env("KZC_STORE", dir.join("store"))
            .env("KZC_DOWNLOAD_DIR", dir.join("downloads"))
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Stops the agent (SIGTERM), keeping its store, for [`Agent::resume`].
    fn halt(&mut self) {
        assert_eq!(terminate(&mut self.child).code(), Some(0));
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A new agent process on the same store.
    fn resume(&mut self, file_sources: Option<&Path>) {
        let listen = self
            .metrics
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        self.child = Self::spawn(self.dir.path(), &self.socket, listen, file_sources, &[]);
    }

    /// SIGTERM, as the kubelet stops it: its exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }

    /// The value of the metric line that starts with `name` (its labels included).
    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&self.metrics)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// Whether the store holds `model` (by its declared digest).
    fn holds(&self, model: &ModelSource) -> bool {
        let digest = model.sha256.as_deref().unwrap();
        self.store().join("blobs").join(digest).is_dir()
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        // The URI is not used: every connection goes to the socket.
        Endpoint::try_from("http://agent")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }
}

/// A test that fails midway leaves no agent running (it would hold the test's output open),
/// and no store mounted (an agent given KZC_STORE_SIZE mounts one).
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new("umount")
            .arg(self.store())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// What the kubelet sends for a pod's inline volume.
fn publish_request(
    volume_id: &str,
    target: &Path,
    models: &[ModelSource],
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: None,
        }),
        readonly: true,
        volume_context: HashMap::from([
            ("models".to_string(), models_to_json(models)),
            (
                "csi.storage.k8s.io/ephemeral".to_string(),
                "true".to_string(),
            ),
        ]),
        ..Default::default()
    }
}

/// A volume of `model` alone, mounted at `<pods>/<id>/mount`.
fn one_model_volume(pods: &Path, id: &str, model: &ModelSource) -> NodePublishVolumeRequest {
    let target = pods.join(id).join("mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    publish_request(id, &target, std::slice::from_ref(model))
}

fn unpublish_request(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into(),
    }
}

/// An Mlp of `sizes` made in `folder` as `<name>.safetensors`, named by its digest.
fn mlp_in(folder: &Path, name: &str, sizes: &str) -> ModelSource {
    let file = folder.join(format!("{name}.safetensors"));
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", sizes]);
    ModelSource {
        sha256: Some(sha256_of(&file)),
        ..source(name, ModelFormat::Safetensors, &file)
    }
}

/// The files a volume shows, relative to its root.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(
                    e.path()
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_hold_exactly_their_models_read_only_and_share_one_copy() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let (first_file, second_file) = (m.join("first.safetensors"), m.join("second.safetensors"));
    make_model(&["mlp", first_file.to_str().unwrap(), "--sizes", "64,256,8"]);
    make_model(&["mlp", second_file.to_str().unwrap(), "--sizes", "64,128,8"]);
    let (first_digest, second_digest) = (sha256_of(&first_file), sha256_of(&second_file));
    let model = |name: &str, file: &Path, digest: &str| ModelSource {
        sha256: Some(digest.to_owned()),
        ..source(name, ModelFormat::Safetensors, file)
    };
    let first = model("ranker", &first_file, &first_digest);
    let second = model("ranker", &second_file, &second_digest);

    let agent = Agent::start(Some(m));
    let channel = agent.channel().await;
    let (mut identity, mut node) = (
        IdentityClient::new(channel.clone()),
        NodeClient::new(channel),
    );

    // Who it is, as the kubelet's CSI client asks.
    let plugin = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, "models.kube-zerocopy.io");
    assert_eq!(
        identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let node_info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "node-a");

    // Three pods: two name the first model (pipelines of two tenants), one the second.
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| {
        pods.path()
            .join(pod)
            .join("volumes/kubernetes.io~csi/models/mount")
    };
    let volumes = [
        ("csi-a", target("a"), &first),
        ("csi-b", target("b"), &second),
        ("csi-c", target("c"), &first),
    ];
    for (id, path, model) in &volumes {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        node.node_publish_volume(publish_request(id, path, std::slice::from_ref(model)))
            .await
            .unwrap_or_else(|e| panic!("publishing {id}: {e}"));
    }
    // Each volume shows its own model and nothing else.
    for (id, path, model) in &volumes {
        let digest = model.sha256.clone().unwrap();
        let mut expected = vec![
            format!("blobs/{digest}/manifest.json"),
            format!("blobs/{digest}/tensors.bin"),
            "bindings/ready.json".to_string(),
        ];
        expected.sort();
        assert_eq!(files(path), expected, "{id}");
        let bindings: BTreeMap<String, String> = serde_json::from_str(
            &std::fs::read_to_string(path.join("bindings/ready.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            bindings,
            BTreeMap::from([("ranker".to_string(), digest)]),
            "{id}"
        );
    }
    let stored_tensors = agent
        .store()
        .join("blobs")
        .join(&first_digest)
        .join("tensors.bin");
    // One copy of the first model: both volumes show the store's own file (one inode, linked
    // from the store and the two views).
    let stored = std::fs::metadata(&stored_tensors).unwrap();
    for path in [&volumes[0].1, &volumes[2].1] {
        let seen =
            std::fs::metadata(path.join("blobs").join(&first_digest).join("tensors.bin")).unwrap();
        assert_eq!((seen.dev(), seen.ino()), (stored.dev(), stored.ino()));
    }
    assert_eq!(stored.nlink(), 3);
    assert_eq!(agent.metric("kube_zerocopy_agent_volumes"), 3.0);
    assert_eq!(agent.metric("kube_zerocopy_agent_models"), 2.0);

    // The node's report, as the agent writes it to its NodeStore: both models, each with the
    // pods that map it (volumes linking it), what it was published from and how long it took.
    let store = Store::new(agent.store());
    let report = status(&store, &Activity::new(store.clone(), Default::default())).unwrap();
    assert_eq!(report.pods, 3);
    let held = |digest: &str| {
        let model = report.models.iter().find(|m| m.digest == digest).unwrap();
        let dir = agent.store().join("blobs").join(digest);
        let bytes: u64 = ["manifest.json", "tensors.bin"]
            .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
            .iter()
            .sum();
        assert_eq!(model.bytes, bytes, "{model:?}");
        assert_eq!(model.name, "ranker");
        assert!(
            model.fetch_seconds.is_some() && model.layout_seconds.is_some(),
            "{model:?}"
        );
        assert!(model.published_at.is_some(), "{model:?}");
        model.clone()
    };
    assert_eq!(held(&first_digest).pods, 2);
    assert_eq!(held(&first_digest).source, first.uri);
    assert_eq!(held(&second_digest).pods, 1);
    assert_eq!(report.models.len(), 2);
    assert_eq!(
        report.used_bytes,
        held(&first_digest).bytes + held(&second_digest).bytes
    );
    assert!(report.fetching.is_empty(), "{report:?}");
    println!("report: {}", serde_json::to_string(&report).unwrap());

    // A pod names what the agent reads as root: no file outside the folder set aside for
    // file:// sources (nor one reached through `..`), and no credentials file at all.
    let refused = [
        ModelSource {
            uri: "file:///etc/hostname".into(),
            ..first.clone()
        },
        ModelSource {
            uri: format!("file://{}/../../etc/hostname", m.display()),
            ..first.clone()
        },
        ModelSource {
            uri: "https://hub.example/m.safetensors".into(),
            bearer_token_file: Some("/etc/shadow".into()),
            ..first.clone()
        },
        // The node's own identity would read it, for any pod.
        ModelSource {
            uri: "s3://any-tenant/m.safetensors".into(),
            ..first.clone()
        },
        // Files of the node as credentials, sent wherever the volume says.
        ModelSource {
            uri: "s3://any-tenant/m.safetensors".into(),
            s3: Some(kube_zerocopy_fetch::S3Access {
                endpoint: Some("http://attacker.example".into()),
                credentials_dir: Some("/etc/kubernetes/pki".into()),
                ..Default::default()
            }),
            ..first.clone()
        },
    ];
    for (i, model) in refused.iter().enumerate() {
        let path = target(&format!("refused-{i}"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let status = node
            .node_publish_volume(publish_request(
                &format!("csi-refused-{i}"),
                &path,
                std::slice::from_ref(model),
            ))
            .await
            .expect_err("a source the agent must not read");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        println!("refused: {}", status.message());
        assert!(!path.exists(), "{} exists after a refusal", path.display());
    }

    // Read-only, for root too: no write into a model, no new file.
    let tensors = volumes[0]
        .1
        .join("blobs")
        .join(&first_digest)
        .join("tensors.bin");
    let write = std::fs::OpenOptions::new().write(true).open(&tensors);
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    let create = std::fs::write(volumes[0].1.join("planted"), b"x");
    assert_eq!(create.unwrap_err().raw_os_error(), Some(libc::EROFS));

    // A worker maps its model from the volume and computes what the model computes.
    let input = models_dir.path().join("input");
    make_model(&[
        "inputs",
        input.to_str().unwrap(),
        "--shards",
        "1",
        "--batch",
        "4",
        "--features",
        "64",
    ]);
    let output = models_dir.path().join("output");
    let out = std::process::Command::new(bin("kube-zerocopy-worker"))
        .arg("task")
        .env("KZC_MODELS", models_to_json(std::slice::from_ref(&first)))
        .env("KZC_STORE", &volumes[0].1)
        .env("KZC_BINDINGS", volumes[0].1.join("bindings"))
        .env("KZC_INPUT", &input)
        .env("KZC_OUTPUT", &output)
        .env("JOB_COMPLETION_INDEX", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shard = kube_zerocopy_batch::shards::list_shards(&input)
        .unwrap()
        .remove(0);
    let reference = LoadedModel::load_copying(&first_file, &first, tch::Device::Cpu).unwrap();
    let expected = reference.forward(&read_input(&shard).unwrap()).unwrap();
    assert!(read_output(&output.join(shard.file_name().unwrap())).equal(&expected));

    // Refusals, each with its cause, and nothing mounted for them.
    let refused = |status: tonic::Status| (status.code(), status.message().to_owned());
    let wrong = ModelSource {
        sha256: Some("0".repeat(64)),
        ..first.clone()
    };
    let bad_target = target("d");
    std::fs::create_dir_all(bad_target.parent().unwrap()).unwrap();
    let (code, message) = refused(
        node.node_publish_volume(publish_request("csi-d", &bad_target, &[wrong]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::Internal, "{message}");
    assert!(message.contains("sha256 mismatch"), "{message}");
    let mut no_models = publish_request("csi-e", &target("e"), &[]);
    no_models.volume_context.remove("models");
    let (code, message) = refused(node.node_publish_volume(no_models).await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("\"models\""), "{message}");
    let (code, message) = refused(
        node.node_publish_volume(publish_request(
            "../blobs",
            &target("f"),
            std::slice::from_ref(&first),
        ))
        .await
        .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    for pod in ["d", "e", "f"] {
        assert!(
            !target(pod).exists(),
            "a refused volume left {}",
            target(pod).display()
        );
    }
    assert!(!agent.store().join(".views/csi-d").exists());

    // Publishing again is harmless; unpublishing takes the volume and its links away, and the
    // model another pod still mounts stays.
    node.node_publish_volume(publish_request(
        "csi-a",
        &volumes[0].1,
        std::slice::from_ref(&first),
    ))
    .await
    .unwrap();
    node.node_unpublish_volume(unpublish_request("csi-a", &volumes[0].1))
        .await
        .unwrap();
    assert!(!volumes[0].1.exists());
    assert!(!agent.store().join(".views/csi-a").exists());
    assert_eq!(files(&volumes[2].1).len(), 3);
    let stored = std::fs::metadata(&stored_tensors).unwrap();
    assert_eq!(stored.nlink(), 2);
    // Collections run every second and keep nothing unmounted: each model stays while a
    // volume mounts it, and goes once none does.
    let second_dir = agent.store().join("blobs").join(&second_digest);
    let first_dir = agent.store().join("blobs").join(&first_digest);
    std::thread::sleep(Duration::from_secs(3));
    assert!(first_dir.is_dir() && second_dir.is_dir());
    let gone = |dir: &Path| {
        let started = Instant::now();
        while dir.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} was not collected",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    for ((id, path, _), dir) in volumes[1..].iter().zip([&second_dir, &first_dir]) {
        node.node_unpublish_volume(unpublish_request(id, path))
            .await
            .unwrap();
        assert!(!path.exists(), "{id}");
        gone(dir);
    }
    // What the store took in and let go, as its /metrics says.
    for (name, value) in [
        ("kube_zerocopy_agent_layouts_total", 2.0),
        ("kube_zerocopy_agent_evictions_total", 2.0),
        ("kube_zerocopy_agent_volumes", 0.0),
        ("kube_zerocopy_agent_models", 0.0),
    ] {
        assert_eq!(agent.metric(name), value, "{name}");
    }
    assert!(agent.metric("kube_zerocopy_agent_store_bytes") > 0.0);
    let publications = "kube_zerocopy_agent_publish_seconds_count";
    // Four publications (one a repeat) and seven refusals past the request's own checks: five
    // sources, a wrong digest, a volume id.
    let count = |outcome: &str| agent.metric(&format!("{publications}{{outcome=\"{outcome}\"}}"));
    assert_eq!((count("success"), count("error")), (4.0, 7.0));
    // Unpublishing what is gone already succeeds (the kubelet retries).
    node.node_unpublish_volume(unpublish_request("csi-b", &volumes[1].1))
        .await
        .unwrap();

    assert_eq!(agent.stop().code(), Some(0));
}

/// The CSI community's conformance suite, csi-sanity (built by scripts/csi-sanity.sh from its
/// pinned module), against the agent's socket: every check that applies to a node plugin
/// without a controller service passes (plugin info, probe, capabilities, node info, and the
/// refusals of publish and unpublish requests that lack a volume id, target path or capability).
#[test]
fn csi_sanity_passes_against_the_agent() {
    let bin = kube_zerocopy_e2e::cluster::run_script("csi-sanity.sh", &[]).unwrap();
    let agent = Agent::start(None);
    let scratch = agent.dir.path().join("sanity");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = std::process::Command::new(Path::new(bin.trim()).join("csi-sanity"))
        .arg(format!("-csi.endpoint=unix://{}", agent.socket.display()))
        .arg(format!(
            "-csi.mountdir={}",
            scratch.join("target").display()
        ))
        .arg(format!(
            "-csi.stagingdir={}",
            scratch.join("staging").display()
        ))
        // A node plugin for ephemeral volumes: no controller, so no volume to create (the
        // target path check creates one).
        .arg("-ginkgo.skip=Controller Server|GroupController|should remove target path")
        .arg("-ginkgo.no-color")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report
        .lines()
        .filter(|l| l.starts_with("Ran ") || l.contains("Passed"))
        .collect::<Vec<_>>()
        .join("; ");
    println!("csi-sanity: {summary}");
    assert!(out.status.success(), "csi-sanity failed:\n{report}");
    let ran: u32 = report
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .expect("csi-sanity's summary");
    assert!(ran >= 10, "csi-sanity ran only {ran} checks:\n{report}");
    assert!(report.contains("| 0 Failed |"), "{report}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// The agent serves only what it laid out. Its store changes behind its back while it is down:
/// a published model's tensors are overwritten, and a folder appears under a second model's
/// digest holding the first model's files (self-consistent, its manifest naming the second
/// digest), and a link under a third's. Restarted, the agent serves each of the three models
/// laid out again from its source: the views hold what a fresh layout holds.
#[tokio::test(flavor = "multi_thread")]
async fn store_entries_that_do_not_verify_are_never_served() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let model = |name: &str, sizes: &str| mlp_in(m, name, sizes);
    let models = [
        model("a", "64,256,8"),
        model("b", "64,128,8"),
        model("c", "64,96,8"),
    ];
    let digest = |i: usize| models[i].sha256.clone().unwrap();
    // What a fresh layout of each holds: the weight server's own, in a store of its own.
    let fresh = kube_zerocopy_e2e::Pod::new();
    succeeded(&fresh.publish(&models));
    let fresh_tensors =
        |i: usize| sha256_of(&fresh.store().model_dir(&digest(i)).join("tensors.bin"));

    let mut agent = Agent::start(Some(m));
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| pods.path().join(pod).join("mount");
    {
        let mut node = NodeClient::new(agent.channel().await);
        std::fs::create_dir_all(pods.path().join("first")).unwrap();
        node.node_publish_volume(publish_request("csi-first", &target("first"), &models[..1]))
            .await
            .unwrap();
        node.node_unpublish_volume(unpublish_request("csi-first", &target("first")))
            .await
            .unwrap();
    }
    assert!(agent.store().join(".layouts").join(digest(0)).is_file());

    agent.halt();
    let blobs = agent.store().join("blobs");
    let tensors = blobs.join(digest(0)).join("tensors.bin");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&tensors)
        .unwrap();
    std::io::Write::write_all(&mut file, b"planted").unwrap();
    drop(file);
    let planted = blobs.join(digest(1));
    std::fs::create_dir_all(&planted).unwrap();
    for name in ["tensors.bin", "manifest.json"] {
        std::fs::copy(
            fresh.store().model_dir(&digest(0)).join(name),
            planted.join(name),
        )
        .unwrap();
    }
    let manifest = planted.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace(&digest(0), &digest(1))).unwrap();
    std::os::unix::fs::symlink(&planted, blobs.join(digest(2))).unwrap();
    agent.resume(Some(m));

    let mut node = NodeClient::new(agent.channel().await);
    for (i, model) in models.iter().enumerate() {
        let pod = format!("pod-{i}");
        std::fs::create_dir_all(pods.path().join(&pod)).unwrap();
        let id = format!("csi-{i}");
        node.node_publish_volume(publish_request(
            &id,
            &target(&pod),
            std::slice::from_ref(model),
        ))
        .await
        .unwrap_or_else(|e| panic!("model {i}: {e}"));
        let seen = target(&pod)
            .join("blobs")
            .join(digest(i))
            .join("tensors.bin");
        assert_eq!(
            sha256_of(&seen),
            fresh_tensors(i),
            "model {i}: not a fresh layout"
        );
        node.node_unpublish_volume(unpublish_request(&id, &target(&pod)))
            .await
            .unwrap();
    }
    assert_eq!(agent.metric("kube_zerocopy_agent_discarded_total"), 3.0);
    assert_eq!(agent.stop().code(), Some(0));
}

/// A store of 1 MiB, the tmpfs the agent mounts itself as on a node: a model that does not fit
/// beside an unused one takes its room (least recently used first, counted in /metrics); one
/// that cannot fit even alone, while another is mounted, is refused with ResourceExhausted and
/// the store's words, and removes nothing in use.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_makes_room_and_a_model_that_cannot_fit_is_refused() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let model = |name: &str, sizes: &str| mlp_in(m, name, sizes);
    // About 600 KiB each (two do not fit in 1 MiB), and 2 MiB.
    let (first, second, big) = (
        model("first", "64,1200,64"),
        model("second", "64,1100,64"),
        model("big", "64,4096,64"),
    );
    let agent = Agent::start_with(
        Some(m),
        &[
            ("KZC_STORE_SIZE", "1m"),
            ("KZC_KEEP_UNUSED", "3600"),
            ("KZC_NAMESPACE_SHARE_PERCENT", "100"),
        ],
    );
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| pods.path().join(pod).join("mount");
    let publish = |id: &str, model: &ModelSource| one_model_volume(pods.path(), id, model);
    let stored = |model: &ModelSource| agent.holds(model);

    node.node_publish_volume(publish("a", &first))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_request("a", &target("a")))
        .await
        .unwrap();
    assert!(
        stored(&first),
        "an unused model is kept while there is room"
    );
    node.node_publish_volume(publish("b", &second))
        .await
        .unwrap_or_else(|e| panic!("publishing the second model: {e}"));
    assert!(stored(&second) && !stored(&first));
    assert_eq!(
        agent.metric("kube_zerocopy_agent_room_evictions_total"),
        1.0
    );
    // Its publication record (what the NodeStore reports) went with it.
    let record = |model: &ModelSource| {
        let digest = model.sha256.as_deref().unwrap();
        agent
            .store()
            .join(".publications")
            .join(format!("{digest}.json"))
    };
    assert!(record(&second).is_file() && !record(&first).exists());
    assert_eq!(agent.metric("kube_zerocopy_agent_evictions_total"), 0.0);

    let refused = node
        .node_publish_volume(publish("c", &big))
        .await
        .expect_err("a model larger than the store");
    println!("refused: {}", refused.message());
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("shared memory is full")
            && refused.message().contains("\"big\""),
        "{}",
        refused.message()
    );
    assert!(!target("c").exists(), "a mount after a refusal");
    // Its view (made for its bindings before the store was found full) went with it: each
    // view counts as a pod in the NodeStore.
    assert!(
        !agent.store().join(".views/c").exists(),
        "a refused volume left its view"
    );
    // The mounted model stayed: in use, it is never removed to make room.
    assert!(stored(&second) && !stored(&big));
    assert_eq!(
        files(&target("b")).len(),
        3,
        "the second model's volume: {:?}",
        files(&target("b"))
    );
    assert_eq!(
        agent.metric("kube_zerocopy_agent_room_evictions_total"),
        1.0
    );
    node.node_unpublish_volume(unpublish_request("b", &target("b")))
        .await
        .unwrap();
    assert!(agent.stop().success());
}

/// A model served over http from 127.0.0.1 (which the agent is told it may fetch from).
fn served(name: &str, base: &str, file: &Path, sha256: Option<String>) -> ModelSource {
    ModelSource {
        uri: format!("{base}/{}", file.file_name().unwrap().to_string_lossy()),
        sha256,
        ..source(name, ModelFormat::Safetensors, file)
    }
}

/// A tenant names a model whose source is not what it declares, on a full store of 1 MiB
/// holding another tenant's unused model: the agent fetches and verifies it before it removes
/// anything, so the other model stays; an honest model of the same size then makes room as
/// before, and one larger than the whole store is not even fetched.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_does_not_verify_removes_no_other_model_to_make_room() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let kept = mlp_in(m, "kept", "64,1200,64");
    let big = mlp_in(m, "big", "64,1100,64");
    let base = serve_folder_on(std::net::Ipv4Addr::LOCALHOST, m).unwrap();
    let agent = Agent::start_with(
        Some(m),
        &[
            ("KZC_STORE_SIZE", "1m"),
            ("KZC_KEEP_UNUSED", "3600"),
            ("KZC_SOURCE_NETWORKS", "127.0.0.1"),
            ("KZC_NAMESPACE_SHARE_PERCENT", "100"),
        ],
    );
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| pods.path().join(pod).join("mount");
    let publish = |id: &str, model: &ModelSource| one_model_volume(pods.path(), id, model);
    let stored = |model: &ModelSource| agent.holds(model);
    node.node_publish_volume(publish("a", &kept)).await.unwrap();
    node.node_unpublish_volume(unpublish_request("a", &target("a")))
        .await
        .unwrap();
    assert!(stored(&kept));

    let lying = served(
        "big",
        &base,
        &m.join("big.safetensors"),
        Some("ab".repeat(32)),
    );
    let refused = node
        .node_publish_volume(publish("b", &lying))
        .await
        .expect_err("a source that is not what it declares");
    assert!(
        refused.message().contains("sha256 mismatch"),
        "{}",
        refused.message()
    );
    assert!(
        stored(&kept),
        "an unverified model removed another to make room"
    );
    assert_eq!(
        agent.metric("kube_zerocopy_agent_room_evictions_total"),
        0.0
    );

    let honest = served("big", &base, &m.join("big.safetensors"), big.sha256.clone());
    node.node_publish_volume(publish("c", &honest))
        .await
        .unwrap_or_else(|e| panic!("an honest model of the same size: {e}"));
    assert!(stored(&big) && !stored(&kept));
    assert_eq!(
        agent.metric("kube_zerocopy_agent_room_evictions_total"),
        1.0
    );
    node.node_unpublish_volume(unpublish_request("c", &target("c")))
        .await
        .unwrap();

    let huge = mlp_in(m, "huge", "64,4096,64");
    let refused = node
        .node_publish_volume(publish(
            "d",
            &served(
                "huge",
                &base,
                &m.join("huge.safetensors"),
                huge.sha256.clone(),
            ),
        ))
        .await
        .expect_err("a model larger than the store");
    assert!(
        refused
            .message()
            .contains("more than the node's store holds"),
        "{}",
        refused.message()
    );
    assert!(stored(&big), "a model that can never fit removed another");
    assert!(agent.stop().success());
}

/// A tenant names sources on the node's own addresses: the agent's metrics port on localhost,
/// another loopback address, the cloud's metadata service, and an allowed server that
/// redirects to a loopback one. Each is refused before a connection is made, in words that say
/// nothing of what is there; the allowed server itself is fetched.
#[tokio::test(flavor = "multi_thread")]
async fn sources_on_internal_addresses_are_refused_without_a_request() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let model = mlp_in(m, "m", "8,16,8");
    // The internal server: any connection to it is counted.
    let internal = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let internal_addr = internal.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reached.clone();
    std::thread::spawn(move || {
        for _ in internal.incoming() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The allowed server: its model, and a redirect to the internal server.
    let allowed = tiny_http::Server::http("127.0.0.4:0").unwrap();
    let allowed_base = format!("http://{}", allowed.server_addr().to_ip().unwrap());
    let model_bytes = std::fs::read(m.join("m.safetensors")).unwrap();
    std::thread::spawn(move || {
        for request in allowed.incoming_requests() {
            let response = if request.url() == "/redirect" {
                tiny_http::Response::from_data(Vec::new())
                    .with_status_code(302)
                    .with_header(
                        tiny_http::Header::from_bytes(
                            "Location",
                            format!("http://{internal_addr}/m.safetensors"),
                        )
                        .unwrap(),
                    )
            } else {
                tiny_http::Response::from_data(model_bytes.clone())
            };
            let _ = request.respond(response);
        }
    });
    let agent = Agent::start_with(None, &[("KZC_SOURCE_NETWORKS", "127.0.0.4/32")]);
    let metrics_port = agent
        .metrics
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/metrics")
        .to_owned();
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let at = |uri: String| ModelSource {
        uri,
        sha256: None,
        ..model.clone()
    };
    let attacks = [
        at(format!("http://{internal_addr}/m.safetensors")),
        at(format!("http://localhost:{metrics_port}/metrics")),
        at("http://169.254.169.254/latest/meta-data/iam/security-credentials/".into()),
        at(format!("{allowed_base}/redirect")),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let target = pods.path().join(format!("attack-{i}")).join("mount");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let refused = node
            .node_publish_volume(publish_request(
                &format!("attack-{i}"),
                &target,
                std::slice::from_ref(attack),
            ))
            .await
            .expect_err("a source on an internal address");
        println!("refused {}: {}", attack.uri, refused.message());
        assert!(
            refused
                .message()
                .contains("resolves to no address the node agent may fetch from"),
            "{}: {}",
            attack.uri,
            refused.message()
        );
        assert!(!target.exists());
    }
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a connection reached the internal server"
    );
    // The allowed network is fetched from.
    let target = pods.path().join("allowed").join("mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    node.node_publish_volume(publish_request(
        "allowed",
        &target,
        &[at(format!("{allowed_base}/m.safetensors"))],
    ))
    .await
    .unwrap_or_else(|e| panic!("a source in an allowed network: {e}"));
    node.node_unpublish_volume(unpublish_request("allowed", &target))
        .await
        .unwrap();
    assert!(agent.stop().success());
}

/// Someone with the node's files changes a published model's tensors while the agent runs,
/// and writes a layout record beside the store's entries that matches the change. The agent
/// keeps its records in its own memory folder (the chart's lock folder), so the forged one is
/// not read; its periodic check finds the entry changed and removes it, though it had verified
/// that folder before; the next mount lays the model out again from its source.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_changed_in_the_store_with_a_forged_record_is_caught_by_the_periodic_check() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let model = mlp_in(m, "a", "64,256,8");
    let digest = model.sha256.clone().unwrap();
    let private = tempfile::tempdir().unwrap();
    let private_dir = private.path().to_str().unwrap();
    let agent = Agent::start_with(
        Some(m),
        &[
            ("KZC_LOCK_DIR", private_dir),
            ("KZC_KEEP_UNUSED", "3600"),
            ("KZC_VERIFY_EVERY", "1"),
        ],
    );
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| pods.path().join(pod).join("mount");
    node.node_publish_volume(one_model_volume(pods.path(), "first", &model))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_request("first", &target("first")))
        .await
        .unwrap();
    assert!(private.path().join(".layouts").join(&digest).is_file());
    assert!(!agent.store().join(".layouts").exists());
    let entry = agent.store().join("blobs").join(&digest);
    let genuine = sha256_of(&entry.join("tensors.bin"));

    // Changed in place (same folder, same inode), a matching record planted beside it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(entry.join("tensors.bin"))
        .unwrap();
    std::io::Write::write_all(&mut file, &[0xff; 64]).unwrap();
    drop(file);
    let forged = kube_zerocopy_agent::integrity::hash_entry(&entry).unwrap();
    std::fs::create_dir_all(agent.store().join(".layouts")).unwrap();
    std::fs::write(agent.store().join(".layouts").join(&digest), forged).unwrap();

    let started = Instant::now();
    while agent.metric("kube_zerocopy_agent_discarded_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the changed entry was never caught"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!entry.exists(), "the changed entry is still in the store");
    node.node_publish_volume(one_model_volume(pods.path(), "second", &model))
        .await
        .unwrap();
    let served = target("second")
        .join("blobs")
        .join(&digest)
        .join("tensors.bin");
    assert_eq!(sha256_of(&served), genuine);
    node.node_unpublish_volume(unpublish_request("second", &target("second")))
        .await
        .unwrap();
    assert!(agent.stop().success());
}

/// One tenant mounts models until its volumes would hold more than half the node's store (the
/// default share): its next volume is refused with ResourceExhausted, in words that name the
/// share; another namespace mounts that same model, from its own share; once the first
/// tenant's volume goes, its next one is mounted.
#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_cannot_hold_more_than_its_share_of_the_store() {
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    // About 600 KiB and 550 KiB: either fits in half of 2 MiB, both do not.
    let (first, second) = (
        mlp_in(m, "first", "64,1200,64"),
        mlp_in(m, "second", "64,1100,64"),
    );
    let agent = Agent::start_with(Some(m), &[("KZC_STORE_SIZE", "2m")]);
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let target = |pod: &str| pods.path().join(pod).join("mount");
    let in_namespace = |id: &str, model: &ModelSource, ns: &str| {
        let mut request = one_model_volume(pods.path(), id, model);
        request
            .volume_context
            .insert("csi.storage.k8s.io/pod.namespace".into(), ns.into());
        request
    };
    node.node_publish_volume(in_namespace("a1", &first, "tenant-a"))
        .await
        .unwrap();
    let refused = node
        .node_publish_volume(in_namespace("a2", &second, "tenant-a"))
        .await
        .expect_err("more than the namespace's share");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("namespace \"tenant-a\" would hold")
            && refused
                .message()
                .contains("nodeStore.namespaceSharePercent"),
        "{}",
        refused.message()
    );
    assert!(!target("a2").exists(), "a refused volume was mounted");
    node.node_publish_volume(in_namespace("b1", &second, "tenant-b"))
        .await
        .unwrap_or_else(|e| panic!("another namespace's share: {e}"));
    node.node_unpublish_volume(unpublish_request("a1", &target("a1")))
        .await
        .unwrap();
    node.node_publish_volume(in_namespace("a2", &second, "tenant-a"))
        .await
        .unwrap_or_else(|e| panic!("the share once the first volume went: {e}"));
    for id in ["a2", "b1"] {
        node.node_unpublish_volume(unpublish_request(id, &target(id)))
            .await
            .unwrap();
    }
    assert!(agent.stop().success());
}

/// A private model on S3, mounted with Node sharing by its owners' namespace with the keys of
/// the Secret its volume names (the kubelet hands them over). Other namespaces name its digest,
/// which any NodeStore shows: one with a server of its own, one with the owners' URI and no
/// credentials, one with the owners' URI and keys that S3 refuses, and one with a public source
/// of other bytes. Each is refused without a mount; a namespace with valid keys for the same
/// object is served by one HEAD (the object's bytes are changed behind the S3 server's back with
/// its ETag kept, so that only the version check could let it in), and one with a public copy of
/// the same bytes by reading that copy whole. The node's report shows no private source.
#[tokio::test(flavor = "multi_thread")]
async fn another_namespace_naming_a_private_model_s_digest_gets_nothing_without_its_credentials() {
    use kube_zerocopy_contract::models::{
        ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE, VOLUME_SECRET_DIR,
    };
    use kube_zerocopy_e2e::s3::S3Server;
    let models_dir = tempfile::tempdir().unwrap();
    let m = models_dir.path();
    let private = mlp_in(m, "private", "32,96,8");
    let digest = private.sha256.clone().unwrap();
    let s3 = tokio::task::spawn_blocking(|| {
        let s3 = S3Server::start().unwrap();
        s3.create_bucket("private").unwrap();
        s3
    })
    .await
    .unwrap();
    s3.put_file("private", "m.safetensors", &m.join("private.safetensors"))
        .unwrap();
    // A public copy of the same bytes, and a server of the attacker's with other bytes under
    // the same name.
    let public_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        m.join("private.safetensors"),
        public_dir.path().join("m.safetensors"),
    )
    .unwrap();
    let public = serve_folder_on(std::net::Ipv4Addr::LOCALHOST, public_dir.path()).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = mlp_in(other_dir.path(), "m", "32,80,8");
    assert_ne!(other.sha256, private.sha256);
    let attackers = serve_folder_on(std::net::Ipv4Addr::LOCALHOST, other_dir.path()).unwrap();

    let agent = Agent::start_with(None, &[("KZC_SOURCE_NETWORKS", "127.0.0.0/8")]);
    let mut node = NodeClient::new(agent.channel().await);
    let pods = tempfile::tempdir().unwrap();
    let keys = |secret: &str| {
        HashMap::from([
            (ACCESS_KEY_ID_FILE.to_string(), s3.access_key.clone()),
            (SECRET_ACCESS_KEY_FILE.to_string(), secret.to_owned()),
        ])
    };
    let on_s3 = |credentials: bool| ModelSource {
        uri: "s3://private/m.safetensors".into(),
        s3: Some(kube_zerocopy_fetch::S3Access {
            endpoint: Some(s3.endpoint.clone()),
            region: Some(s3.region.clone()),
            credentials_dir: credentials.then(|| VOLUME_SECRET_DIR.to_owned()),
        }),
        ..private.clone()
    };
    let at = |uri: String| ModelSource {
        uri,
        ..private.clone()
    };
    // As the kubelet sends it: the pod's namespace, and the Secret the volume names.
    let volume = |id: &str, namespace: &str, model: &ModelSource, secret| {
        let mut request = one_model_volume(pods.path(), id, model);
        request
            .volume_context
            .insert("csi.storage.k8s.io/pod.namespace".into(), namespace.into());
        request.secrets = secret;
        request
    };
    let target = |id: &str| pods.path().join(id).join("mount");

    node.node_publish_volume(volume(
        "owner",
        "owners",
        &on_s3(true),
        keys(&s3.secret_key),
    ))
    .await
    .unwrap_or_else(|e| panic!("the owners' private model: {e}"));
    assert!(
        target("owner")
            .join("blobs")
            .join(&digest)
            .join("manifest.json")
            .is_file(),
        "the owners' volume shows its model"
    );

    let attacks = [
        (
            "own-server",
            at(format!("{attackers}/m.safetensors")),
            HashMap::new(),
        ),
        ("no-credentials", on_s3(false), HashMap::new()),
        ("wrong-keys", on_s3(true), keys("not-the-secret")),
        (
            "own-keys-elsewhere",
            at(format!("{attackers}/m.safetensors")),
            keys(&s3.secret_key),
        ),
    ];
    for (id, model, secret) in attacks {
        let refused = node
            .node_publish_volume(volume(id, "attackers", &model, secret))
            .await
            .expect_err(id);
        println!("refused {id}: {}", refused.message());
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{id}: {refused:?}"
        );
        assert!(
            !target(id).join("blobs").exists(),
            "{id}: something was mounted"
        );
    }

    // Served by the version check alone: the bytes it would read now are not the model's.
    let object = s3.root.join("private").join("m.safetensors");
    let mut changed = std::fs::read(&object).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    std::fs::write(&object, &changed).unwrap();
    node.node_publish_volume(volume(
        "same-object",
        "team-b",
        &on_s3(true),
        keys(&s3.secret_key),
    ))
    .await
    .unwrap_or_else(|e| panic!("the same object with valid keys: {e}"));
    // Served by reading a public copy of the same bytes whole.
    node.node_publish_volume(volume(
        "public-copy",
        "team-c",
        &at(format!("{public}/m.safetensors")),
        HashMap::new(),
    ))
    .await
    .unwrap_or_else(|e| panic!("a public copy of the same bytes: {e}"));
    for id in ["same-object", "public-copy"] {
        assert!(
            target(id).join("blobs").join(&digest).is_dir(),
            "{id} does not show the model"
        );
    }

    let store = Store::new(agent.store());
    let report = status(&store, &Activity::new(store.clone(), Default::default())).unwrap();
    let shown = serde_json::to_string(&report).unwrap();
    assert!(
        !shown.contains("s3://private"),
        "the report shows a private source: {shown}"
    );
    for id in ["owner", "same-object", "public-copy"] {
        node.node_unpublish_volume(unpublish_request(id, &target(id)))
            .await
            .unwrap();
    }
    assert!(agent.stop().success());
}
