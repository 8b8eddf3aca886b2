//! Actor mode: a worker maps the models once and serves batches over HTTP; each answer equals
//! the models run the ordinary way, and a bad batch gets a 400 with the cause.

use std::io::Read;
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{make_model, source, Pod};
use kube_zerocopy_sidecar::ModelFormat;
use kube_zerocopy_worker::actor::{decode, encode};
use kube_zerocopy_worker::task::read_input;
use kube_zerocopy_worker::LoadedModel;

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

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut actor = pod
        .command("kube-zerocopy-worker", &models)
        .args(["actor", "--listen", &format!("127.0.0.1:{port}")])
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

    let reference = LoadedModel::load_copying(&model, &models[0], tch::Device::Cpu).unwrap();
    for shard in kube_zerocopy_worker::task::list_shards(&d.join("in")).unwrap() {
        let body = std::fs::read(&shard).unwrap();
        let mut response = ureq::post(format!("{base}/infer")).send(&body[..]).unwrap();
        let mut bytes = Vec::new();
        response
            .body_mut()
            .as_reader()
            .read_to_end(&mut bytes)
            .unwrap();
        let got = kube_zerocopy_worker::actor::decode_output(&bytes).unwrap();
        let expected = reference.forward(&read_input(&shard).unwrap()).unwrap();
        assert!(got.equal(&expected), "batch {} differs", shard.display());
    }
    // encode/decode agree with each other.
    let t = tch::Tensor::arange(6, (tch::Kind::Float, tch::Device::Cpu)).reshape([2, 3]);
    let round = kube_zerocopy_worker::actor::decode_output(&encode(&t).unwrap()).unwrap();
    assert!(round.equal(&t));
    assert!(decode(b"nonsense").is_err());

    let bad = ureq::post(format!("{base}/infer")).send(&b"not a tensor"[..]);
    match bad {
        Err(ureq::Error::StatusCode(400)) => {}
        other => panic!("a bad batch should get 400, got {other:?}"),
    }

    // Its metrics count the batches and show its memory, the shared weights apart.
    let text = ureq::get(format!("{base}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("kube_zerocopy_worker_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
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
    actor.kill().unwrap();
    actor.wait().unwrap();
}
