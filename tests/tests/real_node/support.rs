//! What the real-node scenarios share: the cluster with the operator installed, the models
//! and inputs on the host (served to pods by a PersistentVolume and by an http server), the
//! reference outputs of `kube-zerocopy local run`, and helpers to run a pipeline, read its
//! pods' timeline and measure memory on the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::Client;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy_e2e::cluster::host::walk;
use kube_zerocopy_e2e::cluster::real::{serve_folder, RealCluster};
use kube_zerocopy_e2e::wait::eventually_seen;
use kube_zerocopy_e2e::{bin, make_model, read_output, repo};
use serde_json::json;

/// Where the pods see the models (examples/task-safetensors.yaml's path).
pub const MODELS_MOUNT: &str = "/models";
pub const SHARDS: usize = 4;
const FEATURES: &str = "512";
/// The label of a namespace that enforces Pod Security `restricted`.
pub const RESTRICTED: (&str, &str) = ("pod-security.kubernetes.io/enforce", "restricted");
/// The uid every container runs as: the data folders are its.
const RUN_AS: u32 = 65532;

/// The two models of the examples' combinations, each with the reference outputs of
/// `kube-zerocopy local run` over the same input shards.
pub struct Model {
    pub file: &'static str,
    pub format: &'static str,
    pub bytes: u64,
    pub sha256: String,
    pub reference: PathBuf,
}

pub struct Env {
    pub cluster: RealCluster,
    pub client: Client,
    /// models/ and input/ on the host.
    pub data: tempfile::TempDir,
    pub torchscript: Model,
    pub safetensors: Model,
    /// http://<bridge address>:<port>/ serving models/.
    pub http_base: String,
    /// Each pipeline the scenarios ran, and whether it did what it should.
    outcomes: Mutex<Vec<(String, bool)>>,
    /// The tenant attacks tried, and whether each was refused with its victim unharmed.
    attacks: Mutex<Vec<(String, bool)>>,
}

impl Env {
    pub async fn start() -> Result<Arc<Env>> {
        let data = tempfile::Builder::new()
            .prefix("kzc-real-node-data-")
            .tempdir()?;
        let d = data.path().to_owned();
        let models = d.join("models");
        std::fs::create_dir_all(&models)?;
        make_model(&[
            "script",
            models.join("encoder.pt").to_str().unwrap(),
            "--sizes",
            &format!("{FEATURES},2048,2048,256"),
        ]);
        make_model(&[
            "mlp",
            models.join("mlp.safetensors").to_str().unwrap(),
            "--sizes",
            &format!("{FEATURES},2048,2048,16"),
        ]);
        make_model(&[
            "inputs",
            d.join("input").to_str().unwrap(),
            "--shards",
            &SHARDS.to_string(),
            "--batch",
            "16",
            "--features",
            FEATURES,
        ]);
        // The containers run as uid 65532; safetensors writes its files 0600.
        for dir in [&models, &d.join("input")] {
            for entry in std::fs::read_dir(dir)? {
                readable_by_all(&entry?.path())?;
            }
        }
        let torchscript = reference(&d, "encoder.pt", "TorchScript")?;
        let safetensors = reference(&d, "mlp.safetensors", "Safetensors")?;
        let mut cluster = RealCluster::start().await?;
        // On the bridge, which the cluster's host preparation created.
        let http_base = serve_folder(&models)?;
        cluster.install_operator().await?;
        let client = cluster.control_plane.client().await?;
        Ok(Arc::new(Env {
            cluster,
            client,
            data,
            torchscript,
            safetensors,
            http_base,
            outcomes: Mutex::new(Vec::new()),
            attacks: Mutex::new(Vec::new()),
        }))
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data.path().join("models")
    }

    pub fn input_dir(&self) -> PathBuf {
        self.data.path().join("input")
    }

    /// Counts a pipeline for the closing line.
    pub fn record(&self, pipeline: &str, ok: bool) {
        self.outcomes.lock().unwrap().push((pipeline.into(), ok));
    }

    /// (succeeded, total) of the recorded pipelines.
    pub fn outcomes(&self) -> (usize, usize) {
        let o = self.outcomes.lock().unwrap();
        (o.iter().filter(|(_, ok)| *ok).count(), o.len())
    }

    /// Counts a tenant attack for the closing line: `refused` when it was, its victim unharmed.
    pub fn record_attack(&self, attack: &str, refused: bool) {
        self.attacks.lock().unwrap().push((attack.into(), refused));
    }

    /// (refused, total) of the recorded attacks.
    pub fn attacks(&self) -> (usize, usize) {
        let a = self.attacks.lock().unwrap();
        (a.iter().filter(|(_, refused)| *refused).count(), a.len())
    }
}

/// Runs `kube-zerocopy local run` over the inputs with one model: the reference outputs.
pub fn reference(dir: &Path, file: &'static str, format: &'static str) -> Result<Model> {
    let model = dir.join("models").join(file);
    let output = dir.join(format!("reference-{file}"));
    local_task_run(&model, format, &dir.join("input"), &output)?;
    let bytes = std::fs::metadata(&model)?.len();
    let sha256 = kube_zerocopy_fetch::source::sha256_hex(&std::fs::read(&model)?);
    Ok(Model {
        file,
        format,
        bytes,
        sha256,
        reference: output,
    })
}

/// Task mode on the host (`kube-zerocopy local run`): `model` over every shard of `input`,
/// into `output`.
pub fn local_task_run(model: &Path, format: &str, input: &Path, output: &Path) -> Result<()> {
    let dir = output.parent().context("an output folder with a parent")?;
    let file = model.file_name().context("a model file")?.to_string_lossy();
    let architecture = if format == "Safetensors" {
        "\n      architecture: Mlp"
    } else {
        ""
    };
    let pipeline = dir.join(format!(
        "local-{file}-{}.yaml",
        output.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(
        &pipeline,
        format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\n\
             metadata: {{name: reference}}\nspec:\n  mode: Task\n  models:\n\
             \x20   - name: model\n      format: {format}{architecture}\n\
             \x20     source: {{uri: \"file://{model}\"}}\n\
             \x20 input: {{uri: \"file://{input}\"}}\n  output: {{uri: \"file://{output}\"}}\n\
             \x20 task: {{parallelism: 2}}\n",
            model = model.display(),
            input = input.display(),
            output = output.display(),
        ),
    )?;
    let shm = tempfile::Builder::new()
        .prefix("kzc-real-node-reference-")
        .tempdir_in("/dev/shm")?;
    let out = std::process::Command::new(bin("kube-zerocopy"))
        .args(["local", "run", "-f"])
        .arg(&pipeline)
        .arg("--shm-dir")
        .arg(shm.path())
        .output()?;
    ensure!(
        out.status.success(),
        "local run of {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A namespace of its own for one scenario, with `labels`; deleted when dropped (in the
/// background: the cluster goes at the end anyway).
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let name = format!("{prefix}-{}", &uuid_like()[..6]);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        // Pods need the namespace's default ServiceAccount (the controller-manager makes it).
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        eventually_seen(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                let accounts = accounts.clone();
                async move {
                    Ok((
                        accounts.get_opt("default").await?.map(|_| ()),
                        "none".into(),
                    ))
                }
            },
        )
        .await?;
        Ok(TestNamespace {
            name,
            client: client.clone(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api = Api::<Namespace>::all(self.client.clone());
        let name = self.name.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}", nanos.wrapping_mul(0x9e3779b97f4a7c15) >> 64 ^ nanos)
        .chars()
        .rev()
        .collect()
}

/// A host folder as a PersistentVolume bound to the claim `claim` in `ns` (pre-bound on both
/// sides: no provisioner here).
async fn host_volume(client: &Client, ns: &str, claim: &str, path: &Path) -> Result<()> {
    let pv_name = format!("{ns}-{claim}");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "kzc-host",
            "hostPath": {"path": path, "type": "Directory"},
            "claimRef": {"namespace": ns, "name": claim},
        },
    }))?;
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "kzc-host",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pvc)
        .await?;
    Ok(())
}

/// A Task scenario's namespace (`prefix`-<random>, with `labels`): its data folder as the claim
/// `data_claim`, and with `models_claim` the models folder as the claim `models`. Returns the
/// namespace and the data folder.
pub async fn task_namespace(
    env: &Env,
    prefix: &str,
    labels: &[(&str, &str)],
    data_claim: &str,
    models_claim: bool,
) -> Result<(TestNamespace, PathBuf)> {
    let ns = TestNamespace::create(&env.client, prefix, labels).await?;
    let data = data_folder(env, prefix)?;
    host_volume(&env.client, &ns.name, data_claim, &data).await?;
    if models_claim {
        host_volume(&env.client, &ns.name, "models", &env.models_dir()).await?;
    }
    Ok((ns, data))
}

/// A folder for one pipeline's data: input/ (a copy of the shared inputs) and output/, owned
/// by the containers' uid.
fn data_folder(env: &Env, name: &str) -> Result<PathBuf> {
    let dir = env.data.path().join(format!("data-{name}"));
    std::fs::create_dir_all(dir.join("input"))?;
    std::fs::create_dir_all(dir.join("output"))?;
    for entry in std::fs::read_dir(env.input_dir())? {
        let entry = entry?;
        let copy = dir.join("input").join(entry.file_name());
        std::fs::copy(entry.path(), &copy)?;
        readable_by_all(&copy)?;
    }
    std::os::unix::fs::chown(dir.join("output"), Some(RUN_AS), Some(RUN_AS))?;
    Ok(dir)
}

pub fn readable_by_all(file: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// An example pipeline (examples/<file>) in namespace `ns` with the test's `model` in place of
/// the example's (same format), on cpu, small resources; `edit` changes the rest.
pub fn example(
    file: &str,
    ns: &str,
    model: &Model,
    source_uri: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<InferencePipeline> {
    let text = std::fs::read_to_string(repo().join("examples").join(file))?;
    let mut p: serde_json::Value = serde_yaml::from_str(&text)?;
    p["metadata"]["namespace"] = json!(ns);
    p["spec"]["device"] = json!("cpu");
    let first = p["spec"]["models"][0].clone();
    ensure!(
        first["format"] == json!(model.format),
        "{file}: the example's model is {}, not {}",
        first["format"],
        model.format
    );
    let mut m = first;
    m["source"] = json!({
        "uri": source_uri,
        "size": format!("{}Mi", model.bytes.div_ceil(1 << 20) + 1),
        "sha256": model.sha256,
    });
    p["spec"]["models"] = json!([m]);
    if let Some(t) = p["spec"]
        .get_mut("template")
        .and_then(|t| t.as_object_mut())
    {
        // The examples' resources fit their 400 MiB models and a GPU node's selector.
        t.remove("resources");
        t.remove("nodeSelector");
        t.remove("tolerations");
    }
    edit(&mut p);
    Ok(serde_json::from_value(p)?)
}

/// A Secret `name` in `ns` with the S3 server's credentials, as a pipeline's credentialsSecret.
pub async fn s3_secret(
    client: &Client,
    ns: &str,
    name: &str,
    server: &kube_zerocopy_e2e::s3::S3Server,
) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
        },
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&Default::default(), &secret)
        .await?;
    Ok(())
}

/// The Degraded condition of the pipeline `name` once it is Blocked (within two minutes).
pub async fn blocked_because(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    wait_phase(client, ns, name, &["Blocked"], Duration::from_secs(120)).await?;
    let status = Api::<InferencePipeline>::namespaced(client.clone(), ns)
        .get_status(name)
        .await?
        .status
        .context("no status")?;
    status
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .context("no Degraded condition")
}

pub async fn apply(client: &Client, pipeline: &InferencePipeline) -> Result<()> {
    let ns = pipeline
        .metadata
        .namespace
        .as_deref()
        .context("a namespace")?;
    let name = pipeline.metadata.name.as_deref().context("a name")?;
    Api::<InferencePipeline>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("kzc-real-node-test").force(),
            &Patch::Apply(pipeline),
        )
        .await
        .with_context(|| format!("applying pipeline {ns}/{name}"))?;
    Ok(())
}

/// Waits until the pipeline's phase is one of `phases`; fails at once on Failed (unless
/// asked for) with its conditions.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phases: &[&str],
    timeout: Duration,
) -> Result<InferencePipeline> {
    let api: Api<InferencePipeline> = Api::namespaced(client.clone(), ns);
    let what = format!("pipeline {ns}/{name} to reach {phases:?}");
    eventually_seen(&what, timeout, || {
        let api = api.clone();
        async move {
            let p = api.get(name).await?;
            let status = p.status.clone().unwrap_or_default();
            let phase = status.phase.map(|p| p.as_str()).unwrap_or_default();
            let seen = format!(
                "phase {phase:?}, progress {:?}, conditions {}",
                status.progress,
                status
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if phases.contains(&phase) {
                return Ok((Some(p), seen));
            }
            if phase == "Failed" {
                bail!("pipeline {ns}/{name} failed: {seen}");
            }
            Ok((None, seen))
        }
    })
    .await
}

/// The pods of a pipeline.
pub async fn pods(client: &Client, ns: &str, pipeline: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    // Its workers: not the pod of the Job that planned its shards.
    let lp = ListParams::default().labels(&format!(
        "kube-zerocopy.io/pipeline={pipeline},!kube-zerocopy.io/step"
    ));
    Ok(api.list(&lp).await?.items)
}

/// One pod's timeline from its status (seconds: the API's resolution).
#[derive(Debug)]
pub struct Timeline {
    pub pod: String,
    pub scheduled: Time,
    /// None in a Node-sharing pod: the node agent mounted its models before any container.
    pub weight_server_started: Option<Time>,
    /// The pod's Initialized condition: the weight server's startup probe passed (every model
    /// published); with Node sharing, when the kubelet started the pod, its volumes mounted.
    pub weights_ready: Time,
    pub worker_started: Time,
    pub finished: Option<Time>,
}

impl Timeline {
    pub fn of(pod: &Pod) -> Result<Timeline> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.as_ref().context("no pod status")?;
        let condition = |t: &str| -> Result<Time> {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t && c.status == "True")
                .and_then(|c| c.last_transition_time.clone())
                .with_context(|| format!("pod {name}: no {t} condition"))
        };
        let sidecar = status
            .init_container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "weight-server");
        let worker = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "worker")
            .with_context(|| format!("pod {name}: no worker status"))?;
        let started = |s: &k8s_openapi::api::core::v1::ContainerStatus| -> Option<Time> {
            let state = s.state.as_ref()?;
            state
                .running
                .as_ref()
                .and_then(|r| r.started_at.clone())
                .or_else(|| state.terminated.as_ref().and_then(|t| t.started_at.clone()))
        };
        let finished = worker
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.finished_at.clone());
        Ok(Timeline {
            scheduled: condition("PodScheduled")?,
            weight_server_started: sidecar
                .map(|s| {
                    started(s)
                        .with_context(|| format!("pod {name}: the weight server never started"))
                })
                .transpose()?,
            weights_ready: condition("Initialized")?,
            worker_started: started(worker)
                .with_context(|| format!("pod {name}: the worker never started"))?,
            finished,
            pod: name,
        })
    }

    /// The worker started only after the weight server's startup probe passed.
    pub fn check_order(&self) -> Result<()> {
        let t = |x: &Time| x.0;
        let server = self.weight_server_started.as_ref().map(t);
        ensure!(
            server.is_none_or(|s| t(&self.scheduled) <= s && s <= t(&self.weights_ready))
                && t(&self.scheduled) <= t(&self.weights_ready)
                && t(&self.weights_ready) <= t(&self.worker_started),
            "pod {}: out of order: {self:?}",
            self.pod
        );
        Ok(())
    }

    pub fn line(&self) -> String {
        let at = |x: &Time| x.0.as_second() - self.scheduled.0.as_second();
        format!(
            "{}: scheduled 0 s, weight server started {}, weights ready {} s, worker started {} s, finished {}",
            self.pod,
            self.weight_server_started
                .as_ref()
                .map_or("- (the node agent's volume)".into(), |s| format!("{} s", at(s))),
            at(&self.weights_ready),
            at(&self.worker_started),
            self.finished
                .as_ref()
                .map_or("-".into(), |f| format!("{} s", at(f)))
        )
    }
}

/// Prints every pod's timeline and checks the start order of each.
pub async fn timelines(client: &Client, ns: &str, pipeline: &str) -> Result<Vec<Timeline>> {
    let mut all = Vec::new();
    for pod in pods(client, ns, pipeline).await? {
        let t = Timeline::of(&pod)?;
        println!("  {ns}/{pipeline} {}", t.line());
        t.check_order()?;
        all.push(t);
    }
    Ok(all)
}

/// The worker container's log of a pod (the Task worker prints its report there).
pub async fn worker_log(client: &Client, ns: &str, pod: &str) -> Result<String> {
    container_log(client, ns, pod, "worker").await
}

pub async fn container_log(
    client: &Client,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api
        .logs(
            pod,
            &LogParams {
                container: Some(container.into()),
                ..Default::default()
            },
        )
        .await?)
}

/// Asserts that every output shard equals the reference's.
pub fn check_outputs(output: &Path, reference: &Path) -> Result<()> {
    let mut compared = 0;
    for expected in kube_zerocopy_batch::shards::list_shards(reference)? {
        let got = output.join(expected.file_name().context("a shard file")?);
        ensure!(got.exists(), "no output {}", got.display());
        let (a, b) = (read_output(&got), read_output(&expected));
        ensure!(
            a.equal(&b),
            "{} differs from kube-zerocopy local run's",
            got.display()
        );
        compared += 1;
    }
    ensure!(
        compared == SHARDS,
        "{compared} reference shards, not {SHARDS}"
    );
    Ok(())
}

/// Memory on the node of one container, from its cgroup (v1 memory controller) and /proc.
#[derive(Debug, Default, Clone, Copy)]
pub struct ContainerMemory {
    /// tmpfs pages charged to the container (memory.stat `total_shmem`).
    pub shmem: u64,
    /// Summed over its processes, kibibytes.
    pub pss_kib: u64,
    pub uss_kib: u64,
    /// PSS of its mappings of the shared weights (`tensors.bin`).
    pub weights_pss_kib: u64,
}

/// The cgroup folder of a container (by its id) in the memory hierarchy.
fn container_cgroup(container_id: &str) -> Result<PathBuf> {
    let id = container_id.rsplit("://").next().unwrap_or(container_id);
    let root = Path::new("/sys/fs/cgroup/memory/kubepods");
    if let Some(found) = walk(root).into_iter().find(|p| p.ends_with(id)) {
        return Ok(found);
    }
    bail!(
        "no memory cgroup for container {id} under {}",
        root.display()
    )
}

pub fn container_memory(pod: &Pod, container: &str) -> Result<ContainerMemory> {
    let status = pod.status.as_ref().context("no status")?;
    let id = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("no running {container}"))?;
    let cgroup = container_cgroup(&id)?;
    let stat = std::fs::read_to_string(cgroup.join("memory.stat"))?;
    let shmem = stat
        .lines()
        .find_map(|l| l.strip_prefix("total_shmem "))
        .and_then(|v| v.trim().parse().ok())
        .context("no total_shmem in memory.stat")?;
    let mut m = ContainerMemory {
        shmem,
        ..Default::default()
    };
    for pid in std::fs::read_to_string(cgroup.join("cgroup.procs"))?.lines() {
        let whole = kube_zerocopy_worker::memory::MemoryStats::of_process(pid.trim())?;
        m.pss_kib += whole.pss_kib;
        m.uss_kib += whole.uss_kib;
        m.weights_pss_kib += weights_pss_kib(pid.trim())?;
    }
    Ok(m)
}

/// PSS of a process's mappings of `tensors.bin` files (paths as the container sees them).
fn weights_pss_kib(pid: &str) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with("/tensors.bin");
        } else if inside {
            if let Some(v) = line.strip_prefix("Pss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Ok(total)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
