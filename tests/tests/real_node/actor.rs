//! Actor pipelines from the examples on the real node: the Service answers batches equal to
//! `kube-zerocopy local run`'s outputs; memory on the node shows the weights once per pod
//! (Pod sharing) or once per node for two pipelines of two namespaces (Node sharing, through
//! the node agent).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use std::os::unix::fs::MetadataExt;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::invocation::ACTOR_PORT;
use kube_zerocopy::node_store::{held_label, NodeStore};
use kube_zerocopy_e2e::cluster::host::{walk, GATEWAY};
use kube_zerocopy_e2e::cluster::node::NODE_NAME;
use kube_zerocopy_e2e::cluster::real::OPERATOR_NAMESPACE;
use kube_zerocopy_e2e::s3::S3Server;
use kube_zerocopy_e2e::wait::eventually_seen;
use kube_zerocopy_e2e::{make_model, metric_value, read_output, sha256_of, RenameCounter};
use kube_zerocopy_fetch::config::NODE_STORE_DRIVER;
use kube_zerocopy_worker::oip;
use serde_json::json;

use crate::support::*;

/// examples/actor-torchscript.yaml: TorchScript, Pod sharing, 2 replicas, the model over http.
/// Each pod holds one copy, charged to its weight server; its worker maps it.
pub async fn torchscript_pod_sharing(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "actor-torchscript", &[]).await?;
    let uri = format!("{}/{}", env.http_base, env.torchscript.file);
    let pipeline = example(
        "actor-torchscript.yaml",
        &ns.name,
        &env.torchscript,
        &uri,
        |p| {
            p["spec"]["actor"] = json!({"replicas": 2});
        },
    )?;
    let outcome = async {
        run_actor(&env, &pipeline, &env.torchscript).await?;
        let name = pipeline.metadata.name.as_deref().unwrap();
        let model = env.torchscript.bytes;
        for pod in pods(&env.client, &ns.name, name).await? {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let server = container_memory(&pod, "weight-server")?;
            let worker = container_memory(&pod, "worker")?;
            println!(
                "  {}/{pod_name}: weight server charged {:.1} MiB of tmpfs; worker PSS {:.1} MiB, USS {:.1} MiB, weights mapped PSS {:.1} MiB (model file {:.1} MiB)",
                ns.name,
                mib(server.shmem),
                worker.pss_kib as f64 / 1024.0,
                worker.uss_kib as f64 / 1024.0,
                worker.weights_pss_kib as f64 / 1024.0,
                mib(model),
            );
            // One copy per pod, charged to the weight server, none to the worker.
            within(server.shmem, model, 0.8, 1.2, "the weight server's tmpfs charge")?;
            ensure!(
                worker.shmem < model / 10,
                "the worker is charged {} B of tmpfs",
                worker.shmem
            );
            // The worker maps every weight (it ran a batch) and is alone in mapping them. (Its
            // USS counts those pages too, being their only mapper, besides libtorch's own.)
            within(worker.weights_pss_kib * 1024, model, 0.8, 1.2, "the worker's mapped PSS")?;
        }
        Ok(())
    }
    .await;
    env.record(&format!("{}/{}", ns.name, "ranker"), outcome.is_ok());
    outcome
}

/// examples/actor-s3.yaml: safetensors from a real S3 server (versitygw on the pods' bridge)
/// with the credentials of a Secret, Pod sharing, in a namespace that enforces `restricted`.
/// The weight server streams the object into its shared memory by ranges; every batch
/// answered equals the reference.
pub async fn safetensors_from_s3_with_a_secret(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "actor-s3", &[RESTRICTED]).await?;
    let server = tokio::task::spawn_blocking(|| S3Server::start_on(GATEWAY)).await??;
    server.create_bucket("models")?;
    let file = env.models_dir().join(env.safetensors.file);
    server.put_file("models", env.safetensors.file, &file)?;
    s3_secret(&env.client, &ns.name, "s3-reader", &server).await?;
    let uri = format!("s3://models/{}", env.safetensors.file);
    let pipeline = example("actor-s3.yaml", &ns.name, &env.safetensors, &uri, |p| {
        p["spec"]["actor"] = json!({"replicas": 1});
        p["spec"]["models"][0]["source"]["s3"] = json!({
            "endpoint": server.endpoint,
            "region": server.region,
            "credentialsSecret": "s3-reader",
        });
    })?;
    let outcome = async {
        run_actor(&env, &pipeline, &env.safetensors).await?;
        let name = pipeline.metadata.name.as_deref().unwrap();
        for pod in pods(&env.client, &ns.name, name).await? {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let log = container_log(&env.client, &ns.name, &pod_name, "weight-server").await?;
            ensure!(
                log.contains("fetched into place"),
                "{pod_name}: the weight server did not stream the model:\n{log}"
            );
            ensure!(
                !log.contains(&server.secret_key),
                "{pod_name}: the weight server logged the secret"
            );
        }
        println!(
            "  {}/{name}: the model streamed from S3 into the weight server's memory",
            ns.name
        );
        Ok(())
    }
    .await;
    env.record(&format!("{}/{}", ns.name, "classifier-s3"), outcome.is_ok());
    outcome
}

/// examples/actor-safetensors.yaml twice, Node sharing, in two namespaces that enforce Pod
/// Security `restricted` (2 replicas each, the model over http): the node agent mounts the
/// model into all four pods from one copy in its store, charged to the agent, and no worker
/// can write it.
pub async fn safetensors_two_namespaces_node_sharing(env: Arc<Env>) -> Result<()> {
    let mut namespaces = Vec::new();
    let mut pipelines = Vec::new();
    let uri = format!("{}/{}", env.http_base, env.safetensors.file);
    for prefix in ["tenant-a", "tenant-b"] {
        let ns = TestNamespace::create(&env.client, prefix, &[RESTRICTED]).await?;
        pipelines.push(example(
            "actor-safetensors.yaml",
            &ns.name,
            &env.safetensors,
            &uri,
            |_| {},
        )?);
        namespaces.push(ns);
    }
    // The kubelet registered the agent's driver (through the registrar's socket).
    let csi_node = Api::<CSINode>::all(env.client.clone())
        .get(NODE_NAME)
        .await?;
    let drivers: Vec<String> = csi_node
        .spec
        .drivers
        .iter()
        .map(|d| d.name.clone())
        .collect();
    ensure!(
        drivers.iter().any(|d| d == NODE_STORE_DRIVER),
        "the node's CSINode lists {drivers:?}, not {NODE_STORE_DRIVER}"
    );
    let mut results = Vec::new();
    for p in &pipelines {
        let r = run_actor(&env, p, &env.safetensors).await;
        env.record(
            &format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap(),
                p.metadata.name.as_deref().unwrap()
            ),
            r.is_ok(),
        );
        results.push(r);
    }
    results.into_iter().collect::<Result<Vec<_>>>()?;

    let model = env.safetensors.bytes;
    let (mut charged, mut weights_pss_kib, mut workers) = (0, 0, 0);
    let mut per_worker = Vec::new();
    for p in &pipelines {
        let ns = p.metadata.namespace.as_deref().unwrap();
        for pod in pods(&env.client, ns, p.metadata.name.as_deref().unwrap()).await? {
            let spec = pod.spec.as_ref().context("a pod without a spec")?;
            ensure!(
                spec.init_containers.as_ref().is_none_or(|c| c.is_empty()),
                "a Node-sharing pod has a weight server"
            );
            let worker = container_memory(&pod, "worker")?;
            println!(
                "  {ns}/{}: worker charged {:.1} MiB of tmpfs; PSS {:.1} MiB, USS {:.1} MiB, weights mapped PSS {:.1} MiB",
                pod.metadata.name.as_deref().unwrap_or(""),
                mib(worker.shmem),
                worker.pss_kib as f64 / 1024.0,
                worker.uss_kib as f64 / 1024.0,
                worker.weights_pss_kib as f64 / 1024.0,
            );
            charged += worker.shmem;
            weights_pss_kib += worker.weights_pss_kib;
            workers += 1;
            per_worker.push((pod, worker.weights_pss_kib));
        }
    }
    let store = env.cluster.node.agent_dir().join("store");
    let copies = published_copies(&store, &env.safetensors.sha256)?;
    let (agent, held) = agent_memory(&env, &store).await?;
    println!(
        "  {workers} workers of 2 pipelines in 2 namespaces; {copies} copy in the node's store; the agent charged {:.1} MiB of tmpfs for the {:.1} MiB its store holds; the workers {:.1} MiB; mapped PSS summed {:.1} MiB (model file {:.1} MiB)",
        mib(agent.shmem),
        mib(held),
        mib(charged),
        weights_pss_kib as f64 / 1024.0,
        mib(model)
    );
    ensure!(workers == 4, "{workers} workers, not 4");
    ensure!(
        copies == 1,
        "{copies} copies of the model in the node's store"
    );
    // The store's memory is the agent's: all of it, once.
    within(
        agent.shmem,
        held,
        0.9,
        1.1,
        "the agent's tmpfs charge against its store's bytes",
    )?;
    ensure!(
        charged < model / 10,
        "{charged} B of tmpfs charged to the workers: the weights are the agent's"
    );
    // PSS divides shared pages among their mappers: together they hold one copy.
    within(
        weights_pss_kib * 1024,
        model,
        0.8,
        1.2,
        "the workers' mapped PSS summed",
    )?;
    no_worker_writes_the_store(&env, &per_worker[0].0, &store).await?;
    // The agent's /metrics, scraped at its pod's IP, sees the four volumes and the model.
    let agent_ip = agent_pod(&env)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the agent's pod has no IP")?;
    let metrics = format!("http://{agent_ip}:9471/metrics");
    for (name, at_least) in [
        ("kube_zerocopy_agent_volumes", 4.0),
        ("kube_zerocopy_agent_models", 1.0),
        ("kube_zerocopy_agent_layouts_total", 1.0),
    ] {
        let value = metric(&metrics, name).await?;
        println!("  agent /metrics: {name} {value}");
        ensure!(
            value >= at_least,
            "{name} is {value}, not at least {at_least}"
        );
    }
    node_store_reports(&env, &pipelines[0]).await?;
    // Four workers map one copy: each holds about a quarter of it, and its /metrics says the
    // same figure as its smaps read from outside.
    for (pod, pss_kib) in &per_worker {
        let name = pod.metadata.name.as_deref().unwrap_or("");
        within(
            pss_kib * 1024,
            model / per_worker.len() as u64,
            0.8,
            1.2,
            &format!("{name}: the worker's mapped PSS"),
        )?;
        let reported = mapped_pss_metric(pod).await?;
        println!(
            "  {}/{name}: /metrics weights_mapped_pss {:.1} MiB, smaps {:.1} MiB",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            mib(reported),
            *pss_kib as f64 / 1024.0
        );
        within(
            reported,
            pss_kib * 1024,
            0.98,
            1.02,
            &format!("{name}: the mapped PSS its /metrics reports against its smaps"),
        )?;
    }
    Ok(())
}

/// The agent's report, as `kubectl get nodestores` shows it: the model with the four pods that
/// map it (at least: an earlier scenario's may still be ending), where it came from and how
/// long its fetch and layout took; and the node's label saying it holds the model.
async fn node_store_reports(env: &Env, pipeline: &InferencePipeline) -> Result<()> {
    let digest = &env.safetensors.sha256;
    let stores: Api<NodeStore> = Api::all(env.client.clone());
    let held = eventually_seen(
        "the NodeStore listing the model with 4 pods",
        Duration::from_secs(60),
        || async {
            let status = stores.get(NODE_NAME).await?.status.unwrap_or_default();
            let seen = format!("{status:?}");
            let model = status.models.into_iter().find(|m| &m.digest == digest);
            Ok((model.filter(|m| m.pods >= 4), seen))
        },
    )
    .await?;
    println!(
        "  NodeStore {NODE_NAME}: {} ({}) {} B, {} pods, fetched in {:?} s, laid out in {:?} s",
        held.name, held.source, held.bytes, held.pods, held.fetch_seconds, held.layout_seconds
    );
    ensure!(
        held.name == pipeline.spec.models[0].name && held.source.ends_with(env.safetensors.file),
        "the report names {} from {}",
        held.name,
        held.source
    );
    ensure!(
        held.fetch_seconds.is_some()
            && held.layout_seconds.is_some()
            && held.published_at.is_some(),
        "the report has no timings: {held:?}"
    );
    let node = Api::<Node>::all(env.client.clone()).get(NODE_NAME).await?;
    let label = held_label(digest);
    ensure!(
        node.metadata
            .labels
            .unwrap_or_default()
            .get(&label)
            .map(String::as_str)
            == Some("held"),
        "node {NODE_NAME} has no label {label}"
    );
    Ok(())
}

/// The base URL of a replica's actor, by its pod's IP.
fn actor_url(pod: &Pod) -> Result<String> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("a pod without an IP")?;
    Ok(format!("http://{ip}:{ACTOR_PORT}"))
}

/// The worker's own figure for its share of the weights: `weights_mapped_pss` from /metrics.
async fn mapped_pss_metric(pod: &Pod) -> Result<u64> {
    let url = format!("{}/metrics", actor_url(pod)?);
    let value = metric(&url, "kube_zerocopy_worker_weights_mapped_pss_bytes").await?;
    Ok(value as u64)
}

/// The value of metric `name` (no labels) at the /metrics `url`.
async fn metric(url: &str, name: &str) -> Result<f64> {
    let url = url.to_owned();
    let text = tokio::task::spawn_blocking(move || -> Result<String> {
        Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
    })
    .await??;
    metric_value(&text, name).with_context(|| format!("no {name} in /metrics"))
}

/// How many published folders of the node agent's store hold `sha256`.
fn published_copies(store: &std::path::Path, sha256: &str) -> Result<usize> {
    // Staging, lock and view folders (".staging", ".users", ".views") hold no published model.
    let hidden = |p: &std::path::Path| {
        p.strip_prefix(store).is_ok_and(|rel| {
            rel.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        })
    };
    Ok(walk(store)
        .iter()
        .filter(|p| p.file_name().is_some_and(|f| f == sha256) && !hidden(p))
        .count())
}

/// The node agent's memory, and the bytes of every file its store holds (each inode once:
/// the views' hard links are the same files).
/// The node agent's pod.
async fn agent_pod(env: &Env) -> Result<Pod> {
    let agents = Api::<Pod>::namespaced(env.client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/component=node-agent"))
        .await?;
    agents.items.into_iter().next().context("no node agent pod")
}

async fn agent_memory(env: &Env, store: &std::path::Path) -> Result<(ContainerMemory, u64)> {
    let memory = container_memory(&agent_pod(env).await?, "agent")?;
    let mut inodes = std::collections::BTreeMap::new();
    for dir in walk(store) {
        for entry in std::fs::read_dir(&dir)? {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                inodes.insert(meta.ino(), meta.len());
            }
        }
    }
    Ok((memory, inodes.values().sum()))
}

/// From inside a worker container (its own user, mounts and environment, through containerd),
/// the weight server's own `publish` tries to write the store the pod sees, and into the
/// model's folder: each fails on the read-only mount, and the model's file on the node is
/// unchanged.
async fn no_worker_writes_the_store(env: &Env, pod: &Pod, store: &std::path::Path) -> Result<()> {
    let tensors = store
        .join("blobs")
        .join(&env.safetensors.sha256)
        .join("tensors.bin");
    let before = (sha256_of(&tensors), std::fs::metadata(&tensors)?.nlink());
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "worker"))
        .and_then(|c| c.container_id.clone())
        .context("no running worker")?;
    let id = id.rsplit("://").next().unwrap_or(&id).to_owned();
    // Publish into the pod's store as its environment names it, then with the store and then
    // the bindings pointed into the model's own folder (a file planted next to its tensors).
    let model_dir = format!("/kzc/models/blobs/{}", env.safetensors.sha256);
    let attempts: [&[&str]; 3] = [
        &["publish"],
        &["--store", &model_dir, "publish"],
        &["--bindings", &model_dir, "publish"],
    ];
    for (n, attempt) in attempts.iter().enumerate() {
        let out = env
            .cluster
            .node
            .ctr()
            .args([
                "tasks",
                "exec",
                "--exec-id",
                &format!("write-attempt-{n}"),
                &id,
            ])
            .arg("kube-zerocopy-weight-server")
            .args(*attempt)
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        println!(
            "  inside a worker, kube-zerocopy-weight-server {}: exit {:?}: {}",
            attempt.join(" "),
            out.status.code(),
            said.trim().lines().last().unwrap_or("")
        );
        ensure!(
            !out.status.success(),
            "{}: writing the store from inside a worker succeeded",
            attempt.join(" ")
        );
        ensure!(
            said.contains("Read-only file system"),
            "{}: not refused by the read-only mount: {said}",
            attempt.join(" ")
        );
    }
    let after = (sha256_of(&tensors), std::fs::metadata(&tensors)?.nlink());
    ensure!(
        before == after,
        "the model's file changed: {before:?} then {after:?}"
    );
    Ok(())
}

fn within(value: u64, reference: u64, low: f64, high: f64, what: &str) -> Result<()> {
    let r = value as f64 / reference as f64;
    ensure!(
        (low..=high).contains(&r),
        "{what}: {value} B is {r:.2} of {reference} B (expected {low} to {high})"
    );
    Ok(())
}

/// Applies an Actor pipeline, waits until it is Ready, prints the timelines, and sends every
/// input shard through its Service (its ClusterIP, through kube-proxy): each answer equals
/// the reference output.
pub async fn run_actor(env: &Env, pipeline: &InferencePipeline, model: &Model) -> Result<()> {
    let name = pipeline.metadata.name.clone().context("a name")?;
    let ns = pipeline.metadata.namespace.clone().context("a namespace")?;
    apply(&env.client, pipeline).await?;
    wait_phase(
        &env.client,
        &ns,
        &name,
        &["Ready"],
        Duration::from_secs(300),
    )
    .await?;
    timelines(&env.client, &ns, &name).await?;
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns);
    let service = services.get(&format!("{name}-zerocopy")).await?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service has no ClusterIP")?;
    let mut shards: Vec<_> = std::fs::read_dir(env.input_dir())?
        .flatten()
        .map(|e| e.path())
        .collect();
    shards.sort();
    for shard in &shards {
        let body = std::fs::read(shard)?;
        let bytes = infer_through_service(&ip, &name, body).await?;
        let got = kube_zerocopy_worker::shard_file::decode_output(&bytes)?;
        let expected = read_output(&model.reference.join(shard.file_name().unwrap()));
        ensure!(
            got.equal(&expected),
            "{ns}/{name}: the answer for {} differs from kube-zerocopy local run's",
            shard.display()
        );
    }
    println!("  {ns}/{name}: every batch answered through the Service equals the reference");
    // The Service spreads batches at random: one batch to each replica directly as well, so
    // that every worker has touched the weights before its memory is read.
    let first = shards.first().context("no input shard")?;
    let expected = read_output(&model.reference.join(first.file_name().unwrap()));
    for pod in pods(&env.client, &ns, &name).await? {
        let url = format!("{}/v2/models/{name}/infer", actor_url(&pod)?);
        let bytes = post(&url, std::fs::read(first)?).await?;
        let got = kube_zerocopy_worker::shard_file::decode_output(&bytes)?;
        ensure!(
            got.equal(&expected),
            "{url}: the answer differs from the reference"
        );
    }
    Ok(())
}

/// POSTs a batch (a safetensors file) to model `model` of the Service at ClusterIP `ip`: the
/// answer as a safetensors file. kube-proxy programs the Service a moment after the endpoints
/// are ready, so refusals are retried for a minute.
pub async fn infer_through_service(ip: &str, model: &str, body: Vec<u8>) -> Result<Vec<u8>> {
    let url = format!("http://{ip}/v2/models/{model}/infer");
    eventually_seen(
        &format!("an answer from {url}"),
        Duration::from_secs(60),
        || {
            let (url, body) = (url.clone(), body.clone());
            async move {
                Ok(match post(&url, body).await {
                    Ok(b) => (Some(b), String::new()),
                    Err(e) => (None, format!("{e:#}")),
                })
            }
        },
    )
    .await
}

/// Sends a safetensors file's tensor with the Open Inference Protocol's binary extension, as
/// the driver does: the answer as a safetensors file.
async fn post(url: &str, file: Vec<u8>) -> Result<Vec<u8>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let (body, json_length) = kube_zerocopy_batch::protocol::request_from_file(&file)?;
        let mut response = ureq::post(&url)
            .header(oip::HEADER_LENGTH, json_length.to_string())
            .send(&body[..])?;
        let json_length = response
            .headers()
            .get(oip::HEADER_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut bytes = Vec::new();
        response.body_mut().as_reader().read_to_end(&mut bytes)?;
        kube_zerocopy_batch::protocol::file_from_answer(&bytes, json_length)
    })
    .await?
}

/// examples/actor-batch.yaml in a `restricted` namespace: 3 replicas and a driver Job over 60
/// shard files; once outputs appear, one serving replica pod is killed (deleted with no grace). The
/// run Succeeds, status.batches counts all 60 done, every output is renamed into place on the
/// host exactly once and equals, byte for byte, what Task mode (`kube-zerocopy local run`)
/// writes for the same input; the manifest lists all 60; the replicas are scaled to 0.
pub async fn batch_run_survives_a_killed_replica(env: Arc<Env>) -> Result<()> {
    const BATCHES: usize = 60;
    let (ns, data) =
        task_namespace(&env, "actor-batch", &[RESTRICTED], "reviews-data", true).await?;
    let outcome = async {
        // Its own input, large enough that a batch takes a while: 512 rows each.
        let input = data.join("input");
        std::fs::remove_dir_all(&input)?;
        make_model(&[
            "inputs",
            input.to_str().context("a UTF-8 path")?,
            "--shards",
            &BATCHES.to_string(),
            "--batch",
            "512",
            "--features",
            "512",
        ]);
        for shard in kube_zerocopy_batch::shards::list_shards(&input)? {
            readable_by_all(&shard)?;
        }
        let model = env.models_dir().join(env.torchscript.file);
        let reference = data.join("task-reference");
        local_task_run(&model, env.torchscript.format, &input, &reference)?;

        let uri = format!("file://{MODELS_MOUNT}/{}", env.torchscript.file);
        let pipeline = example("actor-batch.yaml", &ns.name, &env.torchscript, &uri, |p| {
            // Without dynamic batching: each output the model run on its shard alone, as in
            // Task mode, so that they are equal bit for bit.
            p["spec"]["actor"] = json!({"replicas": 3, "inFlightPerReplica": 2});
        })?;
        let name = pipeline.metadata.name.clone().context("a name")?;
        let output = data.join("output");
        let renames = RenameCounter::watch(&output);
        apply(&env.client, &pipeline).await?;

        // A replica killed once outputs appear: the batches it holds are lost with it.
        let started = std::time::Instant::now();
        while kube_zerocopy_batch::shards::list_shards(&output)?.len() < 3 {
            ensure!(
                started.elapsed() < Duration::from_secs(300),
                "no output after 5 minutes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let victim = pods(&env.client, &ns.name, &name)
            .await?
            .into_iter()
            .find(|p| {
                // A replica that serves, so that it holds batches when it dies.
                let serving = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                serving
                    && p.labels().get("app.kubernetes.io/component").map(String::as_str)
                        == Some("actor")
            })
            .context("no serving replica pod")?;
        let victim_name = victim.metadata.name.clone().context("a pod name")?;
        Api::<Pod>::namespaced(env.client.clone(), &ns.name)
            .delete(&victim_name, &kube::api::DeleteParams::default().grace_period(0))
            .await?;
        let done_at_kill = kube_zerocopy_batch::shards::list_shards(&output)?.len();
        println!("  {}/{name}: replica {victim_name} killed with {done_at_kill} of {BATCHES} outputs written", ns.name);

        let finished = wait_phase(
            &env.client,
            &ns.name,
            &name,
            &["Succeeded"],
            Duration::from_secs(300),
        )
        .await?;
        let status = finished.status.context("a status")?;
        let batches = status.batches.context("no status.batches")?;
        println!(
            "  {}/{name}: {} of {} batches done, {} sent again; progress {:?}",
            ns.name, batches.done, batches.total, batches.retried, status.progress
        );
        ensure!(
            batches.total == BATCHES as i64 && batches.done == BATCHES as i64 && batches.failed.is_empty(),
            "status.batches {batches:?}"
        );
        ensure!(done_at_kill < BATCHES, "the run was over before the replica was killed");
        // The killed replica held batches (two in flight per replica): they were sent again.
        ensure!(
            batches.retried >= 1,
            "no batch was sent again after replica {victim_name} was killed: {batches:?}"
        );

        let counts = renames.counts();
        for shard in kube_zerocopy_batch::shards::list_shards(&reference)? {
            let file = shard.file_name().context("a shard")?.to_string_lossy().into_owned();
            ensure!(
                counts.get(&file) == Some(&1),
                "{file} was put in place {:?} times",
                counts.get(&file)
            );
            ensure!(
                std::fs::read(output.join(&file))? == std::fs::read(&shard)?,
                "{file} differs from Task mode's output"
            );
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(output.join("manifest.json"))?)?;
        ensure!(
            manifest["shards"].as_array().map(Vec::len) == Some(BATCHES),
            "the manifest lists {:?} shards",
            manifest["shards"].as_array().map(Vec::len)
        );
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(env.client.clone(), &ns.name);
        let replicas = deployments
            .get(&format!("{name}-zerocopy"))
            .await?
            .spec
            .and_then(|s| s.replicas);
        ensure!(replicas == Some(0), "the replicas were not scaled away: {replicas:?}");
        println!(
            "  {}/{name}: every output written once and equal to Task mode's; replicas scaled to 0",
            ns.name
        );
        Ok(())
    }
    .await;
    env.record(&format!("{}/reviews", ns.name), outcome.is_ok());
    outcome
}
