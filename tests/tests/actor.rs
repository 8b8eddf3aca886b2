//! Actor mode: a worker maps the models once and serves batches with the Open Inference
//! Protocol; each answer equals the models run the ordinary way, and a bad request gets a 4xx
//! in the protocol's shape. Requests that do not fit, bodies too large or too slow are refused
//! with their status, and the replica goes on serving, its health and metrics answered
//! meanwhile. NVIDIA's Triton client, unchanged, talks to it; a replica told to stop drains.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{
    make_model, metric_value, read_answer, read_output, repo, source, start_actor, succeeded,
    Actor, Pod, RenameCounter,
};
use kube_zerocopy_fetch::ModelFormat;
use kube_zerocopy_worker::oip;
use kube_zerocopy_worker::task::read_input;
use kube_zerocopy_worker::LoadedModel;

/// The model's name in the protocol's paths.
const MODEL: &str = "net";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A replica of the built-in Mlp (64 values in, 4 out), published in a pod of its own.
struct MlpReplica {
    actor: Actor,
    base: String,
    model: std::path::PathBuf,
    models: [kube_zerocopy_fetch::ModelSource; 1],
    _pod: Pod,
    dir: tempfile::TempDir,
}

fn mlp_replica(args: &[&str]) -> MlpReplica {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mlp.safetensors");
    make_model(&["mlp", model.to_str().unwrap(), "--sizes", "64,32,4"]);
    let models = [source("mlp", ModelFormat::Safetensors, &model)];
    let pod = Pod::new();
    assert!(pod.publish(&models).status.success());
    let (actor, base) = start_actor(&pod, &models, &[args, &["--model-name", MODEL]].concat());
    MlpReplica {
        actor,
        base,
        model,
        models,
        _pod: pod,
        dir,
    }
}

/// POSTs `body` to the model's infer path as it is (no protocol header).
fn post(base: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let response = agent()
        .post(format!("{base}/v2/models/{MODEL}/infer"))
        .send(body)
        .unwrap();
    let (status, _, body) = read_answer(response);
    (status, body)
}

/// Infers `input` with the binary tensor extension; the status, and the output or the error.
fn infer(base: &str, input: &tch::Tensor) -> (u16, Result<tch::Tensor, String>) {
    let (body, json_length) = oip::encode_request(input).unwrap();
    let response = agent()
        .post(format!("{base}/v2/models/{MODEL}/infer"))
        .header(oip::HEADER_LENGTH, json_length.to_string())
        .send(&body[..])
        .unwrap();
    let (status, json_length, body) = read_answer(response);
    let answer = match status {
        200 => Ok(oip::decode_answer(&body, json_length).unwrap()),
        _ => Err(error_message(&body)),
    };
    (status, answer)
}

/// The protocol's error answer: `{"error": "..."}`.
fn error_message(body: &[u8]) -> String {
    let error: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    error["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {error}"))
        .to_owned()
}

/// The actor's metrics, as text.
fn metrics(base: &str) -> String {
    ureq::get(format!("{base}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// A replica of the built-in Mlp: a batch of the wrong width used to panic inside tch and kill
/// it; a slow client used to hold the only request thread, health and metrics included.
#[test]
fn actor_refuses_what_does_not_fit_and_goes_on_serving() {
    let limits = ["--max-body-bytes", "1048576", "--body-timeout", "15"];
    let mut replica = mlp_replica(&limits);
    let (actor, base) = (&mut replica.actor, replica.base.clone());
    let good = tch::Tensor::ones([4, 64], (tch::Kind::Float, tch::Device::Cpu));

    // The wrong width: 422 with the reason in the client's terms, and the replica lives on.
    let narrow = tch::Tensor::ones([4, 3], (tch::Kind::Float, tch::Device::Cpu));
    let (status, answer) = infer(&base, &narrow);
    let reason = answer.unwrap_err();
    assert_eq!(status, 422, "{reason}");
    assert!(
        reason.contains("takes rows of 64 values") && reason.contains("[4, 3]"),
        "{reason}"
    );
    assert_eq!(infer(&base, &good).0, 200);
    assert!(
        actor.try_wait().unwrap().is_none(),
        "the wrong width killed the actor"
    );

    // Too large: 413 from its declared length alone, before any of its body is sent. (A
    // client sending the body meanwhile may find the connection closed under it.)
    let address = base.trim_start_matches("http://");
    let mut large = TcpStream::connect(address).unwrap();
    write!(
        large,
        "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n",
        3 << 19
    )
    .unwrap();
    large
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(large)
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A client that sends half its body and stops: health, metrics and other batches are
    // answered meanwhile, and the slow request gets 408 once its time is up.
    let mut slow = TcpStream::connect(address).unwrap();
    write!(
        slow,
        "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap();
    slow.write_all(&[0u8; 1000]).unwrap();
    for path in ["/v2/health/ready", "/v2/health/live", "/metrics"] {
        ureq::get(format!("{base}{path}")).call().unwrap();
    }
    assert_eq!(infer(&base, &good).0, 200);
    slow.set_nonblocking(true).unwrap();
    let mut first = [0u8; 1];
    let pending =
        matches!(slow.read(&mut first), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(pending, "the slow request was answered before the others");
    slow.set_nonblocking(false).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"the request body did not arrive"#),
        "{answer}"
    );

    let text = metrics(&base);
    let value = |name: &str| metric_value(&text, name);
    assert_eq!(
        value("kube_zerocopy_worker_batches_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("kube_zerocopy_worker_batch_errors_total"),
        Some(3.0),
        "{text}"
    );
    actor.kill().unwrap();
    actor.wait().unwrap();
}

/// Clients that open requests with large declared bodies and hold them back: a replica admits
/// twice its queue of requests (their bodies read and decoded meanwhile) and answers the next
/// one 503 before reading its body, so held-back bodies cannot pile up in its memory; health is
/// answered meanwhile, and once the clients go, requests are served again.
#[test]
fn clients_that_hold_their_bodies_back_cannot_fill_the_replicas_memory() {
    // The held bodies must outlast a loaded machine's pauses.
    let mut replica = mlp_replica(&["--queued-batches", "1", "--body-timeout", "300"]);
    let (actor, base) = (&mut replica.actor, replica.base.clone());
    let good = tch::Tensor::ones([4, 64], (tch::Kind::Float, tch::Device::Cpu));
    let address = base.trim_start_matches("http://");
    let holding: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut held = TcpStream::connect(address).unwrap();
            write!(
                held,
                "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n",
                60 << 20
            )
            .unwrap();
            held.write_all(&[b' '; 1000]).unwrap();
            held
        })
        .collect();
    // Admitted once their headers are read: wait until the replica counts both.
    let started = std::time::Instant::now();
    while metric_value(&metrics(&base), "kube_zerocopy_worker_requests_in_flight") != Some(2.0) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the held requests were never admitted: {}",
            metrics(&base)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, answer) = infer(&base, &good);
    assert_eq!(status, 503, "{answer:?}");
    let refused = answer.unwrap_err();
    assert!(refused.contains("waiting already"), "{refused}");
    assert_eq!(
        ureq::get(format!("{base}/v2/health/live"))
            .call()
            .unwrap()
            .status(),
        200
    );
    drop(holding);
    let started = std::time::Instant::now();
    while infer(&base, &good).0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the clients' requests were never let go"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(actor.try_wait().unwrap().is_none());
    actor.kill().unwrap();
    actor.wait().unwrap();
}

/// With dynamic batching on, a pass waits for more requests while others are on their way. A
/// request of shape [] arriving then used to end the inference thread (its rows were looked
/// for past the end of its shape) and with it the replica.
#[test]
fn a_client_that_sends_a_scalar_while_a_pass_waits_cannot_kill_the_replica() {
    let batching = ["--max-batch-rows", "256", "--max-batch-delay-ms", "3000"];
    let mut replica = mlp_replica(&batching);
    let (actor, base) = (&mut replica.actor, replica.base.clone());
    let good = tch::Tensor::ones([4, 64], (tch::Kind::Float, tch::Device::Cpu));

    // The scalar's request is in flight (half its body sent) when the good one arrives, so
    // that the good one's pass waits for it.
    let scalar = br#"{"inputs":[{"name":"input","shape":[],"datatype":"FP32","data":[1.0]}]}"#;
    let address = base.trim_start_matches("http://");
    let mut attacker = TcpStream::connect(address).unwrap();
    write!(
        attacker,
        "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        scalar.len()
    )
    .unwrap();
    attacker.write_all(&scalar[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let waiting = {
        let (base, good) = (base.clone(), good.shallow_clone());
        std::thread::spawn(move || infer(&base, &good).0)
    };
    std::thread::sleep(Duration::from_millis(500));
    attacker.write_all(&scalar[10..]).unwrap();
    attacker
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = attacker.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("has shape []"), "{answer}");

    assert_eq!(waiting.join().unwrap(), 200, "the waiting pass is answered");
    assert!(
        actor.try_wait().unwrap().is_none(),
        "the scalar killed the replica"
    );
    let (status, output) = infer(&base, &good);
    assert_eq!(status, 200, "{output:?}");
    let live = agent()
        .get(format!("{base}/v2/health/live"))
        .call()
        .unwrap();
    assert_eq!(live.status().as_u16(), 200);
    actor.kill().unwrap();
    actor.wait().unwrap();
}

#[test]
fn actor_serves_many_batches_from_one_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("net.pt");
    make_model(&["script", model.to_str().unwrap(), "--sizes", "64,128,8"]);
    make_model(&[
        "inputs",
        d.join("in").to_str().unwrap(),
        "--shards",
        "3",
        "--batch",
        "5",
        "--features",
        "64",
    ]);
    let models = [source("net", ModelFormat::TorchScript, &model)];
    let pod = Pod::new();
    assert!(pod.publish(&models).status.success());
    let (mut actor, base) = start_actor(&pod, &models, &["--model-name", MODEL]);

    let reference = LoadedModel::load_copying(&model, &models[0], tch::Device::Cpu).unwrap();
    for shard in kube_zerocopy_batch::shards::list_shards(&d.join("in")).unwrap() {
        let input = read_input(&shard).unwrap();
        let (status, answer) = infer(&base, &input);
        assert_eq!(status, 200, "{answer:?}");
        let expected = reference.forward(&input).unwrap();
        assert!(
            answer.unwrap().equal(&expected),
            "batch {} differs",
            shard.display()
        );
    }
    let (status, body) = post(&base, b"not a tensor");
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("not an inference request"));

    // Its metrics count the batches and show its memory, the shared weights apart.
    let text = metrics(&base);
    let metric = |name: &str| -> f64 {
        metric_value(&text, &format!("kube_zerocopy_worker_{name}"))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(metric("batches_total"), 3.0);
    assert_eq!(metric("executions_total"), 3.0);
    assert_eq!(metric("batch_errors_total"), 1.0);
    assert_eq!(metric("rows_total"), 15.0);
    assert_eq!(metric("batch_duration_seconds_count"), 3.0);
    let (_, manifest) = pod.bindings().resolve(&pod.store(), "net").unwrap();
    let weights = manifest.tensors_bytes as f64;
    assert_eq!(metric("weights_bytes"), weights);
    let mapped = metric("weights_mapped_pss_bytes");
    assert!(
        mapped > 0.0 && mapped <= weights + 4096.0,
        "mapped PSS {mapped} for {weights} bytes of weights"
    );
    assert!(metric("process_pss_bytes") > mapped);
    println!(
        "actor metrics: weights {weights} B, mapped PSS {mapped} B, process PSS {} B, USS {} B",
        metric("process_pss_bytes"),
        metric("process_uss_bytes")
    );
    // Kubernetes stops a replica with SIGTERM: a clean exit, not a failure.
    assert_eq!(kube_zerocopy_e2e::terminate(&mut actor).code(), Some(0));
}

/// The Triton client (tritonclient[http], pinned in scripts/oip-client.sh), as a user of the
/// protocol would call it: health and metadata, every input with the binary extension and as
/// JSON, all of them at once while one more request is on its way (so that the replica's
/// passes wait for the others and merge them), and eight kinds of bad request.
#[test]
fn an_existing_protocol_client_works_unchanged() {
    let batching = ["--max-batch-rows", "256", "--max-batch-delay-ms", "300"];
    let mut replica = mlp_replica(&batching);
    let (actor, base) = (&mut replica.actor, replica.base.clone());
    let (d, model, models) = (replica.dir.path(), &replica.model, &replica.models);

    let inputs: Vec<tch::Tensor> = (0..8)
        .map(|i| tch::Tensor::randn([3 + i, 64], (tch::Kind::Float, tch::Device::Cpu)))
        .collect();
    for (i, input) in inputs.iter().enumerate() {
        input.write_npy(d.join(format!("input-{i}.npy"))).unwrap();
    }
    let client = Command::new(repo().join("scripts/oip-client.sh"))
        .output()
        .unwrap();
    succeeded(&client);
    let venv = String::from_utf8(client.stdout).unwrap();
    let run = Command::new(Path::new(venv.trim()).join("bin/python"))
        .arg(repo().join("scripts/oip-client.py"))
        .args([
            base.trim_start_matches("http://"),
            MODEL,
            d.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    succeeded(&run);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
    println!("{report:#}");

    for flag in ["live", "ready", "model_ready", "serves_after_errors"] {
        assert_eq!(report[flag], true, "{flag}");
    }
    assert_eq!(report["held_request"], "HTTP/1.1 200 OK");
    assert_eq!(report["server"]["extensions"][0], "binary_tensor_data");
    let spec = |name: &str, width: i64| serde_json::json!([{"name": name, "datatype": "FP32", "shape": [-1, width]}]);
    assert_eq!(report["model"]["name"], MODEL);
    assert_eq!(report["model"]["inputs"], spec("input", 64));
    assert_eq!(report["model"]["outputs"], spec("output", 4));

    let expected = |message: &str, status: &str, words: &[&str]| {
        let error = &report["errors"][message];
        assert_eq!(error["status"], status, "{message}: {error}");
        let text = error["message"].as_str().unwrap();
        for word in words {
            assert!(text.contains(word), "{message}: {text:?} lacks {word:?}");
        }
    };
    expected(
        "unknown_model",
        "404",
        &["\"no-such-model\" is not served", "serves \"net\""],
    );
    expected("unknown_version", "404", &["version 1 only"]);
    expected("unknown_input", "400", &["no input \"x\""]);
    expected("unknown_output", "400", &["no output \"y\""]);
    expected("strings", "400", &["BYTES is not supported"]);
    expected(
        "wrong_width",
        "422",
        &["takes rows of 64 values", "[2, 65]"],
    );
    expected("bytes_short_of_shape", "400", &["takes"]);
    expected("json_short_of_shape", "400", &["takes"]);

    // One at a time, each request runs alone: equal to the model run the ordinary way, bit for
    // bit, with either encoding. All at once, they share forward passes: equal within float
    // rounding (a batch of other rows may take another kernel).
    let reference = LoadedModel::load_copying(model, &models[0], tch::Device::Cpu).unwrap();
    for (i, input) in inputs.iter().enumerate() {
        let want = reference.forward(input).unwrap();
        for encoding in ["binary", "json"] {
            let got = tch::Tensor::read_npy(d.join(format!("{encoding}-{i}.npy"))).unwrap();
            assert!(got.equal(&want), "{encoding} answer {i} differs");
        }
        let got = tch::Tensor::read_npy(d.join(format!("concurrent-{i}.npy"))).unwrap();
        assert!(
            got.allclose(&want, 1e-5, 1e-6, false),
            "concurrent answer {i} differs"
        );
    }
    let text = metrics(&base);
    let metric = |name: &str| metric_value(&text, &format!("kube_zerocopy_worker_{name}")).unwrap();
    let (requests, passes) = (metric("batches_total"), metric("executions_total"));
    println!("{requests} requests answered in {passes} forward passes");
    assert!(
        passes < requests,
        "dynamic batching merged no request: {requests} requests, {passes} passes"
    );
    assert_eq!(kube_zerocopy_e2e::terminate(actor).code(), Some(0));
}

/// SIGTERM with a request half sent: the replica says not-ready at once (so that its endpoint
/// is taken out), still answers that request, then exits 0.
#[test]
fn a_stopped_replica_drains_what_it_was_sent() {
    let mut replica = mlp_replica(&[]);
    let (actor, base) = (&mut replica.actor, replica.base.clone());
    let input = tch::Tensor::ones([2, 64], (tch::Kind::Float, tch::Device::Cpu));
    let (body, json_length) = oip::encode_request(&input).unwrap();

    let address = base.trim_start_matches("http://");
    let mut request = TcpStream::connect(address).unwrap();
    write!(
        request,
        "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {address}\r\n{}: {json_length}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        oip::HEADER_LENGTH,
        body.len()
    )
    .unwrap();
    let (head, rest) = body.split_at(body.len() / 2);
    request.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // SAFETY: a signal to a child this test started and has not reaped.
    unsafe { libc::kill(actor.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        let (status, _, body) = read_answer(
            agent()
                .get(format!("{base}/v2/health/ready"))
                .call()
                .unwrap(),
        );
        if status == 400 {
            assert_eq!(body, br#"{"ready":false}"#);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        agent()
            .get(format!("{base}/v2/health/live"))
            .call()
            .unwrap()
            .status(),
        200
    );
    assert!(
        actor.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );

    request.write_all(rest).unwrap();
    let mut answer = Vec::new();
    request.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let status = actor.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a drained replica exits 0");
}

/// The driver streams 52 shard files through three replicas and one of them is killed midway:
/// every output is put in place exactly once, each equal byte for byte to what a Task pipeline
/// writes for the same input, and the manifest lists them all. Started again, the driver finds
/// the run committed and sends nothing.
#[test]
fn the_driver_writes_every_output_once_though_a_replica_dies() {
    const SHARDS: usize = 52;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Large enough that a batch takes milliseconds: the replica dies with batches in flight.
    let model = mlp_and_shards(d, SHARDS);

    let models = [source("mlp", ModelFormat::Safetensors, &model)];
    let pod = Pod::new();
    assert!(pod.publish(&models).status.success());
    let mut replicas: Vec<(Actor, String)> = (0..3)
        .map(|_| start_actor(&pod, &models, &["--model-name", MODEL]))
        .collect();
    let urls: Vec<String> = replicas.iter().map(|(_, url)| url.clone()).collect();
    let out = d.join("out");
    let renames = RenameCounter::watch(&out);
    let drive = |out: &Path| {
        Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
            .args(["drive", "--model-name", MODEL, "--run", "r1"])
            .arg("--input")
            .arg(d.join("in"))
            .arg("--output")
            .arg(out)
            .args(["--replicas", &urls.join(",")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let driver = drive(&out);

    // Killed once a fifth of the outputs are in place: its batches in flight are lost with it.
    let started = Instant::now();
    while kube_zerocopy_batch::shards::list_shards(&out)
        .unwrap()
        .len()
        < SHARDS / 5
    {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (killed, killed_url) = &mut replicas[0];
    killed.kill().unwrap();
    killed.wait().unwrap();
    let finished = driver.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&finished.stdout);
    assert!(
        finished.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{summary:#}");
    assert_eq!(summary["batches"], SHARDS);
    assert_eq!(summary["written"], SHARDS);
    assert_eq!(summary["failed"], serde_json::json!([]));
    assert!(
        summary["retried"].as_u64().unwrap() >= 1,
        "no batch was lost"
    );
    let by_killed = summary["byReplica"][killed_url.as_str()]
        .as_u64()
        .unwrap_or(0);
    // It served before it was killed (a replica that never served would prove nothing), and
    // the others did the rest.
    assert!(
        (1..SHARDS).contains(&(by_killed as usize)),
        "the killed replica wrote {by_killed} of {SHARDS} batches"
    );

    // Each output put in place once, and equal to the Task's, byte for byte.
    let counts = renames.counts();
    let inputs = kube_zerocopy_batch::shards::list_shards(&d.join("in")).unwrap();
    for input in &inputs {
        let name = input.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            counts.get(name),
            Some(&1),
            "{name} was put in place {:?} times",
            counts.get(name)
        );
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(d.join("task-out").join(name)).unwrap(),
            "{name} differs from the Task's"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), SHARDS);
    assert_eq!(counts.get("manifest.json"), Some(&1));
    assert_eq!(counts.len(), SHARDS + 1, "{counts:?}");

    // Started again for the same run: everything is committed, nothing is sent or written.
    let again = drive(&out).wait_with_output().unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&again.stdout).trim()).unwrap();
    assert_eq!(summary["committedBefore"], SHARDS);
    assert_eq!(summary["written"], 0);
    for (replica, _) in &mut replicas[1..] {
        assert_eq!(kube_zerocopy_e2e::terminate(replica).code(), Some(0));
    }
}

/// A shard the models refuse (the wrong width) is not sent again: the driver writes the
/// others, lists that one with the replica's words, writes no manifest and exits 3 (the Job
/// fails at once: retrying cannot help).
#[test]
fn the_driver_lists_a_refused_batch_and_fails_without_retrying_it() {
    let mut replica = mlp_replica(&[]);
    let d = replica.dir.path().to_owned();
    make_model(&[
        "inputs",
        d.join("in").to_str().unwrap(),
        "--shards",
        "3",
        "--batch",
        "4",
        "--features",
        "64",
    ]);
    let narrow = tch::Tensor::ones([2, 5], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("input", &narrow)], d.join("in/narrow.safetensors")).unwrap();
    let out = Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
        .args(["drive", "--model-name", MODEL, "--replicas", &replica.base])
        .arg("--input")
        .arg(d.join("in"))
        .arg("--output")
        .arg(d.join("out"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["written"], 3);
    assert_eq!(summary["retried"], 0);
    let failed = &summary["failed"][0];
    assert_eq!(failed["input"], "narrow.safetensors");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("HTTP 422") && reason.contains("takes rows of 64 values"),
        "{reason}"
    );
    assert!(!d.join("out/manifest.json").exists());
    assert_eq!(
        kube_zerocopy_e2e::terminate(&mut replica.actor).code(),
        Some(0)
    );
}

/// A replica given a client token answers the model's paths only to clients that send it:
/// none or a wrong one gets 401 (health and metrics stay open to probes); a rotated token
/// applies without a restart; the driver sends the token it is given, and one the replicas
/// refuse stops its run at once (exit 3) with words that name the setting, writing nothing.
#[test]
fn clients_without_the_replicas_token_are_refused() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let token_arg = token_file.to_str().unwrap();
    let mut replica = mlp_replica(&["--client-token-file", token_arg]);
    let base = replica.base.clone();
    let good = tch::Tensor::ones([4, 64], (tch::Kind::Float, tch::Device::Cpu));
    let (body, json_length) = oip::encode_request(&good).unwrap();
    let call = |authorization: Option<&str>| {
        let mut request = agent()
            .post(format!("{base}/v2/models/{MODEL}/infer"))
            .header(oip::HEADER_LENGTH, json_length.to_string());
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send(&body[..]).unwrap();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let (status, _, body) = read_answer(response);
        let said = if status == 200 {
            String::new()
        } else {
            error_message(&body)
        };
        (status, challenge, said)
    };
    let (status, challenge, said) = call(None);
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer")),
        "{said}"
    );
    assert!(said.contains("needs a bearer token"), "{said}");
    let (status, _, said) = call(Some("Bearer first-token-guess"));
    assert_eq!(status, 401, "{said}");
    assert!(said.contains("not this model's"), "{said}");
    assert_eq!(call(Some("Bearer first-token")).0, 200);
    let metadata = agent()
        .get(format!("{base}/v2/models/{MODEL}"))
        .call()
        .unwrap();
    assert_eq!(metadata.status().as_u16(), 401);
    for open in ["/v2/health/ready", "/v2/health/live", "/metrics", "/v2"] {
        let answer = agent().get(format!("{base}{open}")).call().unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{open}");
    }

    // The kubelet swaps the Secret's file when it changes.
    std::fs::write(&token_file, "second-token").unwrap();
    let started = std::time::Instant::now();
    while call(Some("Bearer second-token")).0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the rotated token was never taken"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(call(Some("Bearer first-token")).0, 401);

    let d = replica.dir.path().to_owned();
    make_model(&[
        "inputs",
        d.join("in").to_str().unwrap(),
        "--shards",
        "2",
        "--batch",
        "4",
        "--features",
        "64",
    ]);
    let drive = |token: &Path, output: &str| {
        Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
            .args(["drive", "--model-name", MODEL, "--replicas", &replica.base])
            .arg("--input")
            .arg(d.join("in"))
            .arg("--output")
            .arg(d.join(output))
            .arg("--client-token-file")
            .arg(token)
            .output()
            .unwrap()
    };
    let stale = secrets.path().join("stale");
    std::fs::write(&stale, "first-token").unwrap();
    let refused = drive(&stale, "refused-out");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("refused the driver's token") && stderr.contains("actor.tokenSecret"),
        "{stderr}"
    );
    let written = std::fs::read_dir(d.join("refused-out"))
        .map(|entries| {
            entries
                .filter(|e| e.as_ref().unwrap().path().is_file())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(written, 0);
    let served = drive(&token_file, "out");
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert!(d.join("out/manifest.json").exists());
    assert_eq!(
        kube_zerocopy_e2e::terminate(&mut replica.actor).code(),
        Some(0)
    );
}

/// Shard files larger than a replica takes in one body (it refuses bodies over 100 000 bytes
/// here) are sent in row ranges of at most 64 KiB, and their outputs joined; the driver,
/// SIGKILLed mid-run and started again for the same run, skips what it committed and writes
/// the rest. Every output ends up in place (only a batch in flight at the kill may be written
/// twice, with the same bytes) and equals Task mode's within float rounding (the row ranges run
/// as smaller matrix products); the manifest lists every shard once.
#[test]
fn a_killed_driver_resumes_and_sends_large_shards_in_row_ranges() {
    const SHARDS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 256 rows of 256 float32 values: 256 KiB of tensor per shard file.
    let model = mlp_and_shards(d, SHARDS);
    let task_out = d.join("task-out");

    let models = [source("mlp", ModelFormat::Safetensors, &model)];
    let pod = Pod::new();
    assert!(pod.publish(&models).status.success());
    let limit = ["--max-body-bytes", "100000", "--model-name", MODEL];
    let mut replicas: Vec<(Actor, String)> =
        (0..2).map(|_| start_actor(&pod, &models, &limit)).collect();
    let urls: Vec<String> = replicas.iter().map(|(_, url)| url.clone()).collect();
    let out = d.join("out");
    let renames = RenameCounter::watch(&out);
    let drive = || {
        Command::new(kube_zerocopy_e2e::bin("kube-zerocopy-worker"))
            .args(["drive", "--model-name", MODEL, "--run", "r1"])
            .args(["--max-request-bytes", "65536"])
            .arg("--input")
            .arg(d.join("in"))
            .arg("--output")
            .arg(&out)
            .args(["--replicas", &urls.join(",")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = drive();
    let started = Instant::now();
    while kube_zerocopy_batch::shards::list_shards(&out)
        .unwrap()
        .len()
        < 5
    {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let written_before = kube_zerocopy_batch::shards::list_shards(&out)
        .unwrap()
        .len();
    assert!(
        written_before < SHARDS,
        "the driver finished before it was killed"
    );
    assert!(!out.join("manifest.json").exists());

    let again = drive().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{summary:#}");
    // An output whose record was not written yet at the kill counts as not committed.
    let committed_before = summary["committedBefore"].as_u64().unwrap() as usize;
    assert!(
        committed_before > 0 && committed_before <= written_before,
        "{written_before} outputs at the kill: {summary}"
    );
    assert_eq!(summary["written"], SHARDS - committed_before);
    assert_eq!(summary["failed"], serde_json::json!([]));

    let counts = renames.counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    // At most the batches in flight when it was killed (2 per replica) went out again.
    assert!(
        twice.len() <= 4 && twice.iter().all(|(_, n)| **n == 2),
        "{counts:?}"
    );
    for input in kube_zerocopy_batch::shards::list_shards(&d.join("in")).unwrap() {
        let name = input.file_name().unwrap().to_str().unwrap();
        assert!(counts.contains_key(name), "{name} was never written");
        let got = read_output(&out.join(name));
        let expected = read_output(&task_out.join(name));
        assert_eq!(got.size(), expected.size(), "{name}");
        assert!(
            got.allclose(&expected, 1e-5, 1e-5, false),
            "{name} differs from the Task's beyond rounding"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), SHARDS);
    // Each shard took 4 requests of 64 rows: the replicas answered at least 4 per shard.
    let requests: f64 = urls
        .iter()
        .map(|url| metric_value(&metrics(url), "kube_zerocopy_worker_batches_total").unwrap())
        .sum();
    assert!(requests >= (4 * SHARDS) as f64, "{requests} requests");
    for (replica, _) in &mut replicas {
        assert_eq!(kube_zerocopy_e2e::terminate(replica).code(), Some(0));
    }
}

/// In `d`: an Mlp 256-1024-1024-16 (`mlp.safetensors`), `shards` shard files of 256 rows of
/// 256 values (`in/`), and Task mode's outputs for them (`task-out/`), the reference a
/// driver's outputs are compared with. Returns the model's path.
fn mlp_and_shards(d: &Path, shards: usize) -> std::path::PathBuf {
    let model = d.join("mlp.safetensors");
    make_model(&[
        "mlp",
        model.to_str().unwrap(),
        "--sizes",
        "256,1024,1024,16",
    ]);
    let input = d.join("in");
    let shards = shards.to_string();
    make_model(&[
        "inputs",
        input.to_str().unwrap(),
        "--shards",
        &shards,
        "--batch",
        "256",
        "--features",
        "256",
    ]);
    local_task_run(d, &model, &input, &d.join("task-out"));
    model
}

/// Task mode's outputs for the shards of `input` (`kube-zerocopy local run` of one model).
fn local_task_run(d: &Path, model: &Path, input: &Path, output: &Path) {
    let pipeline = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: reference}}\n\
         spec:\n  mode: Task\n  models:\n    - {{name: mlp, format: Safetensors, architecture: Mlp, source: {{uri: 'file://{}'}}}}\n  \
         input: {{uri: 'file://{}'}}\n  output: {{uri: 'file://{}'}}\n  task: {{parallelism: 2}}\n",
        model.display(),
        input.display(),
        output.display()
    );
    std::fs::write(d.join("task.yaml"), pipeline).unwrap();
    let task = Command::new(kube_zerocopy_e2e::bin("kube-zerocopy"))
        .args(["local", "run", "--json", "-f"])
        .arg(d.join("task.yaml"))
        .output()
        .unwrap();
    succeeded(&task);
}
