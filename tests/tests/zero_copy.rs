//! Three worker processes map one published model: every parameter and buffer points into
//! the shared mapping, outputs equal the ordinary (copying) load, and together they hold about
//! one copy of the weights (PSS from /proc), while a copying worker holds a private one.

use std::path::Path;

use kube_zerocopy_e2e::{make_model, mib, read_output, source, succeeded, Pod};
use kube_zerocopy_sidecar::{ModelFormat, ModelSource};
use kube_zerocopy_worker::memory::MemoryStats;

const WORKERS: usize = 3;

fn check_sharing(label: &str, model: ModelSource, input: &Path, expect_tensors: bool) {
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
        if expect_tensors {
            assert!(
                m["tensors"].as_u64().unwrap() > 0,
                "{label}: no tensors reported"
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
    // About one copy across the three, not three.
    assert!(
        mapping_pss_total * 10 <= weights_kib * 11,
        "{label}: PSS {mapping_pss_total} KiB is more than one copy"
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
        true,
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
        true,
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
        true,
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
        false,
    );
}
