//! The driver of an Actor pipeline with an input: it streams the input's shard files through
//! the actor replicas and writes what they answer, as a Task pipeline would have.
//!
//! Each shard file is one batch, sent with the Open Inference Protocol's binary extension, its
//! answer written as the shard's output (the same name and bytes as a Task's) and committed
//! with the same record under `_kube-zerocopy/runs/<run>/`; the last commit writes the
//! manifest. At most `in_flight_per_replica` batches wait on one replica. A batch whose replica
//! fails (gone, 5xx, too slow) goes back to the front of the queue for another replica, and
//! the failed replica rests (doubling, up to 30 s) before it is sent more. A batch the models
//! refuse (4xx) is not retried: it is listed as failed. A restarted driver skips the shards its
//! run has committed already.
//!
//! One thread per batch in flight does the blocking work (read, send, write); the dispatcher
//! alone owns the queue and the replicas' state, so nothing is shared but a channel.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_zerocopy_runtime::process::Permanent;
use serde::Serialize;
use tracing::{info, warn};

use crate::client_token::ClientToken;
use crate::data::{Entry, Store};
use crate::protocol;
use crate::shards::{self, ShardRecord};

/// How the driver runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The model's name in the protocol's paths (the pipeline's name).
    pub model: String,
    pub in_flight_per_replica: usize,
    /// Sends of one batch before it is given up.
    pub max_attempts: u32,
    /// How long one replica may take to answer one request.
    pub request_timeout: Duration,
    /// The most tensor bytes in one request: a larger shard file is sent in row ranges (the
    /// replicas refuse bodies above their own limit, 64 MiB by default).
    pub max_request_bytes: usize,
    /// The run the outputs belong to (one generation of one pipeline).
    pub run: String,
    /// The listing digest the input was planned with, if planned.
    pub planned: Option<String>,
    /// The token the replicas want, sent with every request.
    pub client_token: Option<std::sync::Arc<ClientToken>>,
}

/// Where the replicas are: their base URLs, asked again while the driver runs.
pub trait Replicas {
    fn current(&self) -> Result<Vec<String>>;
}

/// A fixed list of replicas.
pub struct FixedReplicas(pub Vec<String>);

impl Replicas for FixedReplicas {
    fn current(&self) -> Result<Vec<String>> {
        Ok(self.0.clone())
    }
}

/// Where the driver says how the run stands, as it goes.
pub trait Progress {
    fn report(&self, summary: &Summary);
}

/// Says nothing (a run outside a cluster prints its summary at the end).
pub struct Quiet;

impl Progress for Quiet {
    fn report(&self, _: &Summary) {}
}

/// A batch that could not be done.
#[derive(Clone, Debug, Serialize)]
pub struct FailedBatch {
    pub shard: usize,
    pub input: String,
    pub reason: String,
}

/// What a run did, as the driver reports it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub batches: usize,
    /// Committed by an earlier start of this run.
    pub committed_before: usize,
    pub written: usize,
    pub bytes_written: u64,
    /// Sends that failed and were sent again.
    pub retried: usize,
    /// Batches written per replica.
    pub by_replica: BTreeMap<String, usize>,
    pub failed: Vec<FailedBatch>,
    pub wrote_manifest: bool,
}

struct Batch {
    index: usize,
    attempts: u32,
    /// The replica that failed it last.
    avoid: Option<String>,
}

enum Outcome {
    Written(ShardRecord),
    /// The replica failed; another may succeed.
    Retry(String),
    /// The batch itself was refused.
    Refused(String),
    /// The data cannot be read or written: the run stops.
    Fatal(anyhow::Error),
}

struct Replica {
    url: String,
    in_flight: usize,
    failures: u32,
    rest_until: Instant,
}

const REFRESH: Duration = Duration::from_secs(2);
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Runs every shard of `input` through the replicas into `output`.
pub fn drive(
    input: &Store,
    output: &Store,
    replicas: &dyn Replicas,
    progress: &dyn Progress,
    settings: &Settings,
) -> Result<Summary> {
    let listed = input.shards()?;
    ensure!(
        !listed.is_empty(),
        Permanent(format!(
            "the input {} holds no .safetensors shard files",
            input.uri()
        ))
    );
    if let Some(planned) = settings
        .planned
        .as_deref()
        .filter(|&p| p != shards::listing_digest(&listed))
    {
        return Err(Permanent(format!(
            "the input {} changed since its batches were planned (listing sha256 {planned}): \
             change or re-create the pipeline to plan the input as it is now",
            input.uri()
        ))
        .into());
    }
    let committed = shards::committed_shards(output, &settings.run, &listed)?;
    let mut summary = Summary {
        batches: listed.len(),
        committed_before: committed.len(),
        ..Summary::default()
    };
    let mut queue: VecDeque<Batch> = (0..listed.len())
        .filter(|i| !committed.contains(i))
        .map(|index| Batch {
            index,
            attempts: 0,
            avoid: None,
        })
        .collect();
    info!(
        batches = listed.len(),
        committed_before = committed.len(),
        input = %input.uri(),
        output = %output.uri(),
        "driving"
    );
    progress.report(&summary);
    let mut reported = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(settings.request_timeout))
        .build()
        .into();
    let mut pool: Vec<Replica> = Vec::new();
    let mut refreshed: Option<Instant> = None;
    let mut fatal: Option<anyhow::Error> = None;
    let (done, outcomes) = mpsc::channel::<(Batch, String, Outcome)>();
    std::thread::scope(|scope| -> Result<()> {
        let mut in_flight = 0;
        loop {
            if (queue.is_empty() || fatal.is_some()) && in_flight == 0 {
                return Ok(());
            }
            if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
                refresh(&mut pool, replicas);
                refreshed = Some(Instant::now());
            }
            while fatal.is_none() {
                let Some(batch) = queue.front() else { break };
                let Some(r) = pick(&pool, batch, settings.in_flight_per_replica) else {
                    break;
                };
                let batch = queue.pop_front().expect("a batch at the front");
                pool[r].in_flight += 1;
                in_flight += 1;
                let (url, entry, done) = (pool[r].url.clone(), &listed[batch.index], done.clone());
                let (agent, index) = (&agent, batch.index);
                scope.spawn(move || {
                    let outcome = send(input, output, entry, index, &url, agent, settings);
                    let _ = done.send((batch, url, outcome));
                });
            }
            let Ok((mut batch, url, outcome)) = outcomes.recv_timeout(Duration::from_millis(200))
            else {
                continue;
            };
            if reported.elapsed() >= REPORT_EVERY {
                progress.report(&summary);
                reported = Instant::now();
            }
            in_flight -= 1;
            let replica = pool.iter_mut().find(|r| r.url == url);
            let input_name = listed[batch.index].name.clone();
            match outcome {
                Outcome::Written(record) => {
                    summary.bytes_written += record.bytes;
                    if let Some(r) = replica {
                        r.in_flight -= 1;
                        r.failures = 0;
                    }
                    summary.written += 1;
                    *summary.by_replica.entry(url).or_default() += 1;
                    let finished = summary.committed_before + summary.written;
                    if finished.is_multiple_of(progress_step(listed.len()))
                        || finished == listed.len()
                    {
                        info!(finished, batches = listed.len(), "progress");
                    }
                }
                Outcome::Retry(why) => {
                    if let Some(r) = replica {
                        r.in_flight -= 1;
                        r.failures += 1;
                        let rest = Duration::from_millis(250 << r.failures.min(7));
                        r.rest_until = Instant::now() + rest.min(Duration::from_secs(30));
                    }
                    batch.attempts += 1;
                    warn!(batch = %input_name, replica = %url, attempt = batch.attempts, %why, "a replica failed a batch");
                    if batch.attempts >= settings.max_attempts {
                        summary.failed.push(FailedBatch {
                            shard: batch.index,
                            input: input_name,
                            reason: format!("{} sends failed, the last: {why}", batch.attempts),
                        });
                    } else {
                        summary.retried += 1;
                        batch.avoid = Some(url);
                        queue.push_front(batch);
                        // A replica that fails may be on its way out: ask where they are now.
                        refreshed = None;
                    }
                }
                Outcome::Refused(reason) => {
                    if let Some(r) = replica {
                        r.in_flight -= 1;
                    }
                    warn!(batch = %input_name, %reason, "a batch was refused");
                    summary.failed.push(FailedBatch {
                        shard: batch.index,
                        input: input_name,
                        reason,
                    });
                }
                Outcome::Fatal(e) => {
                    if let Some(r) = replica {
                        r.in_flight -= 1;
                    }
                    fatal.get_or_insert(e);
                }
            }
        }
    })?;
    summary.failed.sort_by_key(|f| f.shard);
    progress.report(&summary);
    if let Some(e) = fatal {
        return Err(e);
    }
    if summary.failed.is_empty() {
        summary.wrote_manifest =
            shards::commit_if_complete(&input.uri(), output, &settings.run, listed.len())?;
    }
    Ok(summary)
}

/// Keeps the pool's state for replicas still there, adds new ones; a replica gone keeps its
/// place only while batches still wait on it.
fn refresh(pool: &mut Vec<Replica>, replicas: &dyn Replicas) {
    let current = match replicas.current() {
        Ok(current) => current,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot find the replicas; keeping the last ones");
            return;
        }
    };
    pool.retain(|r| r.in_flight > 0 || current.contains(&r.url));
    for url in current {
        if !pool.iter().any(|r| r.url == url) {
            info!(replica = %url, "a replica to send to");
            pool.push(Replica {
                url,
                in_flight: 0,
                failures: 0,
                rest_until: Instant::now(),
            });
        }
    }
}

/// The replica for `batch`: one with room and not resting, the least busy, not the one that
/// failed it last unless no other has room.
fn pick(pool: &[Replica], batch: &Batch, per_replica: usize) -> Option<usize> {
    let now = Instant::now();
    let open = || {
        pool.iter()
            .enumerate()
            .filter(|(_, r)| r.in_flight < per_replica && r.rest_until <= now)
    };
    let least_busy = |candidates: Vec<(usize, &Replica)>| {
        candidates
            .into_iter()
            .min_by_key(|(_, r)| r.in_flight)
            .map(|(i, _)| i)
    };
    let others: Vec<_> = open()
        .filter(|(_, r)| Some(&r.url) != batch.avoid.as_ref())
        .collect();
    least_busy(others).or_else(|| least_busy(open().collect()))
}

fn progress_step(batches: usize) -> usize {
    (batches / 10).max(1)
}

/// One batch to one replica, and its output committed.
fn send(
    input: &Store,
    output: &Store,
    entry: &Entry,
    index: usize,
    url: &str,
    agent: &ureq::Agent,
    settings: &Settings,
) -> Outcome {
    let file = match input.read(entry) {
        Ok(file) => file,
        Err(e) => return Outcome::Fatal(e),
    };
    let requests = match protocol::requests_from_file(&file, settings.max_request_bytes) {
        Ok(requests) => requests,
        Err(e) => return Outcome::Refused(format!("{}: {e:#}", entry.name)),
    };
    drop(file);
    // The row ranges of one shard go to the same replica, one after the other; a failed one
    // sends the whole shard again.
    let mut answers = Vec::with_capacity(requests.len());
    for (body, json_length) in &requests {
        match post(agent, url, settings, body, *json_length) {
            Ok(answer) => answers.push(answer),
            Err(outcome) => return outcome,
        }
    }
    let parts: Vec<(&[u8], Option<usize>)> = answers.iter().map(|(a, l)| (&a[..], *l)).collect();
    let written = match protocol::file_from_answers(&parts) {
        Ok(written) => written,
        Err(e) => return Outcome::Retry(format!("the answer: {e:#}")),
    };
    match shards::commit_output(output, &settings.run, index, entry, &written) {
        Ok(record) => Outcome::Written(record),
        Err(e) => Outcome::Fatal(e),
    }
}

/// One request to one replica: the answer's body and JSON length, or what to do instead.
fn post(
    agent: &ureq::Agent,
    url: &str,
    settings: &Settings,
    body: &[u8],
    json_length: usize,
) -> Result<(Vec<u8>, Option<usize>), Outcome> {
    let mut request = agent
        .post(format!("{url}/v2/models/{}/infer", settings.model))
        .header(protocol::HEADER_LENGTH, json_length.to_string())
        .header("content-type", "application/octet-stream");
    if let Some(token) = &settings.client_token {
        request = request.header("authorization", token.header());
    }
    let sent = request.send(body);
    let mut response = sent.map_err(|e| Outcome::Retry(e.to_string()))?;
    let status = response.status().as_u16();
    let json_length = response
        .headers()
        .get(protocol::HEADER_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let answer = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .map_err(|e| Outcome::Retry(format!("reading the answer: {e}")))?;
    if status != 200 {
        let said = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).chars().take(300).collect());
        let why = format!("HTTP {status}: {said}");
        // The replica's trouble (busy, slow, broken) or the batch's (refused by the models).
        return Err(match status {
            // Every batch would be refused alike: the run stops with the replicas' words.
            401 | 403 => Outcome::Fatal(
                Permanent(format!(
                    "the replicas refused the driver's token ({why}): check actor.tokenSecret"
                ))
                .into(),
            ),
            408 | 429 | 500..=599 => Outcome::Retry(why),
            _ => Outcome::Refused(why),
        });
    }
    Ok((answer, json_length))
}

/// The driver inside its cluster: it finds the replicas behind their Service in its
/// EndpointSlices as the API server has them (a replica that is not ready, loading, draining
/// or gone, is not among them), listed at each refresh, and reports into its pipeline's
/// `status.batches`, a field it alone writes. Its service account may do only these two.
pub struct InCluster {
    runtime: tokio::runtime::Runtime,
    slices: kube::Api<EndpointSlice>,
    pipelines: kube::Api<kube::api::DynamicObject>,
    service: String,
    pipeline: Option<String>,
}

/// The field manager of `status.batches`.
use kube_zerocopy_contract::names::DRIVER_MANAGER as MANAGER;

impl InCluster {
    pub fn new(service: &str, pipeline: Option<&str>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime
            .block_on(kube::Client::try_default())
            .context("reaching the Kubernetes API to find the replicas")?;
        let kind =
            kube::api::GroupVersionKind::gvk("kube-zerocopy.io", "v1alpha1", "InferencePipeline");
        let resource = kube::api::ApiResource::from_gvk_with_plural(&kind, "inferencepipelines");
        Ok(InCluster {
            runtime,
            slices: kube::Api::default_namespaced(client.clone()),
            pipelines: kube::Api::default_namespaced_with(client, &resource),
            service: service.to_owned(),
            pipeline: pipeline.map(str::to_owned),
        })
    }
}

impl Replicas for InCluster {
    fn current(&self) -> Result<Vec<String>> {
        let selector = format!("kubernetes.io/service-name={}", self.service);
        let slices = self
            .runtime
            .block_on(
                self.slices
                    .list(&kube::api::ListParams::default().labels(&selector)),
            )
            .with_context(|| format!("listing the endpoints of Service {}", self.service))?;
        Ok(ready_urls(&slices.items))
    }
}

impl Progress for InCluster {
    fn report(&self, summary: &Summary) {
        let Some(pipeline) = &self.pipeline else {
            return;
        };
        let failed: Vec<_> = summary
            .failed
            .iter()
            .map(|f| serde_json::json!({"input": f.input, "reason": f.reason}))
            .collect();
        let patch = serde_json::json!({
            "apiVersion": "kube-zerocopy.io/v1alpha1",
            "kind": "InferencePipeline",
            "status": {"batches": {
                "total": summary.batches,
                "done": summary.committed_before + summary.written,
                "retried": summary.retried,
                "failed": failed,
            }},
        });
        let params = kube::api::PatchParams::apply(MANAGER).force();
        let patched = self.runtime.block_on(self.pipelines.patch_status(
            pipeline,
            &params,
            &kube::api::Patch::Apply(&patch),
        ));
        if let Err(e) = patched {
            warn!(error = %e, "cannot report the progress into the pipeline's status");
        }
    }
}

/// The base URL of every ready endpoint, on the slice's port named `http` (the workers').
pub fn ready_urls(slices: &[EndpointSlice]) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("http"))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            // An unset condition means ready, by the API's definition.
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            if let Some(address) = endpoint.addresses.first() {
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.clone()
                };
                urls.push(format!("http://{host}:{port}"));
            }
        }
    }
    urls.sort();
    urls.dedup();
    urls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_endpoints_that_are_not_terminating_are_sent_batches() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p-zerocopy-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.5"]},
            ],
        }))
        .unwrap();
        let v6: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p-zerocopy-def"},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": true}}],
        }))
        .unwrap();
        let no_port: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p-zerocopy-ghi"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.9"]}],
        }))
        .unwrap();
        assert_eq!(
            ready_urls(&[slice, v6, no_port]),
            [
                "http://10.0.0.2:8080",
                "http://10.0.0.5:8080",
                "http://[fd00::1]:8080"
            ]
        );
    }

    #[test]
    fn a_failed_batch_goes_to_another_replica_with_room() {
        let replica = |url: &str, in_flight| Replica {
            url: url.into(),
            in_flight,
            failures: 0,
            rest_until: Instant::now(),
        };
        let pool = [replica("a", 0), replica("b", 1), replica("c", 2)];
        let batch = |avoid: Option<&str>| Batch {
            index: 0,
            attempts: 1,
            avoid: avoid.map(str::to_owned),
        };
        assert_eq!(pick(&pool, &batch(None), 2), Some(0), "the least busy");
        assert_eq!(
            pick(&pool, &batch(Some("a")), 2),
            Some(1),
            "not the one that failed it"
        );
        // The one that failed it, when no other has room.
        assert_eq!(pick(&pool[..1], &batch(Some("a")), 2), Some(0));
        let mut resting = replica("a", 0);
        resting.rest_until = Instant::now() + Duration::from_secs(60);
        assert_eq!(pick(&[resting, replica("c", 2)], &batch(None), 2), None);
    }
}
