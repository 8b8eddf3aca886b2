//! Models fetched from a real S3 server (versitygw on 127.0.0.1, `tests/env/src/s3.rs`) by
//! `kube-zerocopy-weight-server publish`: safetensors and TorchScript models streamed by byte ranges
//! into place and laid out as from their files, connections cut midway resumed, a wrong
//! checksum and refused credentials refused with nothing published; and a Task pipeline's
//! shards read from and written to S3 prefixes, planned without counting, with a manifest.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kube_zerocopy_e2e::azure::AzureServer;
use kube_zerocopy_e2e::s3::S3Server;
use kube_zerocopy_e2e::{make_model, sha256_of, source, Pod};
use kube_zerocopy_fetch::layout::TENSORS_FILE;
use kube_zerocopy_fetch::{AzureAccess, ModelFormat, ModelSource, S3Access};
use sha2::Digest;

const BUCKET: &str = "models";

/// A model file made by scripts/make_models.py in `dir`.
fn model_file(dir: &Path, kind: &str, name: &str, sizes: &str) -> PathBuf {
    let path = dir.join(name);
    make_model(&[kind, path.to_str().unwrap(), "--sizes", sizes]);
    path
}

/// A credentials folder as the operator mounts one from a Secret.
fn credentials(dir: &Path, access_key: &str, secret_key: &str) -> PathBuf {
    let creds = dir.join("s3");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("AWS_ACCESS_KEY_ID"), access_key).unwrap();
    std::fs::write(
        creds.join("AWS_SECRET_ACCESS_KEY"),
        format!("{secret_key}\n"),
    )
    .unwrap();
    creds
}

/// `file` as the model `m` at s3://models/<its file name> on `endpoint`.
fn s3_model(
    file: &Path,
    format: ModelFormat,
    endpoint: &str,
    server: &S3Server,
    creds: &Path,
) -> ModelSource {
    let key = file.file_name().unwrap().to_str().unwrap();
    ModelSource {
        uri: format!("s3://{BUCKET}/{key}"),
        s3: Some(S3Access {
            endpoint: Some(endpoint.to_owned()),
            region: Some(server.region.clone()),
            credentials_dir: Some(creds.to_string_lossy().into_owned()),
        }),
        ..source("m", format, file)
    }
}

/// A server with the bucket and `files` in it.
fn server_with(files: &[&Path]) -> S3Server {
    let server = S3Server::start().unwrap();
    server.create_bucket(BUCKET).unwrap();
    for file in files {
        let key = file.file_name().unwrap().to_str().unwrap();
        server.put_file(BUCKET, key, file).unwrap();
    }
    server
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The published model's tensors file, published alone in `pod`.
fn tensors_of(pod: &Pod, digest: &str) -> Vec<u8> {
    std::fs::read(pod.store.join("blobs").join(digest).join(TENSORS_FILE)).unwrap()
}

#[test]
fn models_are_published_from_s3_as_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let weights = model_file(dir.path(), "mlp", "head.safetensors", "512,4096,1024");
    let script = model_file(dir.path(), "script", "encoder.pt", "128,256,64");
    let server = server_with(&[&weights, &script]);
    let creds = credentials(dir.path(), &server.access_key, &server.secret_key);

    for (file, format) in [
        (&weights, ModelFormat::Safetensors),
        (&script, ModelFormat::TorchScript),
    ] {
        let from_s3 = Pod::new();
        let out = from_s3.publish(&[s3_model(file, format, &server.endpoint, &server, &creds)]);
        assert!(out.status.success(), "{}", stderr(&out));
        let digest = sha256_of(file);
        assert_eq!(
            from_s3.published(),
            std::slice::from_ref(&digest),
            "{format:?}"
        );
        assert!(
            stderr(&out).contains("fetched into place"),
            "{}",
            stderr(&out)
        );
        let from_file = Pod::new();
        let out = from_file.publish(&[source("m", format, file)]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            tensors_of(&from_s3, &digest) == tensors_of(&from_file, &digest),
            "{format:?}: laid out as from the file"
        );
        assert!(from_s3.staging().is_empty());
        // Nothing on disk: streamed into the store.
        let downloads = from_s3.dir.path().join("downloads");
        assert_eq!(
            std::fs::read_dir(&downloads).map_or(0, |d| d.count()),
            0,
            "{format:?}: files left in {}",
            downloads.display()
        );
    }
}

/// A TCP proxy in front of `target` that cuts the first `cuts` connections (both ways) on
/// which more than `after` bytes of answers went through: ranges of tensors, not the small
/// answers before them. Counts the cuts.
struct CuttingProxy {
    endpoint: String,
    cut: Arc<AtomicUsize>,
}

impl CuttingProxy {
    fn start(target: &str, cuts: usize, after: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let target = target.trim_start_matches("http://").to_owned();
        let cut = Arc::new(AtomicUsize::new(0));
        let counted = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = TcpStream::connect(&target).unwrap();
                let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c, s, usize::MAX, || false));
                let counted = counted.clone();
                std::thread::spawn(move || {
                    // Cut here if fewer than `cuts` connections were cut so far.
                    let take_a_cut = || {
                        counted
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                (n < cuts).then_some(n + 1)
                            })
                            .is_ok()
                    };
                    pipe(server, client, after, take_a_cut)
                });
            }
        });
        CuttingProxy { endpoint, cut }
    }
}

/// Copies `from` to `to` until either closes. Once `after` bytes went through, asks `cut`
/// once whether to shut both down there.
fn pipe(mut from: TcpStream, mut to: TcpStream, after: usize, cut: impl FnOnce() -> bool) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0;
    let mut cut = Some(cut);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sent + n > after && cut.take().is_some_and(|cut| cut()) {
            let _ = to.write_all(&buf[..after - sent]);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn connections_cut_mid_fetch_are_resumed_and_the_model_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB: eight ranges of 8 MiB.
    let weights = model_file(dir.path(), "mlp", "big.safetensors", "2048,8192,8");
    let server = server_with(&[&weights]);
    let creds = credentials(dir.path(), &server.access_key, &server.secret_key);
    let proxy = CuttingProxy::start(&server.endpoint, 3, 3 << 20);
    let pod = Pod::new();
    let model = s3_model(
        &weights,
        ModelFormat::Safetensors,
        &proxy.endpoint,
        &server,
        &creds,
    );
    let out = pod.publish(&[ModelSource {
        sha256: Some(sha256_of(&weights)),
        ..model
    }]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(proxy.cut.load(Ordering::SeqCst), 3, "three connections cut");
    assert!(
        stderr(&out).contains("range broken off; resuming it"),
        "{}",
        stderr(&out)
    );
    let digest = sha256_of(&weights);
    assert_eq!(pod.published(), std::slice::from_ref(&digest));
    let from_file = Pod::new();
    assert!(from_file
        .publish(&[source("m", ModelFormat::Safetensors, &weights)])
        .status
        .success());
    assert!(tensors_of(&pod, &digest) == tensors_of(&from_file, &digest));
}

#[test]
fn a_wrong_checksum_is_refused_and_nothing_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let weights = model_file(dir.path(), "mlp", "head.safetensors", "512,4096,1024");
    let server = server_with(&[&weights]);
    let creds = credentials(dir.path(), &server.access_key, &server.secret_key);
    let pod = Pod::new();
    let wrong = "0".repeat(64);
    let model = s3_model(
        &weights,
        ModelFormat::Safetensors,
        &server.endpoint,
        &server,
        &creds,
    );
    let out = pod.publish(&[ModelSource {
        sha256: Some(wrong.clone()),
        ..model
    }]);
    assert!(!out.status.success());
    let expected = format!(
        "sha256 mismatch: expected {wrong}, the source has {}",
        sha256_of(&weights)
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(pod.published().is_empty(), "nothing published");
    assert!(pod.staging().is_empty(), "no staging folder left");
    // The pod's termination message says it too (the kubelet shows it to the user).
    let message = std::fs::read_to_string(pod.termination_log()).unwrap();
    assert!(message.contains("sha256 mismatch"), "{message}");
}

#[test]
fn refused_credentials_and_a_missing_object_are_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let weights = model_file(dir.path(), "mlp", "head.safetensors", "64,32,5");
    let server = server_with(&[&weights]);
    let wrong = credentials(dir.path(), &server.access_key, "not-the-secret");
    let pod = Pod::new();
    let out = pod.publish(&[s3_model(
        &weights,
        ModelFormat::Safetensors,
        &server.endpoint,
        &server,
        &wrong,
    )]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "answered HTTP 403: the source needs credentials it accepts \
             (source.s3.credentialsSecret)"
        ),
        "{}",
        stderr(&out)
    );
    // The secret is never in what the weight server says.
    assert!(!stderr(&out).contains("not-the-secret"));
    assert!(
        !stderr(&out).contains("X-Amz-Signature"),
        "{}",
        stderr(&out)
    );

    let creds = credentials(dir.path(), &server.access_key, &server.secret_key);
    let missing = ModelSource {
        uri: format!("s3://{BUCKET}/absent.safetensors"),
        ..s3_model(
            &weights,
            ModelFormat::Safetensors,
            &server.endpoint,
            &server,
            &creds,
        )
    };
    let out = pod.publish(&[missing]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("s3://models/absent.safetensors answered HTTP 404"),
        "{}",
        stderr(&out)
    );
    assert!(pod.published().is_empty());
}

/// `kube-zerocopy local run` of a Task pipeline whose two models are on S3, the credentials in
/// the environment (as AWS's tools take them; a local run reads no Secret): every output
/// equals the same pipeline's run on the models' files.
#[test]
fn local_run_fetches_its_models_from_s3_with_the_environment_s_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let encoder = model_file(d, "script", "encoder.pt", "128,256,64");
    let head = model_file(d, "mlp", "head.safetensors", "64,32,5");
    make_model(&[
        "inputs",
        d.join("input").to_str().unwrap(),
        "--shards",
        "3",
        "--batch",
        "4",
        "--features",
        "128",
    ]);
    let server = server_with(&[&encoder, &head]);
    let run = |name: &str, encoder_uri: &str, head_uri: &str| {
        let s3 = format!(
            "s3: {{endpoint: '{}', region: {}}}",
            server.endpoint, server.region
        );
        let with = |uri: &str| {
            if uri.starts_with("s3://") {
                format!("{{uri: '{uri}', {s3}}}")
            } else {
                format!("{{uri: '{uri}'}}")
            }
        };
        let yaml = format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: {name}}}\nspec:\n  mode: Task\n  models:\n    - {{name: encoder, format: TorchScript, source: {}}}\n    - {{name: head, format: Safetensors, architecture: Mlp, source: {}}}\n  input: {{uri: 'file://{}'}}\n  output: {{uri: 'file://{}'}}\n  task: {{parallelism: 2}}\n",
            with(encoder_uri),
            with(head_uri),
            d.join("input").display(),
            d.join(name).display(),
        );
        let file = d.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = local_run(&file, &server);
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    };
    run(
        "from-s3",
        &format!("s3://{BUCKET}/encoder.pt"),
        &format!("s3://{BUCKET}/head.safetensors"),
    );
    run(
        "from-files",
        &format!("file://{}", encoder.display()),
        &format!("file://{}", head.display()),
    );
    let mut compared = 0;
    for shard in kube_zerocopy_batch::shards::list_shards(&d.join("from-files")).unwrap() {
        let name = shard.file_name().unwrap();
        let expected = kube_zerocopy_e2e::read_output(&d.join("from-files").join(name));
        let got = kube_zerocopy_e2e::read_output(&d.join("from-s3").join(name));
        assert!(got.equal(&expected), "{name:?} differs");
        compared += 1;
    }
    assert_eq!(compared, 3);
}

const DATA: &str = "data";

/// A Task pipeline file for `kube-zerocopy local run`: the TorchScript encoder and safetensors
/// head from files, then `input` and `output` (a folder, or an s3:// prefix on `server`).
fn data_pipeline(d: &Path, name: &str, input: &str, output: &str, server: &S3Server) -> PathBuf {
    let location = |uri: &str| {
        if uri.starts_with("s3://") {
            format!(
                "{{uri: '{uri}', s3: {{endpoint: '{}', region: {}}}}}",
                server.endpoint, server.region
            )
        } else {
            format!("{{uri: 'file://{uri}'}}")
        }
    };
    let yaml = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: {name}}}\nspec:\n  mode: Task\n  models:\n    - {{name: encoder, format: TorchScript, source: {{uri: 'file://{}'}}}}\n    - {{name: head, format: Safetensors, architecture: Mlp, source: {{uri: 'file://{}'}}}}\n  input: {}\n  output: {}\n  task: {{parallelism: 2}}\n",
        d.join("encoder.pt").display(),
        d.join("head.safetensors").display(),
        location(input),
        location(output),
    );
    let file = d.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    file
}

fn local_run(file: &Path, server: &S3Server) -> std::process::Output {
    std::process::Command::new(kube_zerocopy_e2e::bin("kube-zerocopy"))
        .args(["local", "run", "--json", "-f"])
        .arg(file)
        .env("AWS_ACCESS_KEY_ID", &server.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
        .output()
        .unwrap()
}

/// The tensor `output` of a safetensors object.
fn output_of(bytes: &[u8]) -> tch::Tensor {
    kube_zerocopy_worker::shard_file::decode_output(bytes).unwrap()
}

/// A Task pipeline whose input and output are S3 prefixes and whose shards nobody counted:
/// `kube-zerocopy local run` plans the input (3 shard objects; another file and a "folder"
/// below the prefix are not shards), each shard reads its object and writes its output object
/// in one PUT, and the last one writes manifest.json beside them: every shard's input, the
/// version it read and the output's sha256, equal to the object's. Outputs equal the same
/// pipeline's run on folders, whose manifest says the same.
#[test]
fn a_task_pipeline_reads_and_writes_s3_prefixes_and_writes_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model_file(d, "script", "encoder.pt", "128,256,64");
    model_file(d, "mlp", "head.safetensors", "64,32,5");
    make_model(&[
        "inputs",
        d.join("input").to_str().unwrap(),
        "--shards",
        "3",
        "--batch",
        "4",
        "--features",
        "128",
    ]);
    let server = server_with(&[]);
    server.create_bucket(DATA).unwrap();
    let shards = kube_zerocopy_batch::shards::list_shards(&d.join("input")).unwrap();
    for shard in &shards {
        let name = shard.file_name().unwrap().to_str().unwrap();
        server.put_file(DATA, &format!("in/{name}"), shard).unwrap();
    }
    server
        .put_object(DATA, "in/README.txt", b"not a shard")
        .unwrap();
    server
        .put_file(DATA, "in/older/shard-x.safetensors", &shards[0])
        .unwrap();

    let out = local_run(
        &data_pipeline(d, "on-s3", "s3://data/in/", "s3://data/out/", &server),
        &server,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["shards"], 3, "{summary}");
    assert_eq!(summary["succeeded"], 3, "{summary}");
    let folders = d.join("on-folders");
    let out = local_run(
        &data_pipeline(
            d,
            "on-folders",
            d.join("input").to_str().unwrap(),
            folders.to_str().unwrap(),
            &server,
        ),
        &server,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let manifest: serde_json::Value =
        serde_json::from_slice(&server.get_object(DATA, "out/manifest.json").unwrap()).unwrap();
    let on_folders: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folders.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["input"], "s3://data/in/");
    assert_eq!(manifest["output"], "s3://data/out/");
    let recorded = manifest["shards"].as_array().unwrap();
    assert_eq!(recorded.len(), 3, "{manifest:#}");
    for (i, shard) in shards.iter().enumerate() {
        let name = shard.file_name().unwrap().to_str().unwrap();
        let record = &recorded[i];
        assert_eq!(record["shard"], i);
        assert_eq!(record["input"], name);
        assert_eq!(record["output"], name);
        let object = server.get_object(DATA, &format!("out/{name}")).unwrap();
        assert_eq!(
            record["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&object)),
            "the manifest's digest of {name}"
        );
        assert_eq!(record["bytes"], object.len());
        // The version read is the object's ETag as listed.
        assert!(record["inputVersion"].as_str().unwrap().starts_with('"'));
        let expected = output_of(&std::fs::read(folders.join(name)).unwrap());
        assert!(output_of(&object).equal(&expected), "{name} differs");
        assert_eq!(
            on_folders["shards"][i]["sha256"], record["sha256"],
            "{name}"
        );
    }
}

/// What a shard checks before it reads: an input changed since it was planned (an object
/// added) is refused for good, and so is an object replaced between its listing and its read
/// (the read is If-Match the listed ETag); an empty prefix cannot be planned; refused
/// credentials name the field that holds them.
#[test]
fn a_changed_input_is_refused_and_an_empty_one_cannot_be_planned() {
    use kube_zerocopy_batch::data::Store;
    use kube_zerocopy_batch::shards::{checked_listing, plan, Shard};
    use kube_zerocopy_runtime::process::Permanent;

    let server = server_with(&[]);
    server.create_bucket(DATA).unwrap();
    let access = S3Access {
        endpoint: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        credentials_dir: None,
    };
    std::env::set_var("AWS_ACCESS_KEY_ID", &server.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &server.secret_key);
    let input = Store::open("s3://data/in/", Some(&access), None, "input").unwrap();
    let empty = plan(&input).unwrap_err();
    assert!(empty.is::<Permanent>(), "{empty:#}");
    assert!(
        format!("{empty:#}").contains("the input s3://data/in/ holds no .safetensors shard files"),
        "{empty:#}"
    );

    server
        .put_object(DATA, "in/a.safetensors", b"first")
        .unwrap();
    server
        .put_object(DATA, "in/b.safetensors", b"second")
        .unwrap();
    let planned = plan(&input).unwrap();
    assert_eq!(planned.shards, 2);
    let output = Store::open("s3://data/out/", Some(&access), None, "output").unwrap();
    let shard = |index| Shard {
        input: &input,
        output: &output,
        index,
        expected: Some(planned.shards),
        planned: Some(&planned.input_digest),
        run: "test",
    };
    let listed = checked_listing(&shard(1)).unwrap();
    assert_eq!(listed[1].name, "b.safetensors");

    // Replaced after its listing: the read refuses it.
    server
        .put_object(DATA, "in/b.safetensors", b"rewritten")
        .unwrap();
    let replaced = input.read(&listed[1]).unwrap_err();
    assert!(replaced.is::<Permanent>(), "{replaced:#}");
    assert!(
        format!("{replaced:#}").contains("s3://data/in/b.safetensors changed since"),
        "{replaced:#}"
    );
    // Listed again, the input is not the one planned.
    let changed = checked_listing(&shard(0)).unwrap_err();
    assert!(changed.is::<Permanent>(), "{changed:#}");
    assert!(
        format!("{changed:#}").contains("changed since its shards were planned"),
        "{changed:#}"
    );

    let dir = tempfile::tempdir().unwrap();
    let wrong = credentials(dir.path(), &server.access_key, "not-the-secret");
    let refused = Store::open(
        "s3://data/in/",
        Some(&S3Access {
            credentials_dir: Some(wrong.to_string_lossy().into_owned()),
            ..access.clone()
        }),
        None,
        "input",
    )
    .unwrap()
    .shards()
    .unwrap_err();
    println!("refused: {refused:#}");
    assert!(
        format!("{refused:#}").contains("input.s3.credentialsSecret"),
        "{refused:#}"
    );
}

/// `file` as the model `m` at az://models/<its file name> on `server`, its account key in a
/// credentials folder as the operator mounts one from a Secret.
fn azure_model(file: &Path, format: ModelFormat, server: &AzureServer, dir: &Path) -> ModelSource {
    let creds = dir.join("azure");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("AZURE_STORAGE_ACCOUNT_KEY"), &server.key).unwrap();
    let blob = file.file_name().unwrap().to_str().unwrap();
    ModelSource {
        uri: format!("az://{BUCKET}/{blob}"),
        azure: Some(AzureAccess {
            account: server.account.clone(),
            endpoint: Some(server.endpoint.clone()),
            credentials_dir: Some(creds.to_string_lossy().into_owned()),
        }),
        ..source("m", format, file)
    }
}

/// Azure Blob Storage (Azurite, Microsoft's emulator), through the same `object_store` signer
/// as S3 (SAS URLs from the account key): both formats streamed into place and laid out as
/// from their files; a wrong account key refused in words that name
/// `source.azure.credentialsSecret`, nothing published.
#[test]
fn models_are_published_from_azure_blob_as_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let weights = model_file(dir.path(), "mlp", "head.safetensors", "512,4096,1024");
    let script = model_file(dir.path(), "script", "encoder.pt", "128,256,64");
    let server = AzureServer::start().unwrap();
    server.create_container(BUCKET).unwrap();
    for file in [&weights, &script] {
        let blob = file.file_name().unwrap().to_str().unwrap();
        server.put_file(BUCKET, blob, file).unwrap();
    }
    for (file, format) in [
        (&weights, ModelFormat::Safetensors),
        (&script, ModelFormat::TorchScript),
    ] {
        let from_azure = Pod::new();
        let out = from_azure.publish(&[azure_model(file, format, &server, dir.path())]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("fetched into place"),
            "{}",
            stderr(&out)
        );
        let digest = sha256_of(file);
        assert_eq!(from_azure.published(), std::slice::from_ref(&digest));
        let from_file = Pod::new();
        assert!(from_file
            .publish(&[source("m", format, file)])
            .status
            .success());
        assert!(
            tensors_of(&from_azure, &digest) == tensors_of(&from_file, &digest),
            "{format:?}: laid out as from the file"
        );
    }
    let wrong = tempfile::tempdir().unwrap();
    let mut model = azure_model(&weights, ModelFormat::Safetensors, &server, wrong.path());
    std::fs::write(
        wrong.path().join("azure/AZURE_STORAGE_ACCOUNT_KEY"),
        "bm90LXRoZS1rZXk=",
    )
    .unwrap();
    model.name = "refused".into();
    let pod = Pod::new();
    let out = pod.publish(&[model]);
    assert!(!out.status.success());
    println!("wrong key: {}", stderr(&out).trim());
    assert!(
        stderr(&out).contains("source.azure.credentialsSecret"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("sig="), "a signature was printed");
    assert!(pod.published().is_empty());
}

/// A Task pipeline whose input and output are az:// prefixes, run by `kube-zerocopy local
/// run` with the account key in the environment (AZURE_STORAGE_ACCOUNT_KEY): planned (2
/// shards), each output blob equal to the same pipeline's output on folders, and the manifest
/// gives each one's sha256.
#[test]
fn a_task_pipeline_reads_and_writes_azure_blob_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model_file(d, "script", "encoder.pt", "128,256,64");
    model_file(d, "mlp", "head.safetensors", "64,32,5");
    make_model(&[
        "inputs",
        d.join("input").to_str().unwrap(),
        "--shards",
        "2",
        "--batch",
        "4",
        "--features",
        "128",
    ]);
    let server = AzureServer::start().unwrap();
    server.create_container(DATA).unwrap();
    let shards = kube_zerocopy_batch::shards::list_shards(&d.join("input")).unwrap();
    for shard in &shards {
        let name = shard.file_name().unwrap().to_str().unwrap();
        server.put_file(DATA, &format!("in/{name}"), shard).unwrap();
    }
    let azure = format!(
        "azure: {{account: {}, endpoint: '{}'}}",
        server.account, server.endpoint
    );
    let yaml = format!(
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: on-azure}}\nspec:\n  mode: Task\n  models:\n    - {{name: encoder, format: TorchScript, source: {{uri: 'file://{}'}}}}\n    - {{name: head, format: Safetensors, architecture: Mlp, source: {{uri: 'file://{}'}}}}\n  input: {{uri: 'az://data/in/', {azure}}}\n  output: {{uri: 'az://data/out/', {azure}}}\n",
        d.join("encoder.pt").display(),
        d.join("head.safetensors").display(),
    );
    let file = d.join("on-azure.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(kube_zerocopy_e2e::bin("kube-zerocopy"))
        .args(["local", "run", "--json", "-f"])
        .arg(&file)
        .env("AZURE_STORAGE_ACCOUNT_KEY", &server.key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The same pipeline on folders, for the expected outputs.
    let folders = d.join("on-folders");
    let s3 = S3Server::start().unwrap();
    let out = local_run(
        &data_pipeline(
            d,
            "on-folders",
            d.join("input").to_str().unwrap(),
            folders.to_str().unwrap(),
            &s3,
        ),
        &s3,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&server.get_object(DATA, "out/manifest.json").unwrap()).unwrap();
    assert_eq!(manifest["input"], "az://data/in/");
    for (i, shard) in shards.iter().enumerate() {
        let name = shard.file_name().unwrap().to_str().unwrap();
        let object = server.get_object(DATA, &format!("out/{name}")).unwrap();
        assert_eq!(
            manifest["shards"][i]["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&object))
        );
        let expected = output_of(&std::fs::read(folders.join(name)).unwrap());
        assert!(output_of(&object).equal(&expected), "{name} differs");
    }
}
