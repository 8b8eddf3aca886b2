//! A resource's reference for users, generated from its CRD: every field with its type, its
//! description and the rules the API server checks, so the documentation cannot drift from
//! what the API server accepts (`kube-zerocopy reference`, committed as docs/reference.md).

use std::fmt::Write;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};

/// The reference of every CRD in `crds`, as one Markdown document.
pub fn markdown(crds: &[CustomResourceDefinition]) -> String {
    let mut out = String::from(
        "# Resource reference\n\n\
         Every field of kube-zerocopy's resources, with its type, what it means, its default, and \
         the rules the API server checks when a resource is created or changed. Generated from \
         the CRDs by `kube-zerocopy reference` (`make generate`): do not edit.\n",
    );
    for crd in crds {
        resource(&mut out, crd);
    }
    out
}

fn resource(out: &mut String, crd: &CustomResourceDefinition) {
    let names = &crd.spec.names;
    for version in &crd.spec.versions {
        let api_version = format!("{}/{}", crd.spec.group, version.name);
        let _ = write!(out, "\n## {} (`{api_version}`)\n\n", names.kind);
        let short = names.short_names.iter().flatten();
        let short: Vec<String> = short.map(|s| format!("`{s}`")).collect();
        let _ = writeln!(
            out,
            "`kubectl get {}`{}, {}.\n",
            names.plural,
            if short.is_empty() {
                String::new()
            } else {
                format!(" (short name {})", short.join(", "))
            },
            match crd.spec.scope.as_str() {
                "Namespaced" => "one per namespace and name",
                _ => "cluster-wide",
            }
        );
        let Some(schema) = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        else {
            continue;
        };
        if let Some(description) = &schema.description {
            let _ = writeln!(out, "{}\n", one_line(description));
        }
        let _ = writeln!(out, "| Field | Type | Description |\n|---|---|---|");
        let mut rules = vec![];
        for top in ["spec", "status"] {
            if let Some(props) = schema.properties.as_ref().and_then(|p| p.get(top)) {
                fields(out, &mut rules, top, props, false);
            }
        }
        if !rules.is_empty() {
            let _ = writeln!(out, "\nRules the API server checks:\n");
            for (path, message) in rules {
                let _ = writeln!(out, "- `{path}`: {message}");
            }
        }
    }
}

/// One row per field under `path`, depth first; the rules found on the way go to `rules`.
fn fields(
    out: &mut String,
    rules: &mut Vec<(String, String)>,
    path: &str,
    schema: &JSONSchemaProps,
    required: bool,
) {
    let description = schema
        .description
        .as_deref()
        .map(one_line)
        .unwrap_or_default();
    let required = if required { " (required)" } else { "" };
    let _ = writeln!(
        out,
        "| `{path}` | {}{required} | {} |",
        type_of(schema),
        escape(&description)
    );
    for rule in schema.x_kubernetes_validations.iter().flatten() {
        let message = rule.message.clone().unwrap_or_else(|| rule.rule.clone());
        rules.push((path.to_owned(), message));
    }
    let required_fields = schema.required.clone().unwrap_or_default();
    for (name, child) in schema.properties.iter().flatten() {
        let child_path = format!("{path}.{name}");
        fields(
            out,
            rules,
            &child_path,
            child,
            required_fields.contains(name),
        );
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        if items.properties.is_some() {
            for (name, child) in items.properties.iter().flatten() {
                let child_path = format!("{path}[].{name}");
                let item_required = items.required.iter().flatten().any(|r| r == name);
                fields(out, rules, &child_path, child, item_required);
            }
            for rule in items.x_kubernetes_validations.iter().flatten() {
                let message = rule.message.clone().unwrap_or_else(|| rule.rule.clone());
                rules.push((format!("{path}[]"), message));
            }
        }
    }
}

fn type_of(schema: &JSONSchemaProps) -> String {
    let base = schema.type_.clone().unwrap_or_else(|| {
        if schema.x_kubernetes_int_or_string == Some(true) {
            "integer or string".into()
        } else {
            "object".into()
        }
    });
    let mut shown = match (&base[..], &schema.items) {
        ("array", Some(JSONSchemaPropsOrArray::Schema(items))) => {
            format!("array of {}", type_of(items))
        }
        _ => base,
    };
    if let Some(values) = &schema.enum_ {
        let values: Vec<String> = values
            .iter()
            .map(|v| v.0.as_str().map_or_else(|| v.0.to_string(), str::to_owned))
            .collect();
        let _ = write!(shown, ": {}", values.join(", "));
    }
    if let Some(format) = &schema.format {
        let _ = write!(shown, " ({format})");
    }
    shown
}

/// A description on one line of a table.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InferencePipeline;
    use kube::CustomResourceExt;

    #[test]
    fn every_field_and_rule_of_the_pipeline_is_in_its_reference() {
        let text = markdown(&[InferencePipeline::crd()]);
        for row in [
            "| `spec.mode` | string: Task, Actor (required) |",
            "| `spec.models[].source.uri` | string (required) |",
            "| `spec.task.parallelism` | integer (int32) |",
        ] {
            assert!(text.contains(row), "{row} in\n{text}");
        }
        assert!(text.contains("a Safetensors model is named tensors with no code to run them"));
        assert!(!text.contains("| `metadata"), "metadata is Kubernetes' own");
    }
}
