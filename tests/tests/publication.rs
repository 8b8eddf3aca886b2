//! Publication under failure and concurrency: a sidecar killed mid-publish leaves nothing a
//! reader could mistake for a model, and a restart completes it; two sidecars on one node
//! asked for the same model load it once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{make_model, source, succeeded, Pod};
use kube_zerocopy_sidecar::{ModelFormat, ModelSource, Store};

fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Reads the store as a worker would, as fast as it can, until told to stop: every read must
/// find either nothing or a complete, consistent model. Returns how many complete reads it saw.
fn watch(
    store: Store,
    digest: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    // The first read happens before the sidecar starts: the model is absent.
    assert!(!store.model_dir(&digest).exists());
    std::thread::spawn(move || {
        let (mut absent, mut complete) = (1, 0);
        let mut stopped_at: Option<Instant> = None;
        loop {
            // Once told to stop, read on until the published model has been seen (a loaded
            // machine may not have scheduled this thread since), for 30 s at most.
            if stop.load(Ordering::SeqCst) {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                if complete > 0 || since.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            if store.model_dir(&digest).exists() {
                let m = store
                    .open(&digest)
                    .expect("a visible model folder must be complete");
                assert_eq!(
                    std::fs::metadata(store.model_dir(&digest).join("tensors.bin"))
                        .unwrap()
                        .len(),
                    m.tensors_bytes
                );
                complete += 1;
            } else {
                absent += 1;
            }
        }
        (absent, complete)
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

    let mut sidecar = pod
        .command("kube-zerocopy-sidecar", std::slice::from_ref(&model))
        .arg("publish")
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Kill it as soon as it writes into its staging folder.
    let killed_while_staging = loop {
        if let Some(status) = sidecar.try_wait().unwrap() {
            panic!("the sidecar finished ({status}) before it could be killed mid-publish");
        }
        let writing = pod.staging().iter().any(|p| p.join("tensors.bin").exists());
        if writing {
            sidecar.kill().unwrap();
            sidecar.wait().unwrap();
            break true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no staging folder appeared"
        );
        std::thread::yield_now();
    };
    assert!(killed_while_staging);
    println!(
        "killed after {:?}; staging left: {:?}",
        started.elapsed(),
        pod.staging()
    );
    assert!(
        pod.published().is_empty(),
        "a killed sidecar published {:?}",
        pod.published()
    );
    assert!(pod.bindings().read().unwrap().is_none());
    // The probe says not ready, and a worker refuses to start with a clear error.
    let probe = pod
        .command("kube-zerocopy-sidecar", std::slice::from_ref(&model))
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
        .command("kube-zerocopy-sidecar", std::slice::from_ref(&model))
        .arg("probe")
        .status()
        .unwrap();
    assert!(probe.success());

    stop.store(true, Ordering::SeqCst);
    let (absent, complete) = watcher.join().unwrap();
    println!(
        "reader saw the model absent {absent} times and complete {complete} times, never partial"
    );
    assert!(absent > 0 && complete > 0);
}

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
    let model = ModelSource {
        sha256: Some(digest.clone()),
        ..source("m", ModelFormat::Safetensors, &file)
    };
    let first = Pod::new();
    let second = Pod::sharing_store_of(&first);
    let spawn = |pod: &Pod| {
        pod.command("kube-zerocopy-sidecar", std::slice::from_ref(&model))
            .arg("publish")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(&first), spawn(&second));
    let logs: Vec<String> = [a, b]
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            succeeded(&out)
        })
        .collect();
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
    assert_eq!(first.published(), vec![digest.clone()]);
    // Both pods are bound to the one copy.
    for pod in [&first, &second] {
        assert_eq!(pod.bindings().read().unwrap().unwrap()["m"], digest);
    }
}
