//! A node's shared store over time: models that no pod uses any more are collected, at once
//! when the store is full, after --keep-unused otherwise; a model in use never is.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kube_zerocopy_e2e::{make_model, source, succeeded, Pod, SmallTmpfs};
use kube_zerocopy_fetch::{ModelFormat, ModelSource};

/// `kube-zerocopy-weight-server serve` for `models`, returned once they are published and bound.
fn serve(pod: &Pod, models: &[ModelSource]) -> Child {
    let mut sidecar = pod
        .command("kube-zerocopy-weight-server", models)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while pod.bindings().read().unwrap().is_none() {
        assert!(sidecar.try_wait().unwrap().is_none(), "the sidecar exited");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not published in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sidecar
}

#[test]
fn unused_models_make_room_and_a_model_in_use_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Two different models of about 1.05 MiB each: one fits in the 2 MiB store, two do not.
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    make_model(&["mlp", a.to_str().unwrap(), "--sizes", "512,520,10"]);
    make_model(&["mlp", b.to_str().unwrap(), "--sizes", "520,512,10"]);
    let (a, b) = (
        source("a", ModelFormat::Safetensors, &a),
        source("b", ModelFormat::Safetensors, &b),
    );
    let shm = SmallTmpfs::mount(dir.path(), "2m");
    let first = Pod::in_dir(&shm.path);
    let second = Pod::sharing_store_of(&first);

    // A is served by a running sidecar: B does not fit, and A is left whole.
    let mut serving = serve(&first, std::slice::from_ref(&a));
    let a_digest = first.published().pop().unwrap();
    let out = second.publish(std::slice::from_ref(&b));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "B published beside a held A");
    assert!(stderr.contains("shared memory is full"), "{stderr}");
    assert_eq!(first.published(), vec![a_digest.clone()]);
    first.store().open(&a_digest).expect("A intact");

    // The pod that used A is gone: B makes room by removing A.
    serving.kill().unwrap();
    serving.wait().unwrap();
    let stderr = succeeded(&second.publish(std::slice::from_ref(&b)));
    assert!(
        stderr.contains("removed the unused model used least recently"),
        "{stderr}"
    );
    assert!(stderr.contains(&a_digest), "{stderr}");
    let b_digest = second.bindings().read().unwrap().unwrap()["b"].clone();
    assert_eq!(first.published(), vec![b_digest.clone()]);
    second.store().open(&b_digest).expect("B published whole");

    // Without pressure, an unused model stays for --keep-unused, then goes.
    let gc = |keep: &str| {
        let out = second
            .command("kube-zerocopy-weight-server", &[])
            .args(["gc", "--keep-unused", keep])
            .output()
            .unwrap();
        succeeded(&out);
    };
    gc("3600");
    assert_eq!(first.published(), vec![b_digest]);
    gc("0");
    assert!(first.published().is_empty(), "{:?}", first.published());
    println!(
        "collection: held model kept under pressure; unused one removed to make room and by age"
    );
}
