//! Publication under failure and concurrency: a sidecar killed mid-publish leaves nothing a
//! reader could mistake for a model, and a restart completes it; two sidecars on one node
//! asked for the same model load it once; a serving one keeps its models and collects the
//! unused ones.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{make_model, sha256_of, source, succeeded, Pod};
use kube_zerocopy_fetch::{ModelFormat, ModelSource, Store};

/// What a reader saw of one model while it was being published.
#[derive(Default)]
struct Seen {
    absent: u64,
    complete: u64,
    /// The digest of tensors.bin at each complete read.
    contents: std::collections::BTreeSet<String>,
}

/// Reads the store as a worker would, as fast as it can, until told to stop: every read must
/// find either nothing or a complete, consistent model, whose bytes it hashes.
fn watch(store: Store, digest: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let mut stopped_at: Option<Instant> = None;
        loop {
            // Once told to stop, read on until the published model has been seen (a loaded
            // machine may not have scheduled this thread since), for 30 s at most.
            if stop.load(Ordering::SeqCst) {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                if seen.complete > 0 || since.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            if store.model_dir(&digest).exists() {
                let m = store
                    .open(&digest)
                    .expect("a visible model folder must be complete");
                let tensors = store.model_dir(&digest).join("tensors.bin");
                assert_eq!(std::fs::metadata(&tensors).unwrap().len(), m.tensors_bytes);
                seen.contents.insert(sha256_of(&tensors));
                seen.complete += 1;
            } else {
                seen.absent += 1;
            }
        }
        seen
    })
}

#[test]
fn sidecar_killed_mid_publish_leaves_no_partial_model_and_a_restart_completes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.safetensors");
    // 4 x 4096 x 4096 f32: 256 MiB, long enough to be caught while it is being written.
    make_model(&[
        "mlp",
        file.to_str().unwrap(),
        "--sizes",
        "4096,4096,4096,4096,4096",
    ]);
    let digest = sha256_of(&file);
    let model = ModelSource {
        sha256: Some(digest.clone()),
        ..source("big", ModelFormat::Safetensors, &file)
    };
    let pod = Pod::new();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(pod.store(), digest.clone(), stop.clone());
    // The reader's first reads come before the sidecar starts.
    std::thread::sleep(Duration::from_millis(50));

    let mut sidecar = pod
        .command("kube-zerocopy-weight-server", std::slice::from_ref(&model))
        .arg("publish")
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Kill it as soon as it writes into its staging folder.
    loop {
        if let Some(status) = sidecar.try_wait().unwrap() {
            panic!("the sidecar finished ({status}) before it could be killed mid-publish");
        }
        let writing = pod.staging().iter().any(|p| p.join("tensors.bin").exists());
        if writing {
            sidecar.kill().unwrap();
            sidecar.wait().unwrap();
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no staging folder appeared"
        );
        std::thread::yield_now();
    }
    // Killed mid-publish: its half-written model is still in staging.
    let staging = pod.staging();
    println!(
        "killed after {:?}; staging left: {staging:?}",
        started.elapsed()
    );
    assert!(
        staging.iter().any(|p| p.join("tensors.bin").exists()),
        "no half-written model in staging: {staging:?}"
    );
    assert!(
        pod.published().is_empty(),
        "a killed sidecar published {:?}",
        pod.published()
    );
    assert!(pod.bindings().read().unwrap().is_none());
    // The probe says not ready, and a worker refuses to start with a clear error.
    let probe = pod
        .command("kube-zerocopy-weight-server", std::slice::from_ref(&model))
        .arg("probe")
        .output()
        .unwrap();
    assert!(!probe.status.success());
    assert!(
        String::from_utf8_lossy(&probe.stderr).contains("not ready"),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    // A restarted sidecar completes the publication and removes the dead one's staging.
    let out = pod.publish(std::slice::from_ref(&model));
    succeeded(&out);
    assert_eq!(pod.published(), vec![digest.clone()]);
    assert!(
        pod.staging().is_empty(),
        "staging left: {:?}",
        pod.staging()
    );
    let probe = pod
        .command("kube-zerocopy-weight-server", std::slice::from_ref(&model))
        .arg("probe")
        .status()
        .unwrap();
    assert!(probe.success());

    stop.store(true, Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    println!(
        "reader saw the model absent {} times and complete {} times, never partial",
        seen.absent, seen.complete
    );
    assert!(seen.absent > 0 && seen.complete > 0);
    // Every complete read held the published bytes, not a half-copied file of the right length
    // (fallocate sets the length first).
    let published = sha256_of(&pod.store().model_dir(&digest).join("tensors.bin"));
    assert_eq!(seen.contents, std::collections::BTreeSet::from([published]));
}

/// Two sidecars on one node asked for the same model at once: the model's server holds its
/// first answer until the second sidecar waits for the model's lock, so that they race for
/// real; the model is fetched once (one GET), laid out once, and both pods are bound to one
/// copy (one inode).
#[test]
fn two_sidecars_on_one_node_load_a_model_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    make_model(&[
        "mlp",
        file.to_str().unwrap(),
        "--sizes",
        "2048,2048,2048,10",
    ]);
    let digest = sha256_of(&file);
    let bytes = std::fs::read(&file).unwrap();
    // The model's server (no ranges: one GET brings it whole), held until released.
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let address = server.server_addr().to_ip().unwrap();
    let (release, gets) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let asked = Arc::new(AtomicBool::new(false));
    {
        let (release, gets, asked) = (release.clone(), gets.clone(), asked.clone());
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                asked.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if *request.method() == tiny_http::Method::Get {
                    gets.fetch_add(1, Ordering::SeqCst);
                }
                let _ = request.respond(tiny_http::Response::from_data(bytes.clone()));
            }
        });
    }
    let model = ModelSource {
        sha256: Some(digest.clone()),
        uri: format!("http://{address}/m.safetensors"),
        ..source("m", ModelFormat::Safetensors, &file)
    };
    let first = Pod::new();
    let second = Pod::sharing_store_of(&first);
    let spawn = |pod: &Pod| {
        pod.command("kube-zerocopy-weight-server", std::slice::from_ref(&model))
            .arg("publish")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(&first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !asked.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the first sidecar never asked");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first holds the model's lock while its source is held: the second, once it says it
    // waits for the lock, waits for the first.
    let mut b = spawn(&second);
    let mut second_log = String::new();
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(b.stderr.take().unwrap()).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            second_log += &line;
            second_log.push('\n');
            if line.contains("waiting for the model's lock") {
                break;
            }
        }
        release.store(true, Ordering::SeqCst);
        for line in lines {
            second_log += &line.unwrap();
            second_log.push('\n');
        }
    }
    let first_log = succeeded(&a.wait_with_output().unwrap());
    assert!(b.wait().unwrap().success(), "{second_log}");
    let logs = [first_log, second_log];
    let loaded = logs.iter().filter(|l| l.contains("laid out")).count();
    let verified = logs
        .iter()
        .filter(|l| l.contains("already published; verified"))
        .count();
    assert_eq!(
        (loaded, verified),
        (1, 1),
        "logs:\n{}",
        logs.join("\n---\n")
    );
    assert_eq!(
        gets.load(Ordering::SeqCst),
        1,
        "the model was fetched more than once"
    );
    assert_eq!(first.published(), vec![digest.clone()]);
    // Both pods are bound to the one copy.
    let mut inodes = std::collections::BTreeSet::new();
    for pod in [&first, &second] {
        assert_eq!(pod.bindings().read().unwrap().unwrap()["m"], digest);
        let tensors = pod.store().model_dir(&digest).join("tensors.bin");
        inodes.insert(std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(tensors).unwrap(),
        ));
    }
    assert_eq!(inodes.len(), 1, "two copies of the model");
}

/// The weight server's health endpoints while it serves: /livez answers at once, /readyz says
/// 503 "publishing" while the model is on its way (its http source holds the answer back) and
/// 200 "ready" once it is published, when `probe` (the startup probe) passes too.
#[test]
fn the_weight_server_is_ready_only_once_its_models_are_published() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.safetensors");
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", "64,64,8"]);
    let bytes = std::fs::read(&file).unwrap();
    // The model's server: answers only once the test has seen the sidecar not ready (its
    // first request, a HEAD, waits; then the download's GET).
    let source_server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let source_addr = source_server.server_addr().to_ip().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    {
        let release = release.clone();
        std::thread::spawn(move || {
            for request in source_server.incoming_requests() {
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = request.respond(tiny_http::Response::from_data(bytes.clone()));
            }
        });
    }
    let pod = Pod::new();
    let models = vec![ModelSource {
        uri: format!("http://{source_addr}/mlp.safetensors"),
        ..source("m", ModelFormat::Safetensors, &file)
    }];
    let port = kube_zerocopy_e2e::cluster::free_port().unwrap();
    let mut sidecar = pod
        .command("kube-zerocopy-weight-server", &models)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<(u16, String)> {
        match ureq::get(format!("http://127.0.0.1:{port}{path}")).call() {
            Ok(mut r) => Some((r.status().as_u16(), r.body_mut().read_to_string().unwrap())),
            Err(ureq::Error::StatusCode(code)) => Some((code, String::new())),
            Err(_) => None,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let publishing = loop {
        if let Some(answer) = get("/readyz") {
            break answer;
        }
        assert!(Instant::now() < deadline, "the sidecar never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(publishing.0, 503, "{publishing:?}");
    assert_eq!(get("/livez").map(|a| a.0), Some(200));
    assert!(!pod
        .command("kube-zerocopy-weight-server", &models)
        .arg("probe")
        .status()
        .unwrap()
        .success());
    release.store(true, Ordering::SeqCst);
    let ready = loop {
        let answer = get("/readyz").unwrap();
        if answer.0 == 200 || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready, (200, "ready".to_string()));
    assert!(pod
        .command("kube-zerocopy-weight-server", &models)
        .arg("probe")
        .status()
        .unwrap()
        .success());
    // The kubelet stops a sidecar with SIGTERM: a clean exit (as PID 1 it would otherwise
    // ignore the signal and be killed after the grace period, exit code 137).
    assert_eq!(kube_zerocopy_e2e::terminate(&mut sidecar).code(), Some(0));
}

/// The serve loop on a node's store: every period it marks its own models as used and removes
/// the models no sidecar holds that stayed unused for `KZC_KEEP_UNUSED`; a served model is
/// never removed, and once its sidecar is gone a collection may take it.
#[test]
fn a_serving_weight_server_keeps_its_models_and_collects_unused_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (old_file, served_file) = (
        dir.path().join("old.safetensors"),
        dir.path().join("served.safetensors"),
    );
    make_model(&["mlp", old_file.to_str().unwrap(), "--sizes", "16,8"]);
    make_model(&["mlp", served_file.to_str().unwrap(), "--sizes", "16,32"]);
    let (old_digest, served_digest) = (sha256_of(&old_file), sha256_of(&served_file));
    let model = |name: &str, file: &std::path::Path, digest: &str| ModelSource {
        sha256: Some(digest.to_owned()),
        ..source(name, ModelFormat::Safetensors, file)
    };
    let old = vec![model("old", &old_file, &old_digest)];
    let served = vec![model("served", &served_file, &served_digest)];

    // A model published by a pod that has ended: nobody holds it.
    let finished = Pod::new();
    succeeded(&finished.publish(&old));
    let serving = Pod::sharing_store_of(&finished);
    let port = kube_zerocopy_e2e::cluster::free_port().unwrap();
    let mut sidecar = serving
        .command("kube-zerocopy-weight-server", &served)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .envs([("KZC_KEEP_UNUSED", "3"), ("KZC_COLLECT_EVERY", "1")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = serving
        .store
        .join(".users")
        .join(format!("{served_digest}.lock"));
    let modified = || std::fs::metadata(&lock).and_then(|m| m.modified()).ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    while modified().is_none() || !serving.published().contains(&served_digest) {
        assert!(
            Instant::now() < deadline,
            "the served model was never published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let first_mark = modified().unwrap();

    // Waits until `done` holds, checking on the way that the served model stays.
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                serving.published().contains(&served_digest),
                "the served model was removed while served"
            );
            assert!(Instant::now() < deadline, "waited 30 s for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("the unused model to be collected", &|| {
        !serving.published().contains(&old_digest)
    });
    wait_for("the served model to be marked as used again", &|| {
        modified().is_some_and(|m| m > first_mark + Duration::from_secs(2))
    });
    // Three collection periods past the keep time: still there, held by its sidecar.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(serving.published(), vec![served_digest.clone()]);

    // Its sidecar gone, the hold goes with it: a collection takes the model.
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
    let gc = serving
        .command("kube-zerocopy-weight-server", &served)
        .arg("gc")
        .env("KZC_KEEP_UNUSED", "0")
        .output()
        .unwrap();
    succeeded(&gc);
    assert!(
        serving.published().is_empty(),
        "left after its sidecar ended: {:?}",
        serving.published()
    );
}
