//! `kube-zerocopy render -f` checks a pipeline as the API server would, without a cluster: every
//! pipeline the API server refuses (the table tests/operator/mistakes.rs sends to a real one) makes it
//! exit non-zero with the API server's words, and every example passes.

use std::process::Command;

use kube_zerocopy_e2e::invalid::invalid_pipelines;
use kube_zerocopy_e2e::{bin, repo};

fn render(file: &std::path::Path) -> std::process::Output {
    Command::new(bin("kube-zerocopy"))
        .args(["render", "-f"])
        .arg(file)
        .output()
        .expect("running kube-zerocopy render")
}

#[test]
fn render_refuses_what_the_api_server_refuses() {
    let dir = tempfile::tempdir().unwrap();
    for (what, yaml, message) in invalid_pipelines("default") {
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let out = render(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{what}: {}", stderr.trim());
        assert!(!out.status.success(), "{what}: render exited 0");
        assert!(out.stdout.is_empty(), "{what}: render printed objects");
        assert!(
            stderr.contains(message),
            "{what}: expected {message:?} in {stderr}"
        );
        assert!(
            stderr.contains("InferencePipeline.kube-zerocopy.io \"")
                && stderr.contains("is invalid"),
            "{what}: not worded as the API server: {stderr}"
        );
    }
}

#[test]
fn render_accepts_every_example() {
    let mut examples = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // local-demo.yaml is a template that scripts/demo.sh fills in.
        if name.ends_with(".yaml") && !name.starts_with("local-") {
            let out = render(&path);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            examples += 1;
        }
    }
    assert!(examples >= 4, "only {examples} examples found");
    // The quickstart: its pipeline beside the ConfigMap that carries its model.
    let quickstart = repo().join("examples/quickstart/pipeline.yaml");
    let out = render(&quickstart);
    assert!(
        out.status.success(),
        "{}: {}",
        quickstart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn render_refuses_resources_that_are_not_quantities() {
    // The API server takes them inside a pipeline (no CEL rule over these maps fits its cost
    // budget); the operator blocks such a pipeline, and render says why.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p}\nspec:\n  mode: Task\n  models: [{name: m, format: TorchScript, source: {uri: 'file:///m.pt'}}]\n  input: {uri: 'file:///in'}\n  output: {uri: 'file:///out'}\n  task: {shards: 2}\n  template: {resources: {requests: {cpu: 1, memory: 2GB}}}\n",
    )
    .unwrap();
    let out = render(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "render exited 0");
    assert!(
        stderr.contains("template.resources.requests.memory: \"2GB\" is not a quantity"),
        "{stderr}"
    );
}

/// `-f` takes what `kubectl apply -f` does: a folder (the quickstart's ConfigMap and pipeline),
/// standard input, and a file of several documents whose other kinds are skipped; a file with
/// no pipeline at all is an error that says so.
#[test]
fn render_reads_a_folder_standard_input_and_documents_of_other_kinds() {
    let count = |out: &std::process::Output, kind: &str| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| *l == format!("kind: {kind}"))
            .count()
    };
    let folder = render(&repo().join("examples/quickstart"));
    assert!(
        folder.status.success(),
        "{}",
        String::from_utf8_lossy(&folder.stderr)
    );
    assert_eq!(count(&folder, "Deployment"), 1);

    let pipeline = std::fs::read_to_string(repo().join("examples/actor-s3.yaml")).unwrap();
    let mut child = Command::new(bin("kube-zerocopy"))
        .args(["render", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pipeline.as_bytes()).unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(count(&piped, "Deployment"), 1);

    let dir = tempfile::tempdir().unwrap();
    let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n";
    let second = pipeline.replace("name: classifier-s3", "name: classifier-two");
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, format!("{config_map}---\n{pipeline}\n---\n{second}")).unwrap();
    let several = render(&file);
    assert!(
        several.status.success(),
        "{}",
        String::from_utf8_lossy(&several.stderr)
    );
    assert_eq!(count(&several, "Deployment"), 2);
    assert_eq!(count(&several, "ConfigMap"), 0);

    let none = dir.path().join("none.yaml");
    std::fs::write(&none, config_map).unwrap();
    let out = render(&none);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no InferencePipeline"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
