//! The layout rules of the workspace, checked on its sources: the operator's modules import
//! one another without a circle, no product source file grows past 700 lines (its tests
//! apart), the environment variables between binaries are named in the contract crate only,
//! and the crates depend on one another in one direction.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The crates that ship, whose sources these rules cover.
const PRODUCT_CRATES: [&str; 11] = [
    "contract",
    "runtime",
    "store",
    "object-storage",
    "fetch",
    "weight-server",
    "batch",
    "worker",
    "python-worker",
    "operator",
    "agent",
];
const MAX_LINES: usize = 700;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// A source file's product code: everything before its unit tests; nothing for a file of
/// tests.
fn product_code(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = fs::read_to_string(path).unwrap();
    match text.find("\n#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn product_sources() -> Vec<PathBuf> {
    PRODUCT_CRATES
        .iter()
        .flat_map(|krate| rust_files(&workspace().join(krate).join("src")))
        .collect()
}

/// The operator's top-level module a source file belongs to (`reconcile` for
/// `src/reconcile/apply/task.rs`); None for the crate roots.
fn operator_module(src: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(module, "lib" | "main")).then(|| module.to_owned())
}

/// The modules each `crate::` path in `code` names (not in comments: a doc link is no import).
fn imported_modules(code: &str) -> BTreeSet<String> {
    let code: Vec<&str> = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect();
    let code = code.join("\n");
    let mut modules = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            modules.insert(name);
        }
        // `use crate::{a, b}`: each name inside the braces.
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    modules.insert(name);
                }
            }
        }
    }
    modules
}

/// A circle in `graph`, as the modules along it, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut vec![], &mut done))
}

#[test]
fn the_operators_modules_import_one_another_without_a_circle() {
    let src = workspace().join("operator/src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in rust_files(&src) {
        let Some(module) = operator_module(&src, &path) else {
            continue;
        };
        let imports = imported_modules(&product_code(&path));
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(imports.into_iter().filter(|m| *m != module));
    }
    assert!(graph.contains_key("reconcile") && graph.contains_key("render"));
    assert_eq!(circle(&graph), None, "the operator's modules: {graph:#?}");
}

#[test]
fn a_circle_is_found() {
    let graph = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(circle(&graph).map(|c| c.len()), Some(4));
    assert_eq!(
        imported_modules("use crate::{crd::X, plan};\nuse crate::status::Y;"),
        BTreeSet::from(["crd".into(), "plan".into(), "status".into()])
    );
}

#[test]
fn no_product_source_file_is_over_700_lines() {
    let long: Vec<String> = product_sources()
        .iter()
        .map(|path| (path, product_code(path).lines().count()))
        .filter(|(_, lines)| *lines > MAX_LINES)
        .map(|(path, lines)| format!("{} ({lines} lines)", path.display()))
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern (tests may move to a tests.rs): {long:#?}"
    );
}

#[test]
fn the_variables_between_binaries_are_named_in_the_contract_only() {
    let contract = workspace().join("contract");
    let spelled: Vec<String> = product_sources()
        .iter()
        .filter(|path| !path.starts_with(&contract))
        .filter(|path| product_code(path).contains("\"KZC_"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        spelled.is_empty(),
        "name these variables in the contract crate: {spelled:#?}"
    );
}

/// The dependencies a crate's manifest names among the workspace's crates.
fn workspace_dependencies(krate: &str) -> BTreeSet<String> {
    let manifest = fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let mut in_dependencies = false;
    let mut found = BTreeSet::new();
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_dependencies = line.trim() == "[dependencies]";
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
        if in_dependencies && name.starts_with("kube-zerocopy") {
            found.insert(name.to_owned());
        }
    }
    found
}

#[test]
fn the_crates_depend_on_the_contract_and_never_on_the_operator() {
    let operator = workspace_dependencies("operator");
    assert_eq!(
        operator,
        BTreeSet::from([
            "kube-zerocopy-contract".to_owned(),
            "kube-zerocopy-runtime".to_owned()
        ]),
        "the operator depends on the contract and the runtime only"
    );
    for krate in [
        "agent",
        "batch",
        "worker",
        "fetch",
        "weight-server",
        "object-storage",
        "python-worker",
        "runtime",
        "store",
    ] {
        let dependencies = workspace_dependencies(krate);
        assert!(
            !dependencies.contains("kube-zerocopy"),
            "{krate} depends on the operator: {dependencies:?}"
        );
        assert!(
            dependencies.contains("kube-zerocopy-contract"),
            "{krate} does not use the contract: {dependencies:?}"
        );
    }
    assert!(workspace_dependencies("contract").is_empty());
    assert_eq!(
        workspace_dependencies("store"),
        BTreeSet::from(["kube-zerocopy-contract".to_owned()]),
        "the store's layout depends on the contract alone"
    );
    // The worker reads the store; it does not fetch: no parsers, no publisher in its binary.
    let worker = workspace_dependencies("worker");
    assert!(worker.contains("kube-zerocopy-store"), "{worker:?}");
    assert!(
        !worker.contains("kube-zerocopy-fetch"),
        "the worker depends on the fetching crate: {worker:?}"
    );
    // What a batch run needs beside the models links no libtorch: the worker runs the models
    // over it.
    assert!(worker.contains("kube-zerocopy-batch"), "{worker:?}");
    let batch = dependencies_in("batch/Cargo.toml", "dependencies");
    for torch in ["tch", "torch-sys", "kube-zerocopy-worker"] {
        assert!(!batch.contains(torch), "the batch crate names {torch}");
    }
    // The weight server is a thin binary over the fetching crate.
    assert!(workspace_dependencies("weight-server").contains("kube-zerocopy-fetch"));
}

/// The dependencies a manifest names in `section` (`dependencies`, `dev-dependencies`).
fn dependencies_in(manifest: &str, section: &str) -> BTreeSet<String> {
    let manifest = fs::read_to_string(workspace().join(manifest)).unwrap();
    let header = format!("[{section}]");
    let mut inside = false;
    let mut found = BTreeSet::new();
    for line in manifest.lines() {
        if line.starts_with('[') {
            inside = line.trim() == header;
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
        if inside && !name.is_empty() && !name.starts_with('#') {
            found.insert(name.to_owned());
        }
    }
    found
}

#[test]
fn the_operators_scenarios_their_environment_and_the_xtask_need_no_libtorch() {
    let torch = [
        "tch",
        "kube-zerocopy-worker",
        "kube-zerocopy-weight-server",
        "kube-zerocopy-e2e",
    ];
    for (manifest, section) in [
        ("tests/env/Cargo.toml", "dependencies"),
        ("tests/operator/Cargo.toml", "dependencies"),
        ("tests/operator/Cargo.toml", "dev-dependencies"),
        ("xtask/Cargo.toml", "dependencies"),
    ] {
        let names = dependencies_in(manifest, section);
        assert!(!names.is_empty() || section == "dependencies", "{manifest}");
        for name in torch {
            assert!(!names.contains(name), "{manifest} [{section}] names {name}");
        }
    }
    assert!(
        dependencies_in("tests/operator/Cargo.toml", "dev-dependencies")
            .contains("kube-zerocopy-test-env")
    );
}
