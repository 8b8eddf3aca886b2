use std::fs;
use std::time::{Duration, SystemTime};

use super::store::names_in;
use super::*;
use kube_zerocopy_contract::models::ModelFormat;

#[test]
fn regions_come_in_the_order_asked_and_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let staging = Store::new(dir.path()).begin("d").unwrap();
    let mut file = staging.create_tensors_file(256).unwrap();
    let entry = |name: &str, offset: u64, length: u64| TensorEntry {
        name: name.into(),
        dtype: DType::U8,
        shape: vec![length],
        offset,
        length,
    };
    let (a, b) = (entry("a", 128, 16), entry("b", 0, 64));
    let regions = file.regions(&[&a, &b]).unwrap();
    assert_eq!(
        regions.iter().map(|r| r.len()).collect::<Vec<_>>(),
        [16, 64]
    );
    for (region, fill) in regions.into_iter().zip([1u8, 2]) {
        region.fill(fill);
    }
    assert!(file.region(&a).unwrap().iter().all(|&x| x == 1));
    assert!(file.region(&b).unwrap().iter().all(|&x| x == 2));
    let overlapping = entry("c", 32, 64);
    let err = file.regions(&[&b, &overlapping]).unwrap_err().to_string();
    assert!(err.contains("overlaps another"), "{err}");
    assert!(file.regions(&[&entry("d", 250, 16)]).is_err());
}

/// A store with a (fake) published model folder for `digest`.
fn store_with(digest: &str) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    fs::create_dir_all(store.model_dir(digest)).unwrap();
    (dir, store)
}

#[test]
fn a_held_model_is_never_collected() {
    let (_dir, store) = store_with("aa");
    let hold = store.hold("aa").unwrap();
    // A second holder (another sidecar) shares the claim.
    let other = store.hold("aa").unwrap();
    assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
    drop(hold);
    assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
    assert!(store.model_dir("aa").is_dir());
    drop(other);
    assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["aa"]);
    assert!(!store.model_dir("aa").exists());
    assert!(names_in(&store.root().join(".trash")).unwrap().is_empty());
}

/// A model whose files a node agent's view links is in use, held or not.
#[test]
fn a_model_linked_into_a_view_is_never_collected() {
    let (dir, store) = store_with("dd");
    let tensors = store.model_dir("dd").join("tensors.bin");
    fs::write(&tensors, b"weights").unwrap();
    let view = dir.path().join(".views/csi-1");
    fs::create_dir_all(&view).unwrap();
    fs::hard_link(&tensors, view.join("tensors.bin")).unwrap();
    assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
    assert!(tensors.is_file());
    fs::remove_dir_all(&view).unwrap();
    assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["dd"]);
}

/// Room is made from the model used least recently; a held one is never taken.
#[test]
fn room_is_made_from_the_least_recently_used_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let hour = Duration::from_secs(3600);
    for (digest, hours_ago) in [("new", 1), ("old", 3), ("mid", 2), ("held", 5)] {
        fs::create_dir_all(store.model_dir(digest)).unwrap();
        drop(store.hold(digest).unwrap());
        let users = store.users_lock(digest).unwrap();
        users
            .set_modified(SystemTime::now() - hours_ago * hour)
            .unwrap();
    }
    let _held = store.hold("held").unwrap();
    store
        .users_lock("held")
        .unwrap()
        .set_modified(SystemTime::now() - 5 * hour)
        .unwrap();
    let order: Vec<_> =
        std::iter::from_fn(|| store.collect_least_recently_used().unwrap()).collect();
    assert_eq!(order, ["old", "mid", "new"]);
    assert!(store.model_dir("held").is_dir());
}

#[test]
fn an_unused_model_is_kept_until_it_was_idle_long_enough() {
    let (_dir, store) = store_with("bb");
    drop(store.hold("bb").unwrap());
    let hour = Duration::from_secs(3600);
    assert!(store.collect_unused(hour).unwrap().is_empty());
    let users = store.users_lock("bb").unwrap();
    users.set_modified(SystemTime::now() - 2 * hour).unwrap();
    assert_eq!(store.collect_unused(hour).unwrap(), vec!["bb"]);
}

#[test]
fn staging_is_collected_only_when_nobody_writes_that_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let lock = store.lock("cc").unwrap();
    let writing = store.begin("cc").unwrap();
    // A model fetched by URI alone is staged under its URI's key, which nobody holds as
    // a user: its writer's lock is what keeps it.
    let uri_lock = store.lock("uri-ee").unwrap();
    let fetching = store.begin("uri-ee").unwrap();
    let left = store.begin("dd").unwrap();
    std::mem::forget(left); // a killed sidecar's leftover
    store.collect_unused(Duration::ZERO).unwrap();
    let mut staging = names_in(&dir.path().join(".staging")).unwrap();
    staging.sort();
    assert_eq!(staging.len(), 2, "{staging:?}");
    assert!(staging[0].starts_with("cc."), "{staging:?}");
    assert!(staging[1].starts_with("uri-ee."), "{staging:?}");
    // The writer is killed: its lock goes with it, and its folder with the next collection.
    std::mem::forget(fetching);
    drop(uri_lock);
    store.collect_unused(Duration::ZERO).unwrap();
    let staging = names_in(&dir.path().join(".staging")).unwrap();
    assert_eq!(staging.len(), 1, "{staging:?}");
    drop((writing, lock));
}

#[test]
fn a_lock_held_forever_fails_after_the_timeout_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path()).with_lock_timeout(Duration::from_millis(300));
    // Another process's lock (flock: another open file conflicts, in one process too).
    let held = store.lock("ee").unwrap();
    let err = format!("{:#}", store.lock("ee").unwrap_err());
    assert!(
        err.contains("waited 300ms") && err.contains("ee.lock"),
        "{err}"
    );
    drop(held);
    drop(store.lock("ee").unwrap());
    // A collection's exclusive claim held forever: a hold gives up the same way.
    let users = store.users_lock("ff").unwrap();
    users.lock().unwrap();
    let err = format!("{:#}", store.hold("ff").err().unwrap());
    assert!(
        err.contains("holding model ff") && err.contains("waited"),
        "{err}"
    );
}

#[test]
fn a_link_planted_in_the_store_is_never_followed() {
    let (_elsewhere, other) = store_with("gg");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    fs::create_dir_all(dir.path().join("blobs")).unwrap();
    fs::write(other.model_dir("gg").join(MANIFEST_FILE), "{}").unwrap();
    std::os::unix::fs::symlink(other.model_dir("gg"), store.model_dir("gg")).unwrap();
    let err = format!("{:#}", store.open("gg").unwrap_err());
    assert!(err.contains("is not a folder of the store"), "{err}");
    // The collection removes the link, not what it points at.
    assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["gg"]);
    assert!(fs::symlink_metadata(store.model_dir("gg")).is_err());
    assert!(other.model_dir("gg").join(MANIFEST_FILE).is_file());
    // A real folder whose manifest is a link is refused too.
    fs::create_dir_all(store.model_dir("hh")).unwrap();
    std::os::unix::fs::symlink(
        other.model_dir("gg").join(MANIFEST_FILE),
        store.model_dir("hh").join(MANIFEST_FILE),
    )
    .unwrap();
    let err = format!("{:#}", store.open("hh").unwrap_err());
    assert!(err.contains("is not a plain file"), "{err}");
}

#[test]
fn one_bad_entry_does_not_stop_the_collection() {
    let (_dir, store) = store_with("ii");
    fs::create_dir_all(store.model_dir("jj")).unwrap();
    // jj's users lock cannot be opened (a folder stands where the file goes).
    fs::create_dir_all(store.root().join(".users/jj.lock")).unwrap();
    assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["ii"]);
    assert!(store.model_dir("jj").is_dir());
}

fn manifest(tensors: Vec<TensorEntry>, size: u64) -> Manifest {
    Manifest {
        layout_version: LAYOUT_VERSION,
        digest: "d".into(),
        format: ModelFormat::Safetensors,
        source_bytes: 0,
        tensors_bytes: size,
        tensors,
        skeleton: None,
    }
}

#[test]
fn plan_aligns_every_tensor() {
    let (entries, total) = plan([
        ("a".to_string(), DType::F32, vec![3]),
        ("b".to_string(), DType::BF16, vec![5, 7]),
        ("c".to_string(), DType::Bool, vec![1]),
    ])
    .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![0, 64, 192]
    );
    assert_eq!(entries[1].length, 70);
    assert_eq!(total, 256);
    manifest(entries, total).validate(total).unwrap();
}

#[test]
fn validate_rejects_overlap_misalignment_and_overrun() {
    let t = |name: &str, offset, n| TensorEntry {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![n],
        offset,
        length: n * 4,
    };
    let err = |m: Manifest, len| m.validate(len).unwrap_err().to_string();
    assert!(err(manifest(vec![t("a", 0, 32), t("b", 64, 4)], 256), 256).contains("overlaps"));
    assert!(err(manifest(vec![t("a", 4, 1)], 64), 64).contains("unaligned"));
    assert!(err(manifest(vec![t("a", 0, 100)], 256), 256).contains("past the end"));
    assert!(err(manifest(vec![t("a", 0, 1)], 64), 128).contains("holds 128 bytes"));
    assert!(err(manifest(vec![t("a", 0, 1), t("a", 64, 1)], 128), 128).contains("listed twice"));
}

#[test]
fn shapes_whose_size_overflows_are_refused() {
    let huge = vec![1 << 40, 1 << 40];
    let err = plan([("w".to_string(), DType::F32, huge)]).unwrap_err();
    assert!(err.to_string().contains("overflows 64 bits"), "{err}");
    let err = plan([
        ("a".to_string(), DType::U8, vec![u64::MAX - 8]),
        ("b".to_string(), DType::U8, vec![64]),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("overflows 64 bits"), "{err}");
    let mut m = manifest(vec![], 0);
    m.tensors.push(TensorEntry {
        name: "w".into(),
        dtype: DType::F64,
        shape: vec![1 << 62, 4],
        offset: 0,
        length: 0,
    });
    assert!(m
        .validate(0)
        .unwrap_err()
        .to_string()
        .contains("does not match"));
}
