//! Task mode end to end: `kube-zerocopy local run` runs a two-model pipeline over every shard
//! with real sidecar and worker processes; the outputs equal the models run the ordinary way;
//! a re-run shard replaces its output whole.

use std::path::Path;

use kube_zerocopy_batch::shards::list_shards;
use kube_zerocopy_e2e::{bin, make_model, read_output, source, succeeded, Pod};
use kube_zerocopy_fetch::ModelFormat;
use kube_zerocopy_worker::task::{read_input, write_output};
use kube_zerocopy_worker::LoadedModel;

fn pipeline_yaml(dir: &Path, parallelism: usize) -> String {
    format!(
        r#"apiVersion: kube-zerocopy.io/v1alpha1
kind: InferencePipeline
metadata: {{name: test-task}}
spec:
  mode: Task
  models:
    - {{name: encoder, format: TorchScript, source: {{uri: "file://{d}/encoder.pt"}}}}
    - {{name: head, format: Safetensors, architecture: Mlp, source: {{uri: "file://{d}/head.safetensors"}}}}
  input: {{uri: "file://{d}/input"}}
  output: {{uri: "file://{d}/output"}}
  task: {{parallelism: {parallelism}}}
"#,
        d = dir.display()
    )
}

#[test]
fn local_run_processes_every_shard_like_the_ordinary_models() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_model(&[
        "script",
        d.join("encoder.pt").to_str().unwrap(),
        "--sizes",
        "128,256,64",
    ]);
    make_model(&[
        "mlp",
        d.join("head.safetensors").to_str().unwrap(),
        "--sizes",
        "64,32,5",
    ]);
    make_model(&[
        "inputs",
        d.join("input").to_str().unwrap(),
        "--shards",
        "6",
        "--batch",
        "4",
        "--features",
        "128",
    ]);
    std::fs::write(d.join("pipeline.yaml"), pipeline_yaml(d, 3)).unwrap();

    let out = std::process::Command::new(bin("kube-zerocopy"))
        .args(["local", "run", "--json", "-f"])
        .arg(d.join("pipeline.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "local run failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("{summary}");
    assert_eq!(summary["succeeded"], 6);
    assert!(summary["median_memory"]["pss_kib"].as_u64().unwrap() > 0);

    let encoder = LoadedModel::load_copying(
        &d.join("encoder.pt"),
        &source("encoder", ModelFormat::TorchScript, &d.join("encoder.pt")),
        tch::Device::Cpu,
    )
    .unwrap();
    let head = LoadedModel::load_copying(
        &d.join("head.safetensors"),
        &source(
            "head",
            ModelFormat::Safetensors,
            &d.join("head.safetensors"),
        ),
        tch::Device::Cpu,
    )
    .unwrap();
    for shard in list_shards(&d.join("input")).unwrap() {
        let expected = head
            .forward(&encoder.forward(&read_input(&shard).unwrap()).unwrap())
            .unwrap();
        let got = read_output(&d.join("output").join(shard.file_name().unwrap()));
        assert!(got.equal(&expected), "shard {} differs", shard.display());
    }
    // And equal to PyTorch's own run of the chain, which shares no code with the worker (its
    // Mlp and safetensors reading included).
    make_model(&[
        "forward",
        d.join("pytorch").to_str().unwrap(),
        "--input",
        d.join("input").to_str().unwrap(),
        "--chain",
        &format!(
            "{},{}",
            d.join("encoder.pt").display(),
            d.join("head.safetensors").display()
        ),
    ]);
    for shard in list_shards(&d.join("input")).unwrap() {
        let name = shard.file_name().unwrap();
        let got = read_output(&d.join("output").join(name));
        let pytorch = read_output(&d.join("pytorch").join(name));
        assert_eq!(got.size(), pytorch.size(), "shard {}", shard.display());
        assert!(
            got.allclose(&pytorch, 1e-5, 1e-6, false),
            "shard {} differs from PyTorch's: max difference {}",
            shard.display(),
            (&got - &pytorch).abs().max()
        );
    }
    // The pod's shared-memory folder is gone after the run.
    let leftovers = std::fs::read_dir("/dev/shm/kube-zerocopy-local")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("test-task-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leftovers, 0);
}

#[test]
fn a_rerun_shard_replaces_its_output_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_model(&[
        "mlp",
        d.join("m.safetensors").to_str().unwrap(),
        "--sizes",
        "32,16,4",
    ]);
    make_model(&[
        "inputs",
        d.join("input").to_str().unwrap(),
        "--shards",
        "2",
        "--batch",
        "2",
        "--features",
        "32",
    ]);
    let pod = Pod::new();
    let models = [source(
        "m",
        ModelFormat::Safetensors,
        &d.join("m.safetensors"),
    )];
    assert!(pod.publish(&models).status.success());
    let run = || {
        let out = pod
            .command("kube-zerocopy-worker", &models)
            .args(["task", "--shard-index", "1", "--input"])
            .arg(d.join("input"))
            .arg("--output")
            .arg(d.join("output"))
            .output()
            .unwrap();
        succeeded(&out);
    };
    run();
    let target = d.join("output/shard-00001.safetensors");
    let first_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&target).unwrap());
    let first = read_output(&target);
    run();
    let second_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&target).unwrap());
    // Replaced by a rename (a new file), with the same content; no temporary file left.
    assert_ne!(first_inode, second_inode);
    assert!(read_output(&target).equal(&first));
    let mut names: Vec<String> = std::fs::read_dir(d.join("output"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["_kube-zerocopy", "shard-00001.safetensors"]);
    // Its record, once: one of the run's 2 shards committed, so no manifest yet.
    let records: Vec<_> = std::fs::read_dir(d.join("output/_kube-zerocopy/runs/run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(records, ["shard-00001.json"]);
    // A shard index past the input is an error naming the count.
    let out = pod
        .command("kube-zerocopy-worker", &models)
        .args(["task", "--shard-index", "7", "--input"])
        .arg(d.join("input"))
        .arg("--output")
        .arg(d.join("output"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds 2 shard files"));
    // An input folder that disagrees with the pipeline's shard count fails every shard with
    // exit code 3 (the Job's pod failure policy then fails the Job at once), also a shard
    // that exists: with 3 declared, shard 2 would fail; with 1, shard 1 would be skipped.
    for declared in ["1", "3"] {
        let out = pod
            .command("kube-zerocopy-worker", &models)
            .args([
                "task",
                "--shard-index",
                "0",
                "--shards",
                declared,
                "--input",
            ])
            .arg(d.join("input"))
            .arg("--output")
            .arg(d.join("output"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "holds 2 shard files, the pipeline declares {declared}"
            )),
            "{stderr}"
        );
    }
}

/// Two pods writing one shard at once (a retry overlapping a slow pod): each writes its own
/// temporary file, so the output is always one whole file. With temporary names made from the
/// process id, which is 1 in every container, they wrote into each other's file.
#[test]
fn concurrent_writers_of_one_shard_never_mix_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("output");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let out = out.clone();
            std::thread::spawn(move || {
                let t =
                    tch::Tensor::full([256, 256], w as f64, (tch::Kind::Float, tch::Device::Cpu));
                for _ in 0..25 {
                    write_output(&out, "shard-00000.safetensors", &t).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let got = read_output(&out.join("shard-00000.safetensors"));
    let first = got.flatten(0, -1).double_value(&[0]);
    assert!(
        got.eq(first).all().int64_value(&[]) == 1,
        "the output mixes two writers"
    );
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "temporary files left: {names:?}");
}
