//! Tenants attacking one another on the real node, each beside a victim: another tenant's
//! pipeline, an administrator's objects, or the node's agent that every tenant shares. Every
//! attack must be refused, the victim unharmed; the binary ends with `tenant attacks: N refused
//! of M`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::ResourceExt;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy_e2e::cluster::host::GATEWAY;
use kube_zerocopy_e2e::cluster::real::OPERATOR_NAMESPACE;
use kube_zerocopy_e2e::kueue::{Kueue, Manage};
use kube_zerocopy_e2e::s3::S3Server;
use kube_zerocopy_e2e::wait::eventually_seen;
use serde_json::json;

use crate::actor::run_actor;
use crate::bad_model::{any_started, weights_ready_with};
use crate::support::*;

/// examples/actor-s3.yaml with Node sharing: the node agent reads the private model with the
/// keys of the Secret the pod's CSI volume names (the kubelet reads it in the pod's namespace
/// and hands it over), and the owners' replica answers. A pipeline of another namespace names
/// the same digest and object with a Secret whose keys S3 refuses: its pod is never given the
/// node's copy (the agent refuses the mount; WeightsReady says why), and the owners' replica
/// still answers.
pub async fn a_private_model_mounted_by_another_namespace_that_names_its_digest(
    env: Arc<Env>,
) -> Result<()> {
    let owners = TestNamespace::create(&env.client, "private-owners", &[RESTRICTED]).await?;
    let others = TestNamespace::create(&env.client, "private-others", &[RESTRICTED]).await?;
    // A model of its own: a digest the node holds from a public source (another scenario's)
    // would be served to whoever names it, as anyone may fetch that source.
    let private = private_model(&env)?;
    let server = tokio::task::spawn_blocking(|| S3Server::start_on(GATEWAY)).await??;
    server.create_bucket("private")?;
    let file = env.models_dir().join(private.file);
    server.put_file("private", private.file, &file)?;
    s3_secret(&env.client, &owners.name, "s3-reader", &server).await?;
    let refused_keys: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-reader"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": "not-the-secret",
        },
    }))?;
    Api::<Secret>::namespaced(env.client.clone(), &others.name)
        .create(&Default::default(), &refused_keys)
        .await?;
    let uri = format!("s3://private/{}", private.file);
    let pipeline = |ns: &str| {
        example("actor-s3.yaml", ns, &private, &uri, |p| {
            p["spec"]["sharing"] = json!("Node");
            p["spec"]["actor"] = json!({"replicas": 1});
            p["spec"]["models"][0]["source"]["s3"] = json!({
                "endpoint": server.endpoint,
                "region": server.region,
                "credentialsSecret": "s3-reader",
            });
        })
    };
    let owned = pipeline(&owners.name)?;
    let name = owned.metadata.name.clone().context("a name")?;
    let outcome = async {
        run_actor(&env, &owned, &private).await?;
        apply(&env.client, &pipeline(&others.name)?).await?;
        let api: Api<InferencePipeline> = Api::namespaced(env.client.clone(), &others.name);
        let condition = weights_ready_with(&api, &name, "ModelsNotMounted", 180).await?;
        ensure!(
            condition.message.contains("as a private model"),
            "the other namespace's pod was not refused as the agent refuses it: {condition:?}"
        );
        ensure!(
            !condition.message.contains(&server.secret_key),
            "the refusal shows the owners' secret"
        );
        for pod in pods(&env.client, &others.name, &name).await? {
            ensure!(!any_started(&pod), "the other namespace's worker started");
        }
        // The owners' replica answers on.
        run_actor(&env, &owned, &private).await?;
        println!(
            "  {}/{name}: served from the node's store with its Secret; {}/{name} refused",
            owners.name, others.name
        );
        Ok(())
    }
    .await;
    env.record(&format!("{}/{name}", owners.name), outcome.is_ok());
    env.record_attack(
        "a private model mounted by another namespace that names its digest",
        outcome.is_ok(),
    );
    outcome
}

/// An Mlp of its own on the host, with its reference outputs (`kube-zerocopy local run`).
fn private_model(env: &Env) -> Result<Model> {
    const FILE: &str = "private-mlp.safetensors";
    let file = env.models_dir().join(FILE);
    kube_zerocopy_e2e::make_model(&[
        "mlp",
        file.to_str().context("a path")?,
        "--sizes",
        "512,640,16",
    ]);
    readable_by_all(&file)?;
    reference(env.data.path(), FILE, "Safetensors")
}

/// A batch run named so that its driver's account would be `etl-zerocopy-driver`, which an
/// administrator made for another job, with a cloud identity and rights of its own: the
/// operator creates no driver, takes nothing over (Blocked, ObjectNotOwned), and the account
/// is as it was.
pub async fn a_batch_driver_taking_over_an_administrators_account(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "takeover", &[RESTRICTED]).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns.name);
    let driver = "etl-zerocopy-driver";
    let cloud = "eks.amazonaws.com/role-arn";
    let account: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": driver, "annotations": {cloud: "arn:aws:iam::1:role/etl-admin"}}
    }))?;
    let before = accounts.create(&PostParams::default(), &account).await?;
    let uri = format!("{}/{}", env.http_base, env.torchscript.file);
    let pipeline = example("actor-batch.yaml", &ns.name, &env.torchscript, &uri, |p| {
        p["metadata"]["name"] = json!("etl");
        p["spec"]["actor"]["replicas"] = json!(1);
    })?;
    let outcome = async {
        apply(&env.client, &pipeline).await?;
        let degraded = blocked_because(&env.client, &ns.name, "etl").await?;
        ensure!(
            degraded.reason == "ObjectNotOwned"
                && degraded
                    .message
                    .contains(&format!("a ServiceAccount named {driver} already exists")),
            "{}: {}",
            degraded.reason,
            degraded.message
        );
        let after = accounts.get(driver).await?;
        ensure!(
            after.metadata.resource_version == before.metadata.resource_version
                && after.metadata.owner_references.is_none(),
            "the administrator's account was changed: {:?}",
            after.metadata
        );
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns.name);
        ensure!(
            jobs.get_opt("etl-zerocopy-driver").await?.is_none(),
            "a driver runs under the administrator's account"
        );
        println!("  {}/etl: Blocked, {}", ns.name, degraded.message);
        Ok(())
    }
    .await;
    env.record_attack(
        "a batch driver taking over an administrator's account",
        outcome.is_ok(),
    );
    outcome
}

/// A Node-sharing pipeline whose model source is the operator's metrics on its pod's address,
/// and another whose source is the cloud's metadata service: the node's agent, which fetches
/// from the node's network position, connects to neither, and the pods are told only that the
/// source was refused (nothing of what is there).
pub async fn sources_on_node_local_addresses(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "ssrf", &[RESTRICTED]).await?;
    let operator = Api::<Pod>::namespaced(env.client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await?;
    let operator_ip = operator
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .context("no operator pod with an address")?;
    let targets = [
        (
            "operator-metrics",
            format!("http://{operator_ip}:8080/metrics"),
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/".to_owned(),
        ),
    ];
    let outcome = async {
        for (name, uri) in &targets {
            // No digest: the agent would fetch it (a held digest needs no fetch).
            let pipeline = example(
                "actor-safetensors.yaml",
                &ns.name,
                &env.safetensors,
                uri,
                |p| {
                    p["metadata"]["name"] = json!(name);
                    p["spec"]["actor"] = json!({"replicas": 1});
                    if let Some(source) = p["spec"]["models"][0]["source"].as_object_mut() {
                        source.remove("sha256");
                    }
                },
            )?;
            apply(&env.client, &pipeline).await?;
            let api: Api<InferencePipeline> = Api::namespaced(env.client.clone(), &ns.name);
            let condition = weights_ready_with(&api, name, "ModelsNotMounted", 180).await?;
            ensure!(
                condition
                    .message
                    .contains("resolves to no address the node agent may fetch from")
                    && !condition.message.contains("# HELP"),
                "{name}: {}",
                condition.message
            );
        }
        Ok(())
    }
    .await;
    env.record_attack("sources on node-local addresses", outcome.is_ok());
    outcome
}

/// Two thousand idle connections to the node agent's metrics port, from the node (any pod can
/// open them): held while a victim's Node-sharing pipeline is mounted; the pipeline serves, the
/// agent answers /livez on a new connection once the held ones' headers are overdue (they are
/// still open on the attacker's side), and it did not restart.
pub async fn an_idle_connection_flood_of_the_node_agent(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "flood", &[RESTRICTED]).await?;
    let agents = Api::<Pod>::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let agent = || async {
        let pods = agents
            .list(&ListParams::default().labels("app.kubernetes.io/component=node-agent"))
            .await?;
        let pod = pods.items.into_iter().next().context("no node agent pod")?;
        let status = pod.status.context("an agent pod without status")?;
        let restarts: i32 = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum();
        anyhow::Ok((
            status.pod_ip.context("an agent without an address")?,
            restarts,
        ))
    };
    let (ip, restarts) = agent().await?;
    let address: std::net::SocketAddr = format!("{ip}:9471").parse()?;
    let uri = format!("{}/{}", env.http_base, env.safetensors.file);
    let victim = example(
        "actor-safetensors.yaml",
        &ns.name,
        &env.safetensors,
        &uri,
        |p| {
            p["spec"]["actor"] = json!({"replicas": 1});
        },
    )?;
    let outcome = async {
        raise_open_files(8192)?;
        let flooded = std::time::Instant::now();
        let held: Vec<_> = (0..2000)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()
            })
            .collect();
        println!(
            "  {}: {} idle connections to the agent held",
            ns.name,
            held.len()
        );
        run_actor(&env, &victim, &env.safetensors).await?;
        // Past the cap, connections are closed as they come, and the held ones once their
        // headers are overdue: /livez answers a new connection by then, the flood still held.
        let overdue = kube_zerocopy_runtime::process::ENDPOINT_HEADER_TIMEOUT * 2;
        tokio::time::sleep(overdue.saturating_sub(flooded.elapsed())).await;
        let livez = tokio::task::spawn_blocking(move || {
            ureq::get(&format!("http://{address}/livez"))
                .call()
                .map(|r| r.status().as_u16())
        })
        .await??;
        ensure!(livez == 200, "the agent's /livez answered {livez}");
        drop(held);
        let (_, after) = agent().await?;
        ensure!(
            after == restarts,
            "the agent restarted ({restarts} restarts before, {after} after)"
        );
        Ok(())
    }
    .await;
    env.record(
        &format!(
            "{}/{}",
            ns.name,
            victim.metadata.name.clone().unwrap_or_default()
        ),
        outcome.is_ok(),
    );
    env.record_attack(
        "an idle-connection flood of the node agent",
        outcome.is_ok(),
    );
    outcome
}

/// Lets this process hold `count` files at once (its connections).
fn raise_open_files(count: u64) -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: count,
        rlim_max: count,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    let done = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    ensure!(
        done == 0,
        "raising the open files limit: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A victim's model sits unused in the node's store (its pipeline deleted, the model kept for
/// its next replica). An attacker's Node-sharing pipeline names a source whose safetensors
/// header claims nearly the whole store and whose bytes then trickle: the agent removes
/// nothing to make room for bytes it has not fetched and verified (it fetches the model whole
/// first, which the trickle never completes), the attacker's pod is refused, and the victim's
/// model is still in the store.
pub async fn a_store_wipe_by_a_crafted_size_header(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "wipe", &[RESTRICTED]).await?;
    // The victim: a model of its own, mounted once, then unused.
    let file = env.models_dir().join("wipe-victim.safetensors");
    kube_zerocopy_e2e::make_model(&[
        "mlp",
        file.to_str().context("a path")?,
        "--sizes",
        "64,320,8",
    ]);
    readable_by_all(&file)?;
    let digest = kube_zerocopy_e2e::sha256_of(&file);
    let model = Model {
        file: env.safetensors.file,
        format: env.safetensors.format,
        bytes: std::fs::metadata(&file)?.len(),
        sha256: digest.clone(),
        reference: env.safetensors.reference.clone(),
    };
    let uri = format!("{}/wipe-victim.safetensors", env.http_base);
    let victim = example("actor-safetensors.yaml", &ns.name, &model, &uri, |p| {
        p["metadata"]["name"] = json!("victim");
        p["spec"]["actor"] = json!({"replicas": 1});
    })?;
    let held = env
        .cluster
        .node
        .agent_dir()
        .join("store/blobs")
        .join(&digest);
    let claimed = (kube_zerocopy_e2e::cluster::real::NODE_STORE_MIB - 1) << 20;
    let server = crafted_size_server(claimed)?;
    let outcome = async {
        apply(&env.client, &victim).await?;
        wait_phase(
            &env.client,
            &ns.name,
            "victim",
            &["Ready"],
            Duration::from_secs(300),
        )
        .await?;
        Api::<InferencePipeline>::namespaced(env.client.clone(), &ns.name)
            .delete("victim", &Default::default())
            .await?;
        kube_zerocopy_e2e::wait::eventually_seen(
            "the victim's pods gone",
            Duration::from_secs(120),
            || {
                let (client, ns) = (env.client.clone(), ns.name.clone());
                async move {
                    let left = pods(&client, &ns, "victim").await?.len();
                    Ok(((left == 0).then_some(()), format!("{left} pods left")))
                }
            },
        )
        .await?;
        ensure!(
            held.is_dir(),
            "the victim's unused model is not in the store"
        );

        let attack = example(
            "actor-safetensors.yaml",
            &ns.name,
            &env.safetensors,
            &server,
            |p| {
                p["metadata"]["name"] = json!("wipe");
                p["spec"]["actor"] = json!({"replicas": 1});
                if let Some(source) = p["spec"]["models"][0]["source"].as_object_mut() {
                    source.remove("sha256");
                    source.remove("size");
                }
            },
        )?;
        apply(&env.client, &attack).await?;
        let api: Api<InferencePipeline> = Api::namespaced(env.client.clone(), &ns.name);
        let condition = weights_ready_with(&api, "wipe", "ModelsNotMounted", 240).await?;
        ensure!(
            held.is_dir(),
            "the victim's model was removed for the attacker's claim ({})",
            condition.message
        );
        Ok(())
    }
    .await;
    env.record_attack("a store wipe by a crafted size header", outcome.is_ok());
    outcome
}

/// A server on the pods' gateway whose one file is a safetensors header claiming a tensor of
/// `claimed` bytes, with byte ranges and an ETag: the header is answered at once, the tensor's
/// bytes one every half second. Returns the file's URL.
fn crafted_size_server(claimed: u64) -> Result<String> {
    let header =
        format!(r#"{{"w":{{"dtype":"U8","shape":[{claimed}],"data_offsets":[0,{claimed}]}}}}"#);
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(header.as_bytes());
    let total = head.len() as u64 + claimed;
    let server = tiny_http::Server::http((GATEWAY, 0))
        .map_err(|e| anyhow::anyhow!("starting the crafted server: {e}"))?;
    let port = server.server_addr().to_ip().context("an address")?.port();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let head = head.clone();
            std::thread::spawn(move || {
                let range = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .and_then(|h| h.value.as_str().strip_prefix("bytes=").map(str::to_owned))
                    .and_then(|r| {
                        let (start, end) = r.split_once('-')?;
                        Some((start.parse::<u64>().ok()?, end.parse::<u64>().ok()?))
                    });
                let header = |name: &str, value: String| {
                    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
                };
                let (status, start, len) = match range {
                    Some((start, end)) => (206, start, end.min(total - 1) + 1 - start),
                    None => (200, 0, total),
                };
                let mut headers = vec![
                    header("ETag", "\"crafted\"".into()),
                    header("Accept-Ranges", "bytes".into()),
                ];
                if status == 206 {
                    headers.push(header(
                        "Content-Range",
                        format!("bytes {start}-{}/{total}", start + len - 1),
                    ));
                }
                let body = Trickle {
                    head,
                    offset: start,
                    left: len,
                };
                let response = tiny_http::Response::new(
                    status.into(),
                    headers,
                    body,
                    Some(len as usize),
                    None,
                );
                let _ = request.respond(response);
            });
        }
    });
    Ok(format!("http://{GATEWAY}:{port}/m.safetensors"))
}

/// The crafted file's bytes from `offset`: its header at once, then a zero every half second.
struct Trickle {
    head: Vec<u8>,
    offset: u64,
    left: u64,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.head.get(self.offset as usize..) {
            Some(rest) if !rest.is_empty() => {
                let n = rest.len().min(buf.len()).min(self.left as usize);
                buf[..n].copy_from_slice(&rest[..n]);
                n
            }
            _ => {
                std::thread::sleep(Duration::from_millis(500));
                buf[0] = 0;
                1
            }
        };
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Where a cluster's Kueue manages every Job of a namespace (`manageJobsWithoutQueueName`, its
/// Job webhook suspending each as it is created), a tenant's pipeline with no queue label is
/// Kueue's to admit: its pods must not start until Kueue admits its Workload. The operator
/// once resumed such a Job at its next look, running pods past Kueue's quota. Here Kueue holds
/// it: the Job stays suspended, no pod is made, the pipeline says it waits for another
/// controller, and the Workload Kueue made for it is not admitted.
pub async fn a_kueue_managed_job_without_a_queue_label(env: Arc<Env>) -> Result<()> {
    const MANAGED: (&str, &str) = ("kube-zerocopy.io/test-kueue", "manages-every-job");
    let control_plane = &env.cluster.control_plane;
    let kueue = Kueue::start_with(
        &control_plane.dir().join("kueue-every-job"),
        &control_plane.kubeconfig_path(),
        &env.client,
        Manage::AlsoUnlabelledIn {
            label: MANAGED.0.into(),
            value: MANAGED.1.into(),
        },
    )
    .await;
    let outcome = match &kueue {
        Ok(_) => held_by_kueue(&env, MANAGED).await,
        Err(e) => Err(anyhow::anyhow!("starting Kueue: {e:#}")),
    };
    env.record_attack("a Kueue-managed Job without a queue label", outcome.is_ok());
    // Its webhook goes with it, or Jobs of that namespace would be refused from now on.
    if let Ok(kueue) = kueue {
        kueue.stop().await?;
    }
    outcome
}

/// A Task pipeline without a queue label in a namespace labelled `managed`, which Kueue
/// manages: it waits for Kueue, and no pod of it is made.
async fn held_by_kueue(env: &Env, managed: (&str, &str)) -> Result<()> {
    let (ns, _data) =
        task_namespace(env, "kueue-every-job", &[managed], "embed-data", false).await?;
    let uri = format!("{}/{}", env.http_base, env.safetensors.file);
    let pipeline = example(
        "task-safetensors.yaml",
        &ns.name,
        &env.safetensors,
        &uri,
        |p| {
            p["metadata"]["name"] = json!("unqueued");
            p["spec"]["task"] = json!({"shards": SHARDS, "parallelism": 2});
        },
    )?;
    apply(&env.client, &pipeline).await?;
    let two_minutes = Duration::from_secs(120);
    let queued = wait_phase(&env.client, &ns.name, "unqueued", &["Queued"], two_minutes).await?;
    let said = queued
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .map(|c| c.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    ensure!(
        said.contains("another controller"),
        "the pipeline says: {said}"
    );
    let workloads: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &ns.name,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "kueue.x-k8s.io",
            "v1beta2",
            "Workload",
        )),
    );
    // Kueue makes the Workload of the Job it holds, once it has seen the Job.
    let workload = eventually_seen("Kueue's Workload of the Job", two_minutes, || {
        let workloads = workloads.clone();
        async move {
            let listed = workloads.list(&ListParams::default()).await?.items;
            let seen = format!("{} Workloads", listed.len());
            Ok((listed.into_iter().next(), seen))
        }
    })
    .await?;
    // Looked at again since: the operator has reconciled the suspended Job meanwhile.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns.name);
    let job = jobs.get("unqueued-zerocopy").await?;
    ensure!(
        job.spec.as_ref().and_then(|s| s.suspend) == Some(true),
        "the operator resumed the Job Kueue holds"
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns.name);
    let made = pods.list(&ListParams::default()).await?.items.len();
    ensure!(
        made == 0,
        "{made} pods were made before Kueue admitted the Job"
    );
    let workload = workloads.get(&workload.name_any()).await?;
    ensure!(
        workload.data["status"]["admission"].is_null(),
        "Kueue admitted the Workload: {}",
        workload.data["status"]
    );
    println!("  {}/unqueued: Queued, {said}", ns.name);
    Ok(())
}
