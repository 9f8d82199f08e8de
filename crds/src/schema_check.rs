//! A small stand-in for the apiserver's structural-schema defaulting and OpenAPI validation,
//! for unit tests only: it lets the examples be checked against the generated schema's bounds
//! (the part kube-cel does not evaluate) with the apiserver's own message formats, so that the
//! `# expect:` lines of the invalid examples are tested here before any apiserver sees them.
//! It covers the keywords our schemas use; anything else is ignored.

use serde_json::Value;

/// Fills in `default`s the way the apiserver does before validation: a missing property with
/// a default gets it, recursively (defaults of nested properties apply inside defaults too).
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (name, prop) in props {
                    if !map.contains_key(name)
                        && let Some(default) = prop.get("default")
                    {
                        map.insert(name.clone(), default.clone());
                    }
                }
                for (name, prop) in props {
                    if let Some(child) = map.get_mut(name) {
                        apply_defaults(prop, child);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties") {
                map.values_mut().for_each(|v| apply_defaults(extra, v));
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                items.iter_mut().for_each(|v| apply_defaults(item, v));
            }
        }
        _ => {}
    }
}

/// Validates `value` against `schema`; returns the apiserver-style messages
/// (`spec.mtu.size: Invalid value: 100: spec.mtu.size in body should be ...`).
pub fn check(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    walk(schema, value, "", &mut errors);
    errors
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

fn walk(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}",
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match ty {
        "string" => value.is_string(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!(
            "{path}: Invalid value: {value}: {path} in body must be of type {ty}"
        ));
        return;
    }

    if let Some(Value::Array(allowed)) = schema.get("enum")
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        errors.push(format!(
            "{path}: Unsupported value: {value}: supported values: {}",
            list.join(", ")
        ));
    }
    if let Some(max) = schema.get("maximum")
        && value.as_f64() > max.as_f64()
    {
        errors.push(format!(
            "{path}: Invalid value: {}: {path} in body should be less than or equal to {}",
            num(value),
            num(max)
        ));
    }
    if let Some(min) = schema.get("minimum")
        && value.as_f64() < min.as_f64()
    {
        errors.push(format!(
            "{path}: Invalid value: {}: {path} in body should be greater than or equal to {}",
            num(value),
            num(min)
        ));
    }

    match value {
        Value::String(s) => {
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && s.len() as u64 > max
            {
                errors.push(format!(
                    "{path}: Too long: may not be more than {max} bytes"
                ));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && (s.chars().count() as u64) < min
            {
                errors.push(format!(
                    "{path}: Invalid value: {value}: {path} in body should be at least {min} chars long"
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && !regex::Regex::new(pattern)
                    .expect("schema pattern compiles")
                    .is_match(s)
            {
                errors.push(format!(
                    "{path}: Invalid value: {value}: {path} in body should match '{pattern}'"
                ));
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.push(format!(
                    "{path}: Invalid value: {}: {path} in body should have at least {min} items",
                    items.len()
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(format!(
                    "{path}: Too many: {}: must have at most {max} items",
                    items.len()
                ));
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen: Vec<Vec<&Value>> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<&Value> = keys.iter().map(|k| &item[*k]).collect();
                    if seen.contains(&key) {
                        let shown: Vec<String> = keys
                            .iter()
                            .zip(&key)
                            .map(|(k, v)| format!("\"{k}\":{v}"))
                            .collect();
                        errors.push(format!(
                            "{path}[{i}]: Duplicate value: map[string]interface {{}}{{{}}}",
                            shown.join(", ")
                        ));
                    } else {
                        seen.push(key);
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(Value::Array(required)) = schema.get("required") {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        errors.push(format!("{}: Required value", child(path, name)));
                    }
                }
            }
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (name, prop) in props {
                    if let Some(v) = map.get(name) {
                        walk(prop, v, &child(path, name), errors);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties") {
                for (name, v) in map {
                    walk(extra, v, &child(path, name), errors);
                }
            }
        }
        _ => {}
    }
}
