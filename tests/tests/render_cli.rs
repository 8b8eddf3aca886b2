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
