//! The environment the end-to-end tests run in, with no libtorch: a real control plane built
//! from the official Go modules ([`cluster`]), a real node joined to it ([`cluster::real`]),
//! Kueue ([`kueue`]), real S3 and Azure servers ([`s3`], [`azure`]), waiting with a deadline
//! ([`wait`]), and what every scenario needs to find the workspace's binaries.

pub mod azure;
pub mod cluster;
pub mod invalid;
pub mod kueue;
pub mod s3;
pub mod wait;

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// A binary of the workspace, built in the same profile as the running test (which lives in
/// target/<profile>/deps) or benchmark (target/<profile>).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `make test`",
        path.display()
    );
    path
}

/// The value of the sample `name` (its labels written out, as in the text) in a Prometheus
/// text page: the operator's, a worker's or the agent's /metrics.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A Task pipeline with one TorchScript model, for the operator's tests and benchmark: the
/// model and the data on volumes of the template (empty: kwok runs no container).
pub fn task_pipeline(
    name: &str,
    namespace: &str,
    shards: i32,
    parallelism: i32,
) -> kube_zerocopy::crd::InferencePipeline {
    serde_yaml::from_str(&format!(
        r#"apiVersion: kube-zerocopy.io/v1alpha1
kind: InferencePipeline
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  mode: Task
  models:
    - {{name: encoder, format: TorchScript, source: {{uri: "file:///models/encoder.pt", size: 64Mi}}}}
  input: {{uri: "file:///data/in"}}
  output: {{uri: "file:///data/out"}}
  task: {{shards: {shards}, parallelism: {parallelism}}}
  template:
    volumes: [{{name: models, emptyDir: {{}}}}, {{name: data, emptyDir: {{}}}}]
    volumeMounts: [{{name: models, mountPath: /models}}, {{name: data, mountPath: /data}}]
"#
    ))
    .expect("a valid pipeline")
}
