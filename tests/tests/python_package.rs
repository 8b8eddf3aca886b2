//! The Python package (`python/`) against a model the real weight server published: installed
//! with pip from a copy of the repository's folder, then its own tests (`python/tests`) run in
//! the project's torch environment. They compare the tensors with what the `safetensors`
//! package reads from the file, find every tensor inside the one read-only mapping of
//! `tensors.bin` in `/proc/self/maps` with the process's anonymous memory not grown by the
//! weights, make a write fault, and refuse crafted manifests in words.

use std::path::Path;
use std::process::Command;

use kube_zerocopy_e2e::{make_model, repo, source, succeeded, Pod};
use kube_zerocopy_fetch::ModelFormat;

fn python() -> String {
    let venv = std::env::var("KZC_VENV").expect("KZC_VENV (run through `make test`)");
    format!("{venv}/bin/python")
}

/// Copies `from` into `to` (a folder of files and folders).
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_folder(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_python_package_maps_published_models_read_only_without_a_copy() {
    let pod = Pod::new();
    let model = pod.dir.path().join("encoder.safetensors");
    make_model(&[
        "mlp",
        model.to_str().unwrap(),
        "--sizes",
        "1024,2048,2048,16",
    ]);
    let models = [source("encoder", ModelFormat::Safetensors, &model)];
    succeeded(&pod.publish(&models));

    // pip builds in the folder it installs from: a copy, so the repository stays clean.
    let package = pod.dir.path().join("package");
    copy_folder(&repo().join("python"), &package);
    let site = pod.dir.path().join("site");
    let install = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
        ])
        .arg(&site)
        .arg(&package)
        .output()
        .unwrap();
    succeeded(&install);
    assert!(
        site.join("kube_zerocopy/py.typed").is_file(),
        "the package says it is typed"
    );

    let tests = Command::new(python())
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(package.join("tests"))
        .current_dir(pod.dir.path())
        .env("PYTHONPATH", &site)
        .envs(pod.env(&models))
        .env("KZC_TEST_MODEL", "encoder")
        .env("KZC_TEST_REFERENCE", &model)
        .output()
        .unwrap();
    let said = succeeded(&tests);
    println!("{said}");
    let ran = said.lines().find_map(|l| {
        l.strip_prefix("Ran ")?
            .split_whitespace()
            .next()?
            .parse::<u32>()
            .ok()
    });
    assert_eq!(ran, Some(13), "every test of python/tests ran");
    assert!(said.trim_end().ends_with("OK"), "{said}");
}
