//! What users read is checked like code: every relative link in the README and the docs leads
//! to a file that exists, and every pipeline shown in a YAML block passes the API server's
//! checks and renders.

use std::path::{Path, PathBuf};

use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::render::{render, Settings};
use kube_zerocopy::validation::validate;
use serde::Deserialize as _;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The documents users read: the README, docs/, the examples' and the Python package's READMEs.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md"), repo().join("python/README.md")];
    for folder in ["docs", "examples"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join(folder))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        found.sort();
        docs.extend(found);
    }
    docs.extend(
        ["CHANGELOG.md", "CONTRIBUTING.md", "SECURITY.md"]
            .iter()
            .map(|f| repo().join(f))
            .filter(|p| p.exists()),
    );
    docs
}

/// The targets of the Markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = vec![];
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].to_owned());
        }
    }
    targets
}

#[test]
fn every_relative_link_leads_to_a_file() {
    let mut broken = vec![];
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for target in link_targets(&text) {
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            if !doc.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(checked > 5, "the links were found ({checked})");
    assert!(broken.is_empty(), "links to nothing: {broken:#?}");
}

#[test]
fn links_are_found_in_markdown() {
    assert_eq!(
        link_targets("see [usage](docs/usage.md#a) and [x](https://e.org)."),
        ["docs/usage.md#a", "https://e.org"]
    );
}

/// The YAML blocks (```yaml … ```) of `text`.
fn yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn every_pipeline_shown_in_the_docs_is_valid_and_renders() {
    let mut shown = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for block in yaml_blocks(&text) {
            for document in serde_yaml::Deserializer::from_str(&block) {
                let value = serde_yaml::Value::deserialize(document).unwrap_or_default();
                if value.get("kind").and_then(|k| k.as_str()) != Some("InferencePipeline") {
                    continue;
                }
                shown += 1;
                let json = serde_json::to_value(&value).unwrap();
                if let Err(invalid) = validate(&json) {
                    panic!(
                        "{}: a pipeline the API server refuses: {invalid}",
                        doc.display()
                    );
                }
                let pipeline: InferencePipeline = serde_json::from_value(json).unwrap();
                if let Err(e) = render(&pipeline, &Settings::default()) {
                    panic!("{}: a pipeline that does not render: {e:#}", doc.display());
                }
            }
        }
    }
    println!("{shown} pipelines shown in the docs render");
}
