//! What the API server checks when a pipeline is created, checked without a cluster (`kube-zerocopy
//! render`, `local run`): the CRD's structural schema (types, enums, required fields, lengths,
//! unknown fields) here, and its CEL rules through kube's client-side CEL (the Kubernetes CEL
//! libraries). Each reason is worded as the API server words it, so that a user reads here what
//! `kubectl apply` would answer.

use std::fmt;
use std::sync::LazyLock;

use kube::core::cel::Validator;
use kube::{CustomResourceExt, Resource};
use serde_json::Value;

use crate::crd::InferencePipeline;

/// A pipeline the API server would refuse, with each of its reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub name: String,
    pub errors: Vec<String>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} {:?} is invalid: ",
            InferencePipeline::kind(&()),
            InferencePipeline::group(&()),
            self.name
        )?;
        match self.errors.as_slice() {
            [one] => write!(f, "{one}"),
            many => write!(f, "[{}]", many.join(", ")),
        }
    }
}

impl std::error::Error for Invalid {}

/// The CRD's openAPIV3Schema, as the API server holds it.
static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = InferencePipeline::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the derived CRD has a schema");
    serde_json::to_value(schema).expect("a schema is JSON")
});

/// Checks a pipeline as read from YAML or JSON, before it is typed: a wrong type or an unknown
/// mode must be reported as the API server reports it, not as a deserializer's error.
pub fn validate(object: &Value) -> Result<(), Invalid> {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut errors = Vec::new();
    let api_version = InferencePipeline::api_version(&());
    let kind = InferencePipeline::kind(&());
    if object.get("apiVersion").and_then(Value::as_str) != Some(&api_version)
        || object.get("kind").and_then(Value::as_str) != Some(&kind)
    {
        errors.push(format!(
            "kind: Invalid value: {}: expected apiVersion {api_version} and kind {kind}",
            bad_value(object.get("kind").unwrap_or(&Value::Null))
        ));
    }
    if name.is_empty() {
        errors.push("metadata.name: Required value: name is required".into());
    }
    structural(&SCHEMA, object, "", &mut errors);
    // As in the API server, rules run on a well-formed object only (they assume its types).
    if errors.is_empty() {
        if let Err(failures) = Validator::new().validate(&SCHEMA, object, None) {
            // The API server shows a scalar value that failed a rule, not an object or a list.
            for failure in failures.iter() {
                let path = &failure.field_path;
                let value = match value_at(object, path) {
                    Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                        format!("{}: ", bad_value(v))
                    }
                    _ => String::new(),
                };
                errors.push(format!(
                    "{}: Invalid value: {value}{}",
                    or_nil(path),
                    failure.message
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid { name, errors })
    }
}

/// The schema's checks at one node, then its children's. The root's metadata, apiVersion and
/// kind are the API server's own (checked above); status is not written by users.
fn structural(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let flag = |key: &str| schema.get(key).and_then(Value::as_bool).unwrap_or(false);
    if value.is_null() {
        if !flag("nullable") && !path.is_empty() {
            errors.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                schema
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("object")
            ));
        }
        return;
    }
    // An int-or-string takes either, and no other check applies to it here.
    let int_or_string = flag("x-kubernetes-int-or-string");
    let (expected, fits) = if int_or_string {
        let fits = value.is_string() || has_type(value, "integer");
        (Some("integer or string"), fits)
    } else {
        let expected = schema.get("type").and_then(Value::as_str);
        (expected, expected.is_none_or(|t| has_type(value, t)))
    };
    if !fits {
        errors.push(format!(
            "{}: Invalid value: {:?}: {} in body must be of type {}: {:?}",
            or_nil(path),
            type_name(value),
            path,
            expected.unwrap_or_default(),
            type_name(value)
        ));
        return;
    }
    if int_or_string {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let supported: Vec<String> = allowed.iter().map(|v| format!("{v}")).collect();
            errors.push(format!(
                "{path}: Unsupported value: {}: supported values: {}",
                bad_value(value),
                supported.join(", ")
            ));
        }
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
    match value {
        Value::String(s) => {
            if let Some(max) = bound("maxLength").filter(|&m| s.chars().count() as u64 > m) {
                errors.push(format!(
                    "{path}: Too long: may not be more than {max} bytes"
                ));
            }
            if let Some(min) = bound("minLength").filter(|&m| (s.chars().count() as u64) < m) {
                errors.push(format!(
                    "{path}: Invalid value: {s:?}: {path} in body should be at least {min} chars long"
                ));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(max) = bound("maxItems").filter(|&m| n > m) {
                errors.push(format!(
                    "{path}: Too many: {n}: must have at most {max} items"
                ));
            }
            if let Some(min) = bound("minItems").filter(|&m| n < m) {
                errors.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should have at least {min} items"
                ));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    structural(item, v, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(fields) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let required = schema.get("required").and_then(Value::as_array);
            for field in required.into_iter().flatten().filter_map(Value::as_str) {
                if !fields.contains_key(field) {
                    errors.push(format!("{}: Required value", child(path, field)));
                }
            }
            let preserve = flag("x-kubernetes-preserve-unknown-fields");
            for (key, v) in fields {
                if path.is_empty()
                    && ["apiVersion", "kind", "metadata", "status"].contains(&key.as_str())
                {
                    continue;
                }
                let at = child(path, key);
                match (
                    properties.and_then(|p| p.get(key)),
                    schema.get("additionalProperties"),
                ) {
                    (Some(s), _) => structural(s, v, &at, errors),
                    (None, Some(s)) if s.is_object() => structural(s, v, &at, errors),
                    (None, Some(Value::Bool(true))) => {}
                    _ if preserve => {}
                    _ => errors.push(format!(
                        "unknown field {at:?}{}",
                        hint(path, key, properties)
                    )),
                }
            }
        }
        _ => {}
    }
}

/// What an unknown field was likely meant to be: the pod template's fields written under a
/// `spec` of their own, or a known field a letter or two away (`sharding` for `sharing`).
fn hint(path: &str, key: &str, properties: Option<&serde_json::Map<String, Value>>) -> String {
    if path == "spec.template" && key == "spec" {
        return "; the pod template's fields sit directly under spec.template (image, \
                resources, volumes, env, ...), not under spec.template.spec"
            .into();
    }
    // Two edits at most, fewer for a short key: any two-letter key is two edits from another.
    let most = (key.chars().count() / 3).min(2);
    let known = properties.into_iter().flat_map(|p| p.keys());
    let closest = known
        .map(|name| {
            (
                edit_distance(&key.to_lowercase(), &name.to_lowercase()),
                name,
            )
        })
        .filter(|(distance, _)| *distance <= most)
        .min();
    match closest {
        Some((_, name)) => format!("; did you mean {:?}?", child(path, name)),
        None => String::new(),
    }
}

/// Levenshtein's distance: the single-letter insertions, deletions and substitutions that
/// turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

fn has_type(value: &Value, expected: &str) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    }
}

/// The JSON type's name, as the API server prints a value it cannot take.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A value as the API server quotes it: strings quoted, numbers and booleans bare, others JSON.
fn bad_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn child(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The API server's name for the root's path.
fn or_nil(path: &str) -> &str {
    if path.is_empty() {
        "<nil>"
    } else {
        path
    }
}

/// The fields and list indexes of a path such as `spec.models[0].name`.
fn parts(path: &str) -> impl Iterator<Item = Part<'_>> {
    path.split('.').filter(|p| !p.is_empty()).flat_map(|part| {
        let (field, indexes) = part.split_once('[').unwrap_or((part, ""));
        let field = (!field.is_empty()).then_some(Part::Field(field));
        let indexes = indexes
            .split('[')
            .filter(|i| !i.is_empty())
            .map(|i| Part::Index(i.trim_end_matches(']').parse().unwrap_or(usize::MAX)));
        field.into_iter().chain(indexes)
    })
}

enum Part<'a> {
    Field(&'a str),
    Index(usize),
}

fn value_at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    parts(path).try_fold(root, |at, part| match part {
        Part::Field(f) => at.get(f),
        Part::Index(i) => at.get(i),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(spec: Value) -> Value {
        json!({
            "apiVersion": "kube-zerocopy.io/v1alpha1",
            "kind": "InferencePipeline",
            "metadata": {"name": "p"},
            "spec": spec,
        })
    }

    fn task() -> Value {
        json!({
            "mode": "Task",
            "models": [{"name": "m", "format": "TorchScript", "source": {"uri": "file:///m.pt"}}],
            "input": {"uri": "file:///in"},
            "output": {"uri": "file:///out"},
            "task": {"shards": 2},
        })
    }

    fn errors(object: Value) -> Vec<String> {
        validate(&object)
            .err()
            .map(|e| e.errors)
            .unwrap_or_default()
    }

    #[test]
    fn a_valid_pipeline_passes() {
        assert_eq!(validate(&pipeline(task())), Ok(()));
    }

    #[test]
    fn schema_errors_read_as_the_api_servers() {
        let mut spec = task();
        spec["mode"] = json!("Batch");
        spec["task"]["shards"] = json!("two");
        spec["models"][0]["name"] = json!("m".repeat(64));
        spec["extra"] = json!(1);
        spec["models"][0]["source"]
            .as_object_mut()
            .unwrap()
            .remove("uri");
        let mut found = errors(pipeline(spec));
        found.sort();
        assert_eq!(
            found,
            [
                "spec.mode: Unsupported value: \"Batch\": supported values: \"Task\", \"Actor\"",
                "spec.models[0].name: Too long: may not be more than 63 bytes",
                "spec.models[0].source.uri: Required value",
                "spec.task.shards: Invalid value: \"string\": spec.task.shards in body must be of type integer: \"string\"",
                "unknown field \"spec.extra\"",
            ]
        );
    }

    /// An unknown field close to a known one says which was meant; the pod template's fields
    /// written under a `spec` of their own say where they go.
    #[test]
    fn unknown_fields_say_what_was_likely_meant() {
        let mut spec = task();
        spec["sharding"] = json!("Pod");
        spec["Task"] = json!({"shards": 2});
        spec["template"] = json!({"spec": {"image": "mine:1"}});
        let mut found = errors(pipeline(spec));
        found.sort();
        assert_eq!(
            found,
            [
                "unknown field \"spec.Task\"; did you mean \"spec.task\"?",
                "unknown field \"spec.sharding\"; did you mean \"spec.sharing\"?",
                "unknown field \"spec.template.spec\"; the pod template's fields sit directly \
                 under spec.template (image, resources, volumes, env, ...), not under \
                 spec.template.spec",
            ]
        );
        assert_eq!(edit_distance("sharding", "sharing"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn cel_rules_run_with_the_api_servers_wording() {
        let mut spec = task();
        spec["models"][0]["source"]["size"] = json!("big");
        spec["actor"] = json!({"replicas": 0});
        assert_eq!(
            errors(pipeline(spec)),
            [
                "spec: Invalid value: spec.actor applies only to mode Actor; use spec.task for mode Task",
                "spec.actor.replicas: Invalid value: 0: actor.replicas must be at least 1",
                "spec.models[0].source.size: Invalid value: \"big\": source.size must be a quantity such as 400Mi or 2Gi",
            ]
        );
        let mut long = pipeline(task());
        long["metadata"]["name"] = json!("a".repeat(55));
        let found = errors(long);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("<nil>: Invalid value: metadata.name may have at most 54"),
            "{found:?}"
        );
    }

    #[test]
    fn a_task_name_leaves_room_for_the_last_shard_index() {
        let mut spec = task();
        spec["task"]["shards"] = json!(1000);
        let mut p = pipeline(spec);
        p["metadata"]["name"] = json!("a".repeat(50)); // 50 + "-zerocopy-999" = 63
        assert_eq!(validate(&p), Ok(()));
        p["metadata"]["name"] = json!("a".repeat(51));
        assert!(errors(p)[0].contains("host name"));
    }

    #[test]
    fn the_message_names_the_pipeline_like_the_api_server() {
        let mut spec = task();
        spec["mode"] = json!("Batch");
        spec["models"] = json!([]);
        let e = validate(&pipeline(spec)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "InferencePipeline.kube-zerocopy.io \"p\" is invalid: [spec.mode: Unsupported value: \"Batch\": supported values: \"Task\", \"Actor\", spec.models: Invalid value: 0: spec.models in body should have at least 1 items]"
        );
    }
}
