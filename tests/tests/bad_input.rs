//! Bad input: each case gives an error naming the model and the cause, a non-zero exit, and
//! nothing published (no model folder, no staging left behind, no bindings).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use kube_zerocopy_e2e::{make_model, source, succeeded, Pod, SmallTmpfs};
use kube_zerocopy_fetch::{ModelFormat, ModelSource};

/// Publishes and expects a failure whose message contains `cause`.
fn expect_rejected(pod: &Pod, model: ModelSource, cause: &str) -> String {
    let out = pod.publish(std::slice::from_ref(&model));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_owned();
    println!("{error}");
    assert!(!out.status.success(), "publish of {} succeeded", model.uri);
    assert!(
        error.contains(&format!("model {:?}", model.name)),
        "error does not name the model: {error}"
    );
    assert!(error.contains(cause), "error lacks {cause:?}: {error}");
    // What Kubernetes shows as the container's termination message: the same words.
    let termination = std::fs::read_to_string(pod.termination_log()).unwrap();
    assert_eq!(
        Some(termination.as_str()),
        error.strip_prefix("error: "),
        "termination message"
    );
    assert!(
        pod.published().is_empty(),
        "something was published: {:?}",
        pod.published()
    );
    assert!(
        pod.staging().is_empty(),
        "staging left behind: {:?}",
        pod.staging()
    );
    assert!(
        pod.bindings().read().unwrap().is_none(),
        "bindings were written"
    );
    error
}

fn small_mlp(dir: &Path) -> PathBuf {
    let file = dir.join("mlp.safetensors");
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", "64,128,10"]);
    file
}

fn small_script(dir: &Path) -> PathBuf {
    let file = dir.join("net.pt");
    make_model(&["script", file.to_str().unwrap(), "--sizes", "64,128,10"]);
    file
}

/// A safetensors file from a raw JSON header and data section.
fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn truncated_safetensors_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_mlp(dir.path());
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::Safetensors, &file),
        "not a valid safetensors file",
    );
}

#[test]
fn safetensors_header_with_overlapping_offsets_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("overlap.safetensors");
    raw_safetensors(
        &file,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::Safetensors, &file),
        "not a valid safetensors file",
    );
}

#[test]
fn safetensors_header_running_past_the_end_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("overrun.safetensors");
    raw_safetensors(
        &file,
        r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#,
        16,
    );
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::Safetensors, &file),
        "not a valid safetensors file",
    );
}

/// Rewrites a TorchScript archive without one of its records.
fn drop_record(from: &Path, to: &Path, suffix: &str) {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(from).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(to).unwrap());
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    let mut dropped = false;
    for name in names {
        if name.ends_with(suffix) {
            dropped = true;
            continue;
        }
        out.raw_copy_file(zip.by_name(&name).unwrap()).unwrap();
    }
    out.finish().unwrap();
    assert!(dropped, "no record ends with {suffix}");
}

#[test]
fn torchscript_archive_missing_a_storage_record_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_script(dir.path());
    let broken = dir.path().join("broken.pt");
    drop_record(&file, &broken, "/data/1");
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::TorchScript, &broken),
        "missing record",
    );
}

#[test]
fn torchscript_archive_missing_its_pickle_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_script(dir.path());
    let broken = dir.path().join("broken.pt");
    drop_record(&file, &broken, "/data.pkl");
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::TorchScript, &broken),
        "missing its record data.pkl",
    );
}

#[test]
fn a_file_that_is_not_an_archive_is_rejected_as_torchscript() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_mlp(dir.path());
    expect_rejected(
        &Pod::new(),
        source("encoder", ModelFormat::TorchScript, &file),
        "not a valid zip file",
    );
}

#[test]
fn wrong_sha256_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_mlp(dir.path());
    let model = ModelSource {
        sha256: Some("0".repeat(64)),
        ..source("encoder", ModelFormat::Safetensors, &file)
    };
    expect_rejected(&Pod::new(), model, "sha256 mismatch");
}

#[test]
fn missing_source_file_is_rejected() {
    let model = source(
        "encoder",
        ModelFormat::Safetensors,
        Path::new("/nonexistent/model.safetensors"),
    );
    expect_rejected(&Pod::new(), model, "cannot open source");
}

#[test]
fn unreachable_http_source_is_rejected() {
    // A port that nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = ModelSource {
        uri: format!("http://127.0.0.1:{port}/model.safetensors"),
        ..source("encoder", ModelFormat::Safetensors, Path::new("/x"))
    };
    expect_rejected(&Pod::new(), model, "is unreachable");
}

/// Serves `file` at /model and answers 404 elsewhere, on 127.0.0.1, for a bounded number of
/// requests.
fn serve_once(file: PathBuf) -> (String, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", server.server_addr().to_ip().unwrap());
    let handle = std::thread::spawn(move || {
        // Each source is asked a HEAD (for its size and ranges), then a GET (this server
        // offers no ranges): the model, then the missing file.
        for _ in 0..4 {
            let Ok(Some(request)) = server.recv_timeout(std::time::Duration::from_secs(20)) else {
                return;
            };
            if request.url() == "/model" {
                let mut bytes = Vec::new();
                std::fs::File::open(&file)
                    .unwrap()
                    .read_to_end(&mut bytes)
                    .unwrap();
                request
                    .respond(tiny_http::Response::from_data(bytes))
                    .unwrap();
            } else {
                request
                    .respond(tiny_http::Response::from_string("no").with_status_code(404))
                    .unwrap();
            }
        }
    });
    (addr, handle)
}

#[test]
fn http_source_is_published_and_http_404_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = small_mlp(dir.path());
    let (addr, server) = serve_once(file.clone());
    let digest = kube_zerocopy_e2e::sha256_of(&file);
    let pod = Pod::new();
    let good = ModelSource {
        uri: format!("{addr}/model"),
        sha256: Some(digest.clone()),
        ..source("encoder", ModelFormat::Safetensors, &file)
    };
    let out = pod.publish(std::slice::from_ref(&good));
    succeeded(&out);
    assert_eq!(pod.published(), vec![digest]);

    let missing = ModelSource {
        uri: format!("{addr}/nothing"),
        sha256: None,
        ..good
    };
    expect_rejected(&Pod::new(), missing, "answered HTTP 404");
    server.join().unwrap();
}

/// A shared-memory folder too small for the model: a 1 MiB tmpfs.
#[test]
fn full_shared_memory_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.safetensors");
    make_model(&["mlp", file.to_str().unwrap(), "--sizes", "1024,1024,10"]);
    let shm = SmallTmpfs::mount(dir.path(), "1m");
    let pod = Pod::in_dir(&shm.path);
    expect_rejected(
        &pod,
        source("encoder", ModelFormat::Safetensors, &file),
        "shared memory is full",
    );
    // The space is given back: a model that fits publishes afterwards.
    let small = dir.path().join("small.safetensors");
    make_model(&["mlp", small.to_str().unwrap(), "--sizes", "64,64,10"]);
    let out = pod.publish(&[source("encoder", ModelFormat::Safetensors, &small)]);
    succeeded(&out);
    std::io::stdout().flush().unwrap();
}

/// Publishes `model` with the real weight server, then runs a Task worker on the one shard file
/// (2 rows of `features`) of an input in `d`, its output in `d/output`: the pod (its
/// termination message) and what the worker did.
fn run_one_shard(d: &Path, model: ModelSource, features: usize) -> (Pod, Output) {
    let input = d.join("input");
    let features = features.to_string();
    let shape = ["--shards", "1", "--batch", "2", "--features", &features];
    make_model(&[&["inputs", input.to_str().unwrap()][..], &shape[..]].concat());
    let pod = Pod::new();
    let models = [model];
    succeeded(&pod.publish(&models));
    let out = pod
        .command("kube-zerocopy-worker", &models)
        .args(["task", "--shard-index", "0", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(d.join("output"))
        .output()
        .unwrap();
    (pod, out)
}

/// A TorchScript model that returns two tensors: the worker refuses it in words with the
/// shard's exit code (its index fails at once, without retries), and writes no output; never
/// the first tensor alone as if it were all.
#[test]
fn a_model_that_returns_several_tensors_is_refused_not_cut_to_its_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("pair.pt");
    make_model(&["pair", model.to_str().unwrap(), "--sizes", "32,4"]);
    let (_pod, out) = run_one_shard(d, source("pair", ModelFormat::TorchScript, &model), 32);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("forward returned a tuple of 2 values; a model must return one tensor"),
        "{stderr}"
    );
    assert!(!d.join("output/shard-00000.safetensors").exists());
}

/// A safetensors state dict that is not the built-in Mlp (an encoder's tensors): published (it
/// is a valid file), then refused by the worker in words with the permanent exit code, before
/// any shard is read: it would be mapped again, and fail again, for every shard.
#[test]
fn a_state_dict_the_worker_cannot_build_fails_the_task_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("encoder.safetensors");
    raw_safetensors(
        &model,
        r#"{"encoder.embed.weight":{"dtype":"F32","shape":[4,8],"data_offsets":[0,128]}}"#,
        128,
    );
    let (_pod, out) = run_one_shard(d, source("encoder", ModelFormat::Safetensors, &model), 8);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("has no layers.<i>.weight tensors: not an Mlp"),
        "{stderr}"
    );
    assert!(!d.join("output").join("shard-00000.safetensors").exists());
}

/// An input whose width the TorchScript model does not take: libtorch's own words for what
/// failed (the shapes), not only "the following operation failed in the TorchScript
/// interpreter", in the error line and the termination message; the shard's exit code (its
/// index fails at once; the other shards go on).
#[test]
fn a_shape_the_model_does_not_take_is_said_in_libtorchs_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = small_script(d);
    let (pod, out) = run_one_shard(d, source("net", ModelFormat::TorchScript, &model), 32);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    println!("{error}");
    assert!(
        error.contains("RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x32 and 64x128)"),
        "{stderr}"
    );
    let termination = std::fs::read_to_string(pod.termination_log()).unwrap();
    assert_eq!(Some(termination.as_str()), error.strip_prefix("error: "));
}

/// A worker asked for cuda on a machine without a GPU: exit code 1 and the cause in its words
/// (libtorch's CUDA backend missing, or loaded and seeing no device: which one depends on the
/// torch build set up here), as the log's error line and as the termination message; a device
/// that is no device is refused the same way.
#[test]
fn a_cuda_worker_without_a_gpu_refuses_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let pod = Pod::new();
    let models = [source(
        "encoder",
        ModelFormat::Safetensors,
        &small_mlp(dir.path()),
    )];
    succeeded(&pod.publish(&models));
    let no_gpu = [
        "error: device cuda: cannot load libtorch's CUDA backend",
        "error: device cuda: libtorch sees no CUDA device",
    ];
    let no_device = ["error: device \"cuda:one\": use cpu, cuda or cuda:N"];
    for (device, causes) in [("cuda", &no_gpu[..]), ("cuda:one", &no_device[..])] {
        let port = kube_zerocopy_e2e::cluster::free_port().unwrap();
        let out = pod
            .command("kube-zerocopy-worker", &models)
            .args(["actor", "--listen", &format!("127.0.0.1:{port}")])
            .env("KZC_DEVICE", device)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default();
        println!("{device}: {error}");
        assert_eq!(out.status.code(), Some(1), "{device}: {stderr}");
        assert!(
            causes.iter().any(|c| error.starts_with(c)),
            "{device}: the error is none of {causes:?}: {stderr}"
        );
        let termination = std::fs::read_to_string(pod.termination_log()).unwrap();
        assert_eq!(Some(termination.as_str()), error.strip_prefix("error: "));
    }
}
