//! The structural-schema checks an API server makes before a custom resource's CEL rules, so
//! that local mode refuses the same files a cluster would: types, unknown fields, required
//! fields, enums, patterns, bounds. Each problem names the field by its path.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// One field that does not conform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted path, with `[i]` for list items: `spec.model.uri`, `spec.tolerations[0].key`.
    pub field: String,
    pub message: String,
}

/// Every violation of `schema` in `value`, in document order.
pub fn violations(schema: &JSONSchemaProps, value: &Value) -> Vec<Violation> {
    let mut found = Vec::new();
    // The API server itself types apiVersion, kind and metadata; a CRD schema covers the rest.
    let mut body = value.clone();
    if let Value::Object(fields) = &mut body {
        for implicit in ["apiVersion", "kind", "metadata"] {
            fields.remove(implicit);
        }
    }
    check(schema, &body, "", &mut found);
    found
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &JSONSchemaProps, value: &Value, path: &str, found: &mut Vec<Violation>) {
    let mut violation = |message: String| {
        found.push(Violation {
            field: path.to_owned(),
            message,
        })
    };
    if value.is_null() {
        if schema.nullable != Some(true) {
            violation("must not be null".to_owned());
        }
        return;
    }
    let int_or_string = schema.x_kubernetes_int_or_string == Some(true);
    if int_or_string {
        if !matches!(value, Value::String(_)) && !matches!(type_name(value), "integer") {
            violation(format!(
                "must be an integer or a string, not {}",
                type_name(value)
            ));
        }
        return;
    }
    if let Some(expected) = schema.type_.as_deref() {
        let actual = type_name(value);
        let fits = actual == expected || (expected == "number" && actual == "integer");
        if !fits {
            violation(format!("must be {expected}, not {actual}"));
            return;
        }
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let names: Vec<String> = allowed.iter().map(|a| a.0.to_string()).collect();
        violation(format!("must be one of {}", names.join(", ")));
    }
    match value {
        Value::String(text) => check_string(schema, text, &mut violation),
        Value::Number(number) => {
            let number = number.as_f64().unwrap_or_default();
            if let Some(minimum) = schema.minimum {
                let exclusive = schema.exclusive_minimum == Some(true);
                if number < minimum || (exclusive && number == minimum) {
                    let bound = if exclusive {
                        "greater than"
                    } else {
                        "at least"
                    };
                    violation(format!("must be {bound} {minimum}"));
                }
            }
            if let Some(maximum) = schema.maximum {
                let exclusive = schema.exclusive_maximum == Some(true);
                if number > maximum || (exclusive && number == maximum) {
                    let bound = if exclusive { "less than" } else { "at most" };
                    violation(format!("must be {bound} {maximum}"));
                }
            }
        }
        Value::Array(items) => {
            let count = items.len() as i64;
            if schema.min_items.is_some_and(|min| count < min) {
                violation(format!(
                    "must have at least {} items",
                    schema.min_items.unwrap_or_default()
                ));
            }
            if schema.max_items.is_some_and(|max| count > max) {
                violation(format!(
                    "must have at most {} items",
                    schema.max_items.unwrap_or_default()
                ));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(item_schema)) = &schema.items {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), found);
                }
            }
        }
        Value::Object(fields) => check_object(schema, fields, path, found),
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_string(schema: &JSONSchemaProps, text: &str, violation: &mut impl FnMut(String)) {
    let length = text.chars().count() as i64;
    if let Some(min) = schema.min_length
        && length < min
    {
        violation(format!("must be at least {min} characters long"));
    }
    if let Some(max) = schema.max_length
        && length > max
    {
        violation(format!("must be at most {max} characters long"));
    }
    if let Some(pattern) = &schema.pattern {
        match regex::Regex::new(pattern) {
            Ok(regex) if !regex.is_match(text) => {
                violation(format!("{text:?} does not match {pattern}"));
            }
            Ok(_) => {}
            Err(e) => violation(format!("the schema's pattern {pattern} is invalid: {e}")),
        }
    }
}

fn check_object(
    schema: &JSONSchemaProps,
    fields: &serde_json::Map<String, Value>,
    path: &str,
    found: &mut Vec<Violation>,
) {
    for required in schema.required.iter().flatten() {
        if !fields.contains_key(required) {
            found.push(Violation {
                field: join(path, required),
                message: "is required".to_owned(),
            });
        }
    }
    let preserve_unknown = schema.x_kubernetes_preserve_unknown_fields == Some(true);
    for (name, value) in fields {
        let field = join(path, name);
        match (
            schema.properties.as_ref().and_then(|p| p.get(name)),
            &schema.additional_properties,
        ) {
            (Some(property), _) => check(property, value, &field, found),
            (None, Some(JSONSchemaPropsOrBool::Schema(values))) => {
                check(values, value, &field, found)
            }
            (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
            (None, _) if preserve_unknown || schema.properties.is_none() => {}
            (None, _) => found.push(Violation {
                field,
                message: "is not a field of this resource (misspelt?)".to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::json;

    use super::*;

    fn model_deployment_schema() -> JSONSchemaProps {
        crds::ModelDeployment::crd().spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.clone())
            .expect("the CRD has a schema")
    }

    fn fields_refused(value: Value) -> Vec<String> {
        violations(&model_deployment_schema(), &value)
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    fn model(spec: Value) -> Value {
        json!({
            "apiVersion": "infergate.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m"}, "spec": spec,
        })
    }

    #[test]
    fn a_valid_model_deployment_has_no_violations() {
        let valid = model(json!({
            "task": "embedding", "model": {"uri": "file:///models/minilm"},
            "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
            "timeouts": {"default": "30s", "max": "60s"},
        }));
        assert_eq!(fields_refused(valid), Vec::<String>::new());
    }

    #[test]
    fn each_kind_of_violation_names_its_field() {
        let cases = [
            (json!({"task": "embedding"}), "spec.model"),
            (
                json!({"task": "summarize", "model": {"uri": "file:///m"}}),
                "spec.task",
            ),
            (
                json!({"task": "embedding", "model": {"uri": "file:///m"}, "replicas": "two"}),
                "spec.replicas",
            ),
            (
                json!({"task": "embedding", "model": {"uri": "file:///m"}, "replicas": -1}),
                "spec.replicas",
            ),
            (
                json!({"task": "embedding", "model": {"uri": "file:///m"}, "modelVersionId": "-bad-"}),
                "spec.modelVersionId",
            ),
            (
                json!({"task": "embedding", "model": {"uri": "file:///m"}, "modelVersonId": "x"}),
                "spec.modelVersonId",
            ),
            (
                json!({"task": "embedding", "model": {"uri": "file:///m"}, "tolerations": [{"key": 1}]}),
                "spec.tolerations[0].key",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(fields_refused(model(spec.clone())), [field], "{spec}");
        }
    }
}
