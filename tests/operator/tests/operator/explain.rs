//! `kubectl explain inferencepipeline` reads the API server's OpenAPI v3 document: every field
//! of the pipeline there explains itself.

use std::sync::Arc;

use serde_json::Value;

use crate::support::Env;

/// The properties under `schema` without a description, as dotted paths.
fn undescribed(schema: &Value, path: &str, found: &mut Vec<String>) {
    let properties = schema.get("properties").and_then(Value::as_object);
    for (name, property) in properties.into_iter().flatten() {
        let at = format!("{path}.{name}");
        let described = property
            .get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.trim().is_empty());
        if !described {
            found.push(at.clone());
        }
        undescribed(property, &at, found);
    }
    if let Some(items) = schema.get("items").filter(|s| s.is_object()) {
        undescribed(items, &format!("{path}[]"), found);
    }
}

pub async fn kubectl_explain_describes_every_field(env: Arc<Env>) {
    let document: Value = env
        .admin
        .request(
            http::Request::get("/openapi/v3/apis/kube-zerocopy.io/v1alpha1")
                .body(vec![])
                .unwrap(),
        )
        .await
        .unwrap();
    let schema = &document["components"]["schemas"]["io.kube-zerocopy.v1alpha1.InferencePipeline"];
    assert!(schema.is_object(), "no InferencePipeline schema published");
    let mut found = Vec::new();
    undescribed(schema, "", &mut found);
    // metadata is a reference to ObjectMeta, described where it is defined.
    found.retain(|p| p != ".metadata");
    let fields = ["spec", "status"].map(|f| {
        schema["properties"][f]["properties"]
            .as_object()
            .map_or(0, |p| p.len())
    });
    println!(
        "explained: spec's {} and status's {} fields, and all below them",
        fields[0], fields[1]
    );
    assert!(fields[0] >= 8, "spec has {} fields", fields[0]);
    assert!(
        found.is_empty(),
        "kubectl explain shows no description for {found:#?}"
    );
}
