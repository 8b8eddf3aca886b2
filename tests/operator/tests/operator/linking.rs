//! What this test binary is built from.

use std::sync::Arc;

use crate::support::Env;

/// The operator's scenarios build and run without libtorch: nothing of it is loaded in this
/// process (the worker's tests, which map models into tensors, load it at start).
pub async fn the_operators_scenarios_load_no_libtorch(_env: Arc<Env>) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    let loaded: Vec<&str> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.contains("libtorch") || path.contains("libc10"))
        .collect();
    assert!(loaded.is_empty(), "libtorch is loaded: {loaded:?}");
    let loaded_any = maps.lines().any(|line| line.contains(".so"));
    assert!(loaded_any, "the maps list the shared libraries loaded");
}
