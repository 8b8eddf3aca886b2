//! Actor mode: a worker maps the models once and serves batches over HTTP; each answer equals
//! the models run the ordinary way, and a bad batch gets a 400 with the cause. Batches that do
//! not fit, bodies too large or too slow are refused with their status, and the replica goes on
//! serving, its health and metrics answered meanwhile.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{make_model, metric_value, source, Pod};
use kube_zerocopy_sidecar::ModelFormat;
use kube_zerocopy_worker::actor::decode;
use kube_zerocopy_worker::task::read_input;
use kube_zerocopy_worker::LoadedModel;

/// Starts an actor on a free port with extra arguments; returns it and its base URL once ready.
fn start_actor(
    pod: &Pod,
    models: &[kube_zerocopy_sidecar::ModelSource],
    args: &[&str],
) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut actor = pod
        .command("kube-zerocopy-worker", models)
        .args(["actor", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while ureq::get(format!("{base}/readyz")).call().is_err() {
        assert!(actor.try_wait().unwrap().is_none(), "the actor exited");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the actor never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (actor, base)
}

/// POSTs `body` to /infer; returns the status and the answer's body.
fn post(base: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.post(format!("{base}/infer")).send(body).unwrap();
    let mut bytes = Vec::new();
    response
        .body_mut()
        .as_reader()
        .read_to_end(&mut bytes)
        .unwrap();
    (response.status().as_u16(), bytes)
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

/// A safetensors body with tensor `input`.
fn batch(t: &tch::Tensor) -> Vec<u8> {
    let path = tempfile::NamedTempFile::new().unwrap();
    tch::Tensor::write_safetensors(&[("input", t)], path.path()).unwrap();
    std::fs::read(path.path()).unwrap()
}

/// A replica of the built-in Mlp: a batch of the wrong width used to panic inside tch and kill
/// it; a slow client used to hold the only request thread, health and metrics included.
#[test]
fn actor_refuses_what_does_not_fit_and_goes_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mlp.safetensors");
    make_model(&["mlp", model.to_str().unwrap(), "--sizes", "64,32,4"]);
    let models = [source("mlp", ModelFormat::Safetensors, &model)];
    let pod = Pod::new();
    assert!(pod.publish(&models).status.success());
    let limits = ["--max-body-bytes", "1048576", "--body-timeout", "15"];
    let (mut actor, base) = start_actor(&pod, &models, &limits);
    let good = tch::Tensor::ones([4, 64], (tch::Kind::Float, tch::Device::Cpu));

    // The wrong width: 422 with the reason in the client's terms, and the replica lives on.
    let narrow = tch::Tensor::ones([4, 3], (tch::Kind::Float, tch::Device::Cpu));
    let (status, body) = post(&base, &batch(&narrow));
    let reason = String::from_utf8_lossy(&body);
    assert_eq!(status, 422, "{reason}");
    assert!(
        reason.contains("takes rows of 64 values") && reason.contains("[4, 3]"),
        "{reason}"
    );
    assert_eq!(post(&base, &batch(&good)).0, 200);
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
        "POST /infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n",
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
        "POST /infer HTTP/1.1\r\nHost: {address}\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap();
    slow.write_all(&[0u8; 1000]).unwrap();
    for path in ["/readyz", "/livez", "/metrics"] {
        ureq::get(format!("{base}{path}")).call().unwrap();
    }
    assert_eq!(post(&base, &batch(&good)).0, 200);
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

    let text = metrics(&base);
    assert!(
        text.contains("kube_zerocopy_worker_batches_total 2"),
        "{text}"
    );
    assert!(
        text.contains("kube_zerocopy_worker_batch_errors_total 3"),
        "{text}"
    );
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

    let (mut actor, base) = start_actor(&pod, &models, &[]);

    let reference = LoadedModel::load_copying(&model, &models[0], tch::Device::Cpu).unwrap();
    for shard in kube_zerocopy_worker::task::list_shards(&d.join("in")).unwrap() {
        let (status, bytes) = post(&base, &std::fs::read(&shard).unwrap());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        // The answer read as any safetensors file, not with the actor's own decoder.
        let answer = d.join("answer.safetensors");
        std::fs::write(&answer, &bytes).unwrap();
        let got = kube_zerocopy_e2e::read_output(&answer);
        let expected = reference.forward(&read_input(&shard).unwrap()).unwrap();
        assert!(got.equal(&expected), "batch {} differs", shard.display());
    }
    assert!(decode(b"nonsense").is_err());

    let bad = ureq::post(format!("{base}/infer")).send(&b"not a tensor"[..]);
    match bad {
        Err(ureq::Error::StatusCode(400)) => {}
        other => panic!("a bad batch should get 400, got {other:?}"),
    }

    // Its metrics count the batches and show its memory, the shared weights apart.
    let text = metrics(&base);
    let metric = |name: &str| -> f64 {
        metric_value(&text, &format!("kube_zerocopy_worker_{name}"))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(metric("batches_total"), 3.0);
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
