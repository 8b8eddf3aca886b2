#![no_main]
// A pipeline from arbitrary YAML, checked as the API server would and, when accepted, rendered
// into its Job or Deployment, as `kube-zerocopy render -f` does.
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::render::{render, Settings};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(object) = serde_yaml::from_str::<serde_json::Value>(text) else {
        return;
    };
    if kube_zerocopy::validation::validate(&object).is_err() {
        return;
    }
    let Ok(pipeline) = serde_json::from_value::<InferencePipeline>(object) else {
        return;
    };
    let _ = render(&pipeline, &Settings::default());
});
