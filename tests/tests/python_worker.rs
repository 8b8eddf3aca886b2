//! The Python worker runs a user's own PyTorch module (`tests/python/kzc_test_models.py`: an
//! attention block with tied weights, built on the meta device) on weights the real weight
//! server published: every parameter and buffer lies in a mapping of the store's
//! `tensors.bin`, the tied pair is one tensor, and the output equals what plain PyTorch
//! computes from the same seeded module. Code that fails says so in Python's words, for good.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube_zerocopy_e2e::{
    bin, metric_value, read_answer, read_output, repo, source, start_actor_with, succeeded, Pod,
};
use kube_zerocopy_fetch::{ModelFormat, ModelSource};
use kube_zerocopy_runtime::process::EXIT_PERMANENT;
use kube_zerocopy_worker::oip;

fn python() -> String {
    let venv = std::env::var("KZC_VENV").expect("KZC_VENV (run through `make test`)");
    format!("{venv}/bin/python")
}

/// Where the embedded interpreter finds torch (the project's environment), the project's
/// package, and the user's code: what the Python runtime image has installed.
fn python_path() -> String {
    let site = Command::new(python())
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .unwrap();
    let site = String::from_utf8(site.stdout).unwrap();
    [
        repo().join("python/src"),
        repo().join("tests/python"),
        PathBuf::from(site.trim()),
    ]
    .map(|p| p.display().to_string())
    .join(":")
}

/// Runs one of `tests/python`'s scripts, which write a model's weights, an input and the
/// reference output computed by plain PyTorch (or transformers) into `dir`.
fn write_model(script: &str, dir: &Path, args: &[&str]) {
    let status = Command::new(python())
        .arg(repo().join("tests/python").join(script))
        .arg(dir)
        .args(args)
        .env("PYTHONPATH", python_path())
        .status()
        .unwrap();
    assert!(status.success(), "{script} {args:?} failed");
}

/// The seeded block's weights, an input and plain PyTorch's output, written into `dir`.
fn make_block(dir: &Path) {
    write_model("kzc_test_models.py", dir, &[]);
}

fn block(dir: &Path, entry_point: &str) -> ModelSource {
    ModelSource {
        python_entry_point: Some(entry_point.into()),
        ..source(
            "block",
            ModelFormat::Safetensors,
            &dir.join("block.safetensors"),
        )
    }
}

fn worker(pod: &Pod, binary: &str, models: &[ModelSource]) -> Command {
    let mut command = pod.command(binary, models);
    command.env("PYTHONPATH", python_path());
    command
}

#[test]
fn a_users_pytorch_module_runs_on_the_mapped_weights_and_answers_as_pytorch_does() {
    let pod = Pod::new();
    let dir = pod.dir.path();
    make_block(dir);
    let models = [block(dir, "kzc_test_models:build")];
    succeeded(&pod.publish(&models));
    let (_, manifest) = pod.bindings().resolve(&pod.store(), "block").unwrap();

    let output = dir.join("output.safetensors");
    let command = worker(&pod, "kube-zerocopy-python-worker", &models);
    let inspected =
        Pod::spawn_inspect_with(command, "shared", &dir.join("input.safetensors"), &output)
            .unwrap();
    let report = &inspected.report["models"][0];
    println!("python worker: {report}");
    // Every tensor the module runs with, the tied decoder's weight among them, lies in a
    // mapping of the published file: nothing was copied, not even while the module was built.
    assert_eq!(report["outside_mapping"], serde_json::json!([]), "{report}");
    let names = report["tensors"].as_u64().unwrap();
    assert!(
        names as usize > manifest.tensors.len(),
        "the tied weight is listed under both names: {report}"
    );
    let listed = report["tensor_bytes"].as_u64().unwrap();
    assert!(listed >= manifest.tensors_bytes, "{report}");
    inspected.finish();

    let reference = read_output(&dir.join("reference.safetensors"));
    let answer = read_output(&output);
    assert_eq!(answer.size(), reference.size());
    let difference = (&answer - &reference).abs().max().double_value(&[]);
    assert!(difference <= 1e-5, "differs from PyTorch by {difference}");
}

#[test]
fn a_python_pipeline_runs_locally_shard_by_shard_as_on_a_cluster() {
    let pod = Pod::new();
    let dir = pod.dir.path();
    make_block(dir);
    // Two shards: the input's rows split in halves.
    let input = tch::Tensor::read_safetensors(dir.join("input.safetensors"))
        .unwrap()
        .remove(0)
        .1;
    std::fs::create_dir(dir.join("input")).unwrap();
    for (i, rows) in input.chunk(2, 0).iter().enumerate() {
        let shard = dir.join(format!("input/part-{i}.safetensors"));
        tch::Tensor::write_safetensors(&[("input", rows)], shard).unwrap();
    }
    let pipeline = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: block}}\n\
         spec:\n  mode: Task\n  models:\n    - name: block\n      format: Safetensors\n      \
         python: {{entryPoint: 'kzc_test_models:build'}}\n      \
         source: {{uri: 'file://{d}/block.safetensors'}}\n  \
         input: {{uri: 'file://{d}/input'}}\n  output: {{uri: 'file://{d}/output'}}\n  \
         template: {{image: 'registry.example/block:1'}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("pipeline.yaml"), pipeline).unwrap();
    let out = Command::new(bin("kube-zerocopy"))
        .args(["local", "run", "--json", "-f"])
        .arg(dir.join("pipeline.yaml"))
        .env("PYTHONPATH", python_path())
        .output()
        .unwrap();
    let said = succeeded(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {stdout}\n{said}"));
    assert_eq!(summary["succeeded"], 2, "{summary}");
    let reference = read_output(&dir.join("reference.safetensors"));
    for (i, expected) in reference.chunk(2, 0).iter().enumerate() {
        let answer = read_output(&dir.join(format!("output/part-{i}.safetensors")));
        let difference = (&answer - expected).abs().max().double_value(&[]);
        assert!(difference <= 1e-5, "shard {i} differs by {difference}");
    }
}

/// Three Python workers map one copy of a 256 MiB module's weights (the PSS of the mapping sums
/// to one copy), none held a private copy while it loaded (its anonymous memory, sampled every
/// millisecond, never rose by the weights), and each answers as PyTorch does; a worker whose
/// code loads the ordinary way holds its own copy beyond the others' memory, which the same
/// figures show.
#[test]
fn three_python_workers_map_one_copy_and_none_copies_while_loading() {
    use kube_zerocopy_worker::memory::MemoryStats;

    let pod = Pod::new();
    let dir = pod.dir.path();
    write_model("kzc_test_models.py", dir, &["wide"]);
    let wide = |entry_point: &str| ModelSource {
        python_entry_point: Some(entry_point.into()),
        ..source(
            "wide",
            ModelFormat::Safetensors,
            &dir.join("wide.safetensors"),
        )
    };
    let shared = [wide("kzc_test_models:build_wide")];
    succeeded(&pod.publish(&shared));
    let (digest, manifest) = pod.bindings().resolve(&pod.store(), "wide").unwrap();
    let weights_kib = manifest.tensors_bytes / 1024;
    let blob = pod.store().model_dir(&digest).join("tensors.bin");
    let input = dir.join("wide-input.safetensors");
    let spawn = |models: &[ModelSource], output: &str| {
        let command = worker(&pod, "kube-zerocopy-python-worker", models);
        Pod::spawn_inspect_with(command, "shared", &input, &dir.join(output)).unwrap()
    };
    let workers: Vec<_> = (0..3)
        .map(|i| spawn(&shared, &format!("shared-{i}.safetensors")))
        .collect();
    let copying = spawn(
        &[wide("kzc_test_models:build_wide_copying")],
        "copying.safetensors",
    );

    let reference = read_output(&dir.join("wide-reference.safetensors"));
    // The copying worker read its copy from the mapping too: a fourth sharer of its pages.
    let mut pss_total = MemoryStats::of_mapping(&copying.pid(), &blob)
        .unwrap()
        .pss_kib;
    let mut shared_anon = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let answer = read_output(&dir.join(format!("shared-{i}.safetensors")));
        let difference = (&answer - &reference).abs().max().double_value(&[]);
        assert!(
            difference <= 1e-4,
            "worker {i} differs from PyTorch by {difference}"
        );
        let mapping = MemoryStats::of_mapping(&w.pid(), &blob).unwrap();
        let process = MemoryStats::of_process(&w.pid()).unwrap();
        println!(
            "python worker {i}: mapping RSS {} PSS {} KiB; process anon {} KiB, peak anon while loading {} KiB; weights {weights_kib} KiB",
            mapping.rss_kib, mapping.pss_kib, process.anon_kib, w.peak_anon_kib
        );
        assert!(
            mapping.rss_kib * 10 >= weights_kib * 9,
            "worker {i}: {mapping:?}"
        );
        assert!(
            w.peak_anon_kib <= process.anon_kib + weights_kib / 5,
            "worker {i}'s anonymous memory reached {} KiB while loading, {} KiB now",
            w.peak_anon_kib,
            process.anon_kib
        );
        pss_total += mapping.pss_kib;
        shared_anon.push(process.anon_kib);
    }
    // The worker's own mapping and the package's are one file's pages: counted once.
    assert!(
        pss_total * 10 <= weights_kib * 11 && pss_total * 10 >= weights_kib * 9,
        "PSS {pss_total} KiB is not one copy of {weights_kib} KiB"
    );
    let copy = MemoryStats::of_process(&copying.pid()).unwrap();
    println!(
        "copying python worker: {copy:?}, peak anon {} KiB",
        copying.peak_anon_kib
    );
    // The interpreter and torch are in every worker's anonymous memory; the copy is beyond.
    for anon in shared_anon {
        assert!(
            copy.anon_kib >= anon + weights_kib * 8 / 10,
            "the copying worker's anonymous memory {} KiB, a sharing one's {anon} KiB, for {weights_kib} KiB of weights",
            copy.anon_kib
        );
    }
    for w in workers {
        w.finish();
    }
    copying.finish();
}

/// Infers `input` from a replica: the status, and the output or the error's words.
fn infer(base: &str, input: &tch::Tensor) -> (u16, Result<tch::Tensor, String>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let (body, json_length) = oip::encode_request(input).unwrap();
    let response = agent
        .post(format!("{base}/v2/models/block/infer"))
        .header(oip::HEADER_LENGTH, json_length.to_string())
        .send(&body[..])
        .unwrap();
    let (status, json_length, bytes) = read_answer(response);
    match status {
        200 => (status, Ok(oip::decode_answer(&bytes, json_length).unwrap())),
        _ => (status, Err(String::from_utf8_lossy(&bytes).into_owned())),
    }
}

#[test]
fn a_python_replica_batches_requests_through_the_users_module_and_survives_a_bad_one() {
    let pod = Pod::new();
    let dir = pod.dir.path();
    make_block(dir);
    let models = [block(dir, "kzc_test_models:build")];
    succeeded(&pod.publish(&models));
    let command = worker(&pod, "kube-zerocopy-python-worker", &models);
    let (_actor, base) = start_actor_with(
        command,
        &[
            "--model-name",
            "block",
            "--max-batch-rows",
            "6",
            "--max-batch-delay-ms",
            "500",
        ],
    );
    let input = tch::Tensor::read_safetensors(dir.join("input.safetensors"))
        .unwrap()
        .remove(0)
        .1;
    let reference = read_output(&dir.join("reference.safetensors"));
    // Three clients at once, two rows each: batched together, each answered its own rows.
    std::thread::scope(|scope| {
        let answers: Vec<_> = (0..3i64)
            .map(|i| {
                let rows = input.narrow(0, 2 * i, 2);
                let base = &base;
                scope.spawn(move || infer(base, &rows))
            })
            .collect();
        for (i, answer) in answers.into_iter().enumerate() {
            let (status, output) = answer.join().unwrap();
            let output = output.unwrap_or_else(|e| panic!("{status}: {e}"));
            let expected = reference.narrow(0, 2 * i as i64, 2);
            let difference = (&output - &expected).abs().max().double_value(&[]);
            assert!(difference <= 1e-5, "client {i} differs by {difference}");
        }
    });
    // Merged: fewer forward passes through the user's module than requests.
    let metrics = ureq::get(format!("{base}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let executions = metric_value(&metrics, "kube_zerocopy_worker_executions_total");
    assert!(executions.is_some_and(|n| n < 3.0), "{metrics}");
    // Rows of the wrong width: refused (the module's own words go to the replica's log), and
    // the replica goes on serving.
    let wrong = tch::Tensor::ones([2, 5], (tch::Kind::Float, tch::Device::Cpu));
    let (status, said) = infer(&base, &wrong);
    assert!(status >= 400, "{status}");
    let said = said.unwrap_err();
    assert!(
        said.contains("cannot run a batch of shape [2, 5]"),
        "{said}"
    );
    let (status, again) = infer(&base, &input.narrow(0, 0, 2));
    assert_eq!(status, 200, "{again:?}");
}

/// A Hugging Face checkpoint as `save_pretrained` writes it (config.json and model.safetensors,
/// the output layer tied to the token embedding and left out), built by transformers' own
/// classes from its config and bound to the mapped weights.
#[test]
fn a_hugging_face_checkpoint_runs_in_transformers_on_the_mapped_weights() {
    let pod = Pod::new();
    let dir = pod.dir.path();
    write_model("kzc_test_hf.py", dir, &[]);
    let checkpoint = dir.join("checkpoint");
    let models = [ModelSource {
        python_entry_point: Some("kzc_test_hf:build".into()),
        ..source(
            "gpt2",
            ModelFormat::Safetensors,
            &checkpoint.join("model.safetensors"),
        )
    }];
    succeeded(&pod.publish(&models));
    let (_, manifest) = pod.bindings().resolve(&pod.store(), "gpt2").unwrap();

    let output = dir.join("output.safetensors");
    let mut command = worker(&pod, "kube-zerocopy-python-worker", &models);
    command.env("KZC_TEST_CHECKPOINT", &checkpoint);
    let inspected =
        Pod::spawn_inspect_with(command, "shared", &dir.join("input.safetensors"), &output)
            .unwrap();
    let report = &inspected.report["models"][0];
    println!("transformers model: {report}");
    // Every weight the model runs with, the tied output layer too, lies in the mapping.
    assert_eq!(report["outside_mapping"], serde_json::json!([]), "{report}");
    assert!(
        report["tensors"].as_u64().unwrap() as usize > manifest.tensors.len(),
        "the tied output layer is listed: {report}"
    );
    inspected.finish();
    let reference = read_output(&dir.join("reference.safetensors"));
    let answer = read_output(&output);
    assert_eq!(answer.size(), reference.size());
    let difference = (&answer - &reference).abs().max().double_value(&[]);
    assert!(
        difference <= 1e-5,
        "differs from transformers by {difference}"
    );
}

#[test]
fn python_code_that_fails_is_refused_in_pythons_words_for_good() {
    let pod = Pod::new();
    let dir = pod.dir.path();
    make_block(dir);
    let input = dir.join("input.safetensors");
    let run = |binary: &str, entry_point: &str| {
        let models = [block(dir, entry_point)];
        succeeded(&pod.publish(&models));
        let out = worker(&pod, binary, &models)
            .args(["inspect", "--input-file"])
            .arg(&input)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, said) = run("kube-zerocopy-python-worker", "kzc_missing_models:build");
    assert_eq!(code, Some(EXIT_PERMANENT), "{said}");
    assert!(
        said.contains("No module named 'kzc_missing_models'"),
        "{said}"
    );

    let (code, said) = run("kube-zerocopy-python-worker", "kzc_test_models:absent");
    assert_eq!(code, Some(EXIT_PERMANENT), "{said}");
    assert!(said.contains("has no 'absent'"), "{said}");

    // A batch's answer the pipeline cannot read fails that batch (not the build).
    let (code, said) = run(
        "kube-zerocopy-python-worker",
        "kzc_test_models:answers_a_tuple",
    );
    assert_ne!(code, Some(0), "{said}");
    assert!(
        said.contains("a batch's answer is tuple; answer a tensor"),
        "{said}"
    );

    // The plain worker has no interpreter, and says what to run instead.
    let (code, said) = run("kube-zerocopy-worker", "kzc_test_models:build");
    assert_eq!(code, Some(EXIT_PERMANENT), "{said}");
    assert!(said.contains("this worker has no Python"), "{said}");
}
