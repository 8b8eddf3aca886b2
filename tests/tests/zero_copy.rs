//! Three worker processes map one published model: every parameter and buffer points into
//! the shared mapping, outputs equal the ordinary (copying) load, and together they hold about
//! one copy of the weights (PSS from /proc), while a copying worker holds a private one.

use std::path::Path;

use kube_zerocopy_e2e::{make_model, mib, read_output, source, succeeded, Pod};
use kube_zerocopy_fetch::{ModelFormat, ModelSource};
use kube_zerocopy_worker::memory::{status_kib, MemoryStats};
use kube_zerocopy_worker::shared::SharedModel;

const WORKERS: usize = 3;

fn check_sharing(label: &str, model: ModelSource, input: &Path) {
    let pod = Pod::new();
    let models = vec![model];
    let out = pod.publish(&models);
    succeeded(&out);
    let (digest, manifest) = pod.bindings().resolve(&pod.store(), "m").unwrap();
    let weights_kib = manifest.tensors_bytes / 1024;
    let blob = pod.store().model_dir(&digest).join("tensors.bin");

    let work = pod.dir.path();
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            pod.spawn_inspect(
                &models,
                "shared",
                input,
                &work.join(format!("shared-{i}.safetensors")),
            )
            .unwrap()
        })
        .collect();
    let baseline = pod
        .spawn_inspect(&models, "copy", input, &work.join("copy.safetensors"))
        .unwrap();
    let reference = read_output(&work.join("copy.safetensors"));

    println!(
        "{label}: {} MiB of weights in {}",
        mib(weights_kib),
        blob.display()
    );
    let mut mapping_pss_total = 0;
    let mut shared_anon = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let m = &w.report["models"][0];
        assert_eq!(
            m["outside_mapping"].as_array().unwrap().len(),
            0,
            "{label}: tensors outside the mapping: {m}"
        );
        // Every tensor the module holds was checked (constants of a frozen module included):
        // together they are the weights.
        let listed = m["tensor_bytes"].as_u64().unwrap();
        assert!(
            listed * 10 >= manifest.tensors_bytes * 9 && listed <= manifest.tensors_bytes,
            "{label}: the tensors checked hold {listed} of {} bytes: {m}",
            manifest.tensors_bytes
        );
        if i == 0 {
            println!(
                "  {} tensors ({} bytes) checked, each inside the mapping",
                m["tensors"], m["tensor_bytes"]
            );
        }
        let output = read_output(&work.join(format!("shared-{i}.safetensors")));
        assert!(
            output.equal(&reference),
            "{label}: worker {i} output differs from the ordinary load"
        );
        let mapping = MemoryStats::of_mapping(&w.pid(), &blob).unwrap();
        let process = MemoryStats::of_process(&w.pid()).unwrap();
        println!(
            "  shared worker {i}: mapping RSS {:.1} MiB PSS {:.1} MiB; process RSS {:.1} PSS {:.1} USS {:.1} anon {:.1} MiB",
            mib(mapping.rss_kib), mib(mapping.pss_kib), mib(process.rss_kib), mib(process.pss_kib), mib(process.uss_kib), mib(process.anon_kib)
        );
        // Inference touched every weight, through the mapping.
        assert!(
            mapping.rss_kib * 10 >= weights_kib * 9,
            "{label}: worker {i} maps only {} KiB",
            mapping.rss_kib
        );
        // Figures read as zero would pass the upper bounds below: bounded from both sides.
        assert!(
            mapping.pss_kib > 0
                && mapping.pss_kib <= mapping.rss_kib
                && process.rss_kib >= mapping.rss_kib
                && process.pss_kib >= mapping.pss_kib
                && process.uss_kib > 0
                && process.uss_kib <= process.rss_kib,
            "{label}: worker {i}: mapping {mapping:?}, process {process:?}"
        );
        // Not even while loading: it never held much more than now (a copy beside the
        // mapping would raise the peak), and its anonymous memory never rose by a copy that
        // was freed again.
        let peak = status_kib(&w.pid(), "VmHWM").unwrap();
        let now = status_kib(&w.pid(), "VmRSS").unwrap();
        println!(
            "  shared worker {i}: peak RSS {:.1} MiB (now {:.1}), peak anon while loading {:.1} MiB",
            mib(peak),
            mib(now),
            mib(w.peak_anon_kib)
        );
        assert!(
            peak <= now + weights_kib / 5,
            "{label}: worker {i} peaked at {peak} KiB, {now} KiB now, for {weights_kib} KiB of weights"
        );
        assert!(
            w.peak_anon_kib <= process.anon_kib + weights_kib / 5,
            "{label}: worker {i}'s anonymous memory reached {} KiB while loading, {} KiB now, for {weights_kib} KiB of weights",
            w.peak_anon_kib,
            process.anon_kib
        );
        mapping_pss_total += mapping.pss_kib;
        shared_anon.push(process.anon_kib);
    }
    let copy = MemoryStats::of_process(&baseline.pid()).unwrap();
    println!(
        "  copying worker: process RSS {:.1} PSS {:.1} USS {:.1} anon {:.1} MiB",
        mib(copy.rss_kib),
        mib(copy.pss_kib),
        mib(copy.uss_kib),
        mib(copy.anon_kib)
    );
    println!(
        "  {WORKERS} shared workers together: mapping PSS {:.1} MiB for {:.1} MiB of weights",
        mib(mapping_pss_total),
        mib(weights_kib)
    );
    // About one copy across the three: not three, and not less than one.
    assert!(
        mapping_pss_total * 10 <= weights_kib * 11 && mapping_pss_total * 10 >= weights_kib * 9,
        "{label}: PSS {mapping_pss_total} KiB is not one copy of {weights_kib} KiB"
    );
    // The copying worker holds its own copy, and the sampler sees one when there is one.
    assert!(
        copy.uss_kib >= weights_kib * 8 / 10 && baseline.peak_anon_kib >= weights_kib * 8 / 10,
        "{label}: copying worker USS {} KiB, peak anon {} KiB for {weights_kib} KiB of weights",
        copy.uss_kib,
        baseline.peak_anon_kib
    );
    // And no hidden private copy: the copying worker's anonymous memory exceeds each shared
    // worker's by about the weights.
    for anon in shared_anon {
        assert!(
            copy.anon_kib >= anon + weights_kib * 8 / 10,
            "{label}: copying worker anon {} KiB vs shared {anon} KiB for {weights_kib} KiB of weights",
            copy.anon_kib
        );
    }
    for w in workers {
        w.finish();
    }
    baseline.finish();
}

fn inputs(dir: &Path, features: usize, dtype: &str) -> std::path::PathBuf {
    let d = dir.join("in");
    make_model(&[
        "inputs",
        d.to_str().unwrap(),
        "--shards",
        "1",
        "--batch",
        "4",
        "--features",
        &features.to_string(),
        "--dtype",
        dtype,
    ]);
    d.join("shard-00000.safetensors")
}

#[test]
fn safetensors_f32_model_is_shared_by_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.safetensors");
    make_model(&[
        "mlp",
        file.to_str().unwrap(),
        "--sizes",
        "4096,4096,4096,256",
    ]);
    let input = inputs(dir.path(), 4096, "f32");
    check_sharing(
        "safetensors f32 Mlp",
        source("m", ModelFormat::Safetensors, &file),
        &input,
    );
}

#[test]
fn safetensors_bf16_model_is_shared_by_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp-bf16.safetensors");
    make_model(&[
        "mlp",
        file.to_str().unwrap(),
        "--sizes",
        "8192,4096,8192,256",
        "--dtype",
        "bf16",
    ]);
    let input = inputs(dir.path(), 8192, "bf16");
    check_sharing(
        "safetensors bf16 Mlp",
        source("m", ModelFormat::Safetensors, &file),
        &input,
    );
}

#[test]
fn torchscript_model_with_batchnorm_buffers_is_shared_by_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.pt");
    make_model(&[
        "script",
        file.to_str().unwrap(),
        "--sizes",
        "4096,4096,4096,256",
    ]);
    let input = inputs(dir.path(), 4096, "f32");
    check_sharing(
        "TorchScript with BatchNorm",
        source("m", ModelFormat::TorchScript, &file),
        &input,
    );
}

/// A frozen module keeps its weights as constants (constants.pkl), not parameters: those are
/// served from the mapping too.
#[test]
fn frozen_torchscript_constants_are_shared_by_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("frozen.pt");
    make_model(&[
        "script",
        file.to_str().unwrap(),
        "--sizes",
        "4096,4096,4096,256",
        "--freeze",
    ]);
    let input = inputs(dir.path(), 4096, "f32");
    check_sharing(
        "frozen TorchScript",
        source("m", ModelFormat::TorchScript, &file),
        &input,
    );
}

/// Set in the child process that [`a_write_to_the_shared_weights_faults_and_changes_nothing`]
/// starts: that child maps the model and writes to it.
const WRITE_PROBE: &str = "KZC_TEST_WRITE_THROUGH_THE_MAPPING";

/// The child's part: maps published model "m" as a worker does (the store and bindings from
/// the pod's environment) and fills its first tensor in place. Reaching the end means the
/// write went through.
fn write_through_the_mapping() {
    let store = kube_zerocopy_fetch::Store::new(std::env::var("KZC_STORE").unwrap());
    let bindings = kube_zerocopy_fetch::Bindings::new(std::env::var("KZC_BINDINGS").unwrap());
    let model = SharedModel::open(&store, &bindings, "m", false).unwrap();
    let name = model.manifest.tensors[0].name.clone();
    let mut tensor = model.tensor(&name).unwrap();
    eprintln!("writing to {name}");
    let written = tensor.f_fill_(7.0);
    eprintln!("the write returned: {written:?}");
    std::process::exit(if written.is_ok() { 0 } else { 3 });
}

/// Workers map the weights read-only and shared: a worker that writes to them in place is
/// stopped (SIGSEGV) instead of changing what the others compute, and the published bytes
/// stay as they were.
#[test]
fn a_write_to_the_shared_weights_faults_and_changes_nothing() {
    if std::env::var_os(WRITE_PROBE).is_some() {
        write_through_the_mapping();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.safetensors");
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", "256,512,16"]);
    let input = inputs(dir.path(), 256, "f32");
    let pod = Pod::new();
    let models = vec![source("m", ModelFormat::Safetensors, &file)];
    succeeded(&pod.publish(&models));
    let (digest, _) = pod.bindings().resolve(&pod.store(), "m").unwrap();
    let blob = pod.store().model_dir(&digest).join("tensors.bin");
    let published = std::fs::read(&blob).unwrap();
    let work = pod.dir.path();

    // A worker holds the mapping: read-only and shared in its maps.
    let before = pod
        .spawn_inspect(&models, "shared", &input, &work.join("before.safetensors"))
        .unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", before.pid())).unwrap();
    let mapped: Vec<&str> = maps
        .lines()
        .filter(|l| l.ends_with(&*blob.to_string_lossy()))
        .collect();
    assert!(!mapped.is_empty(), "tensors.bin is not mapped:\n{maps}");
    for line in &mapped {
        let perms = line.split_whitespace().nth(1).unwrap();
        assert_eq!(perms, "r--s", "{line}");
    }

    // Another worker writes in place: this test binary again, running only the probe.
    let writer = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_write_to_the_shared_weights_faults_and_changes_nothing",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(pod.env(&models))
        .env(WRITE_PROBE, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&writer.stderr);
    use std::os::unix::process::ExitStatusExt;
    println!("the writing worker: {:?}", writer.status);
    assert!(
        stderr.contains("writing to"),
        "the probe did not run: {stderr}"
    );
    assert_eq!(
        writer.status.signal(),
        Some(libc::SIGSEGV),
        "a write through the mapping was not stopped: {stderr}"
    );

    // Nothing changed: the bytes, and what a worker started before and one started after
    // compute.
    assert!(
        std::fs::read(&blob).unwrap() == published,
        "the published bytes changed"
    );
    let after = pod
        .spawn_inspect(&models, "shared", &input, &work.join("after.safetensors"))
        .unwrap();
    let reference = read_output(&work.join("before.safetensors"));
    assert!(read_output(&work.join("after.safetensors")).equal(&reference));
    before.finish();
    after.finish();
}

/// How much of `blob` this process maps, and how much of that is resident (KiB), from
/// /proc/self/smaps; None when it is not mapped at all.
fn mapped_here(blob: &Path) -> Option<MemoryStats> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = blob.to_string_lossy();
    maps.lines()
        .any(|l| l.ends_with(&*name))
        .then(|| MemoryStats::of_mapping("self", blob).unwrap())
}

/// `KZC_PREFAULT` (MAP_POPULATE) makes the whole mapping resident when the model is opened;
/// without it nothing is until a tensor is read. The mapping lives as long as its last
/// tensor, whatever happens to the model that made it, and is gone after.
#[test]
fn the_mapping_is_prefaulted_on_request_and_unmapped_after_its_last_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.safetensors");
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", "512,1024,16"]);
    let pod = Pod::new();
    let models = vec![source("m", ModelFormat::Safetensors, &file)];
    succeeded(&pod.publish(&models));
    let (store, bindings) = (pod.store(), pod.bindings());
    let (digest, manifest) = bindings.resolve(&store, "m").unwrap();
    let blob = store.model_dir(&digest).join("tensors.bin");
    let weights_kib = manifest.tensors_bytes / 1024;

    let lazy = SharedModel::open(&store, &bindings, "m", false).unwrap();
    let untouched = mapped_here(&blob).expect("mapped once opened");
    drop(lazy);
    assert!(
        mapped_here(&blob).is_none(),
        "unmapped with its model, no tensor taken"
    );
    let eager = SharedModel::open(&store, &bindings, "m", true).unwrap();
    let populated = mapped_here(&blob).unwrap();
    println!(
        "{weights_kib} KiB of weights: resident {} KiB when opened, {} KiB when opened with KZC_PREFAULT",
        untouched.rss_kib, populated.rss_kib
    );
    assert!(untouched.rss_kib * 10 < weights_kib, "{untouched:?}");
    assert!(populated.rss_kib * 10 >= weights_kib * 9, "{populated:?}");

    let name = manifest.tensors[0].name.clone();
    let tensor = eager.tensor(&name).unwrap();
    let copy = tensor.copy();
    drop(eager);
    assert!(
        mapped_here(&blob).is_some(),
        "the mapping went away under a live tensor"
    );
    assert!(tensor.equal(&copy));
    drop(tensor);
    assert!(
        mapped_here(&blob).is_none(),
        "still mapped after its last tensor"
    );
}
