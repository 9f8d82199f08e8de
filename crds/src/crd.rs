//! The CustomResourceDefinitions, as written to `crds/yaml/` by the `crdgen` binary.
//!
//! Two variants of each CRD are generated from the same Rust types:
//! - current (`crds/yaml/*.yaml`): with the CEL `x-kubernetes-validations` rules. They use the
//!   Kubernetes CEL IP/CIDR library, so they need Kubernetes 1.31 or newer.
//! - legacy (`crds/yaml/legacy-1.20/*.yaml`): the same schema without any
//!   `x-kubernetes-validations`, which Kubernetes 1.20 does not know. Schema bounds (sizes,
//!   ranges, enums, patterns, list-map uniqueness) still apply there; the CEL-only rules are
//!   enforced by the operator's and the agent's Rust validation.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::loadbalancer::LoadBalancer;
use crate::node_state::LoadBalancerNodeState;
use crate::pool::LoadBalancerIPPool;

/// Directory (under `crds/yaml/`) of the CRDs for apiservers without CEL.
pub const LEGACY_DIR: &str = "legacy-1.20";

/// The command that regenerates the committed YAML.
pub const REGENERATE: &str = "cargo run -p marklb-crds --bin crdgen";

/// Every CRD of the API group, current variant (with CEL rules). Use these rather than
/// `LoadBalancer::crd()`: they also carry the fixes below.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        fix_formats(&LoadBalancer::crd()),
        fix_formats(&LoadBalancerNodeState::crd()),
        fix_formats(&LoadBalancerIPPool::crd()),
    ]
}

/// schemars names Rust's unsigned types (`uint16`, `uint32`, `uint64`), which the apiserver
/// does not know and warns about on every apply. Their bounds are already in
/// `minimum`/`maximum`; the format becomes the OpenAPI integer format that holds them.
fn fix_formats(crd: &CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                let replacement = match map.get("format").and_then(|f| f.as_str()) {
                    Some("uint8" | "uint16") => Some("int32"),
                    Some("uint32" | "uint64") => Some("int64"),
                    _ => None,
                };
                if let Some(format) = replacement {
                    map.insert("format".into(), format.into());
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("changing integer formats keeps a valid CRD")
}

/// The same CRD for Kubernetes 1.20, which knows neither CEL nor empty strings:
/// - every `x-kubernetes-validations` is removed;
/// - string fields that may legitimately be empty (a condition's `message`, a node selector's
///   value: strings with no `minLength`, `pattern`, `enum`, `format` or CEL rule) are made
///   `nullable`. 1.20's OpenAPI validator reads `""` as null and refuses it in a non-nullable
///   field ("must be of type string: \"null\""), so without this an agent could not write a
///   condition with an empty message there.
pub fn without_cel(crd: &CustomResourceDefinition) -> CustomResourceDefinition {
    let mut value = serde_json::to_value(crd).expect("a CRD serializes to JSON");
    allow_empty_strings(&mut value);
    strip_key(&mut value, "x-kubernetes-validations");
    serde_json::from_value(value).expect("the 1.20 changes keep a valid CRD")
}

fn allow_empty_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let constrained = [
                "minLength",
                "pattern",
                "enum",
                "format",
                "x-kubernetes-validations",
            ]
            .iter()
            .any(|k| map.contains_key(*k));
            if map.get("type").and_then(|t| t.as_str()) == Some("string") && !constrained {
                map.insert("nullable".into(), true.into());
            }
            // List-map keys may not be nullable (and must not be empty anyway).
            let keys: Vec<String> = map
                .get("x-kubernetes-list-map-keys")
                .and_then(|k| k.as_array())
                .map(|k| {
                    k.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for (name, child) in map.iter_mut() {
                if name == "items" && !keys.is_empty() {
                    allow_empty_strings_except(child, &keys);
                } else {
                    allow_empty_strings(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(allow_empty_strings),
        _ => {}
    }
}

/// [`allow_empty_strings`] on a list-map item schema, leaving its key properties alone.
fn allow_empty_strings_except(item: &mut serde_json::Value, keys: &[String]) {
    let Some(map) = item.as_object_mut() else {
        return;
    };
    for (name, child) in map.iter_mut() {
        match (name.as_str(), child.as_object_mut()) {
            ("properties", Some(props)) => {
                for (prop, schema) in props.iter_mut() {
                    if !keys.contains(prop) {
                        allow_empty_strings(schema);
                    }
                }
            }
            _ => allow_empty_strings(child),
        }
    }
}

fn strip_key(value: &mut serde_json::Value, key: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

/// One file crdgen writes: path relative to `crds/yaml/`, and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: PathBuf,
    pub contents: String,
}

/// Every file under `crds/yaml/`: each CRD in its current and its legacy variant.
pub fn generated_files() -> Vec<GeneratedFile> {
    let mut files = Vec::new();
    for crd in crds() {
        let name = format!(
            "{}.yaml",
            crd.metadata
                .name
                .as_deref()
                .expect("derived CRDs are named")
        );
        files.push(GeneratedFile {
            path: PathBuf::from(&name),
            contents: render(
                &crd,
                "Kubernetes 1.31 or newer (CEL validation rules included)",
            ),
        });
        files.push(GeneratedFile {
            path: Path::new(LEGACY_DIR).join(&name),
            contents: render(
                &without_cel(&crd),
                "Kubernetes 1.20 to 1.30: no x-kubernetes-validations (CEL); the operator and \
                 agent enforce those rules in Rust",
            ),
        });
    }
    files
}

fn render(crd: &CustomResourceDefinition, target: &str) -> String {
    let yaml = to_yaml(crd);
    format!("# Generated by `{REGENERATE}` from crds/src; do not edit.\n# For {target}.\n{yaml}")
}

/// A CRD as YAML that YAML 1.1 readers (kubectl, Helm) read back unchanged.
///
/// serde_yaml writes YAML 1.2, where a bare `Off` is a string; kubectl's YAML 1.1 parser reads
/// it as `false`, which turned the `Off` of the mark-scope enum into `"false"` on a real
/// apiserver. Plain scalars that YAML 1.1 reads as booleans are therefore quoted.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    quote_yaml11_booleans(&serde_yaml::to_string(crd).expect("a CRD serializes to YAML"))
}

/// The plain scalars YAML 1.1 resolves to booleans (`true`/`false` are quoted by serde_yaml).
const YAML11_BOOLEANS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// Quotes the plain scalars of block-style YAML (as serde_yaml writes it) that YAML 1.1 would
/// read as booleans: values after `key: ` or `- `. The contents of block scalars (`|-`
/// descriptions) are text and left alone.
fn quote_yaml11_booleans(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    // Indentation of the line that opened the block scalar we are in, if any.
    let mut block: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(parent) = block {
            if line.trim().is_empty() || indent > parent {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block = None;
        }
        let mut rest = &line[indent..];
        let mut prefix_len = indent;
        while let Some(r) = rest.strip_prefix("- ") {
            rest = r;
            prefix_len += 2;
        }
        let value = match rest.split_once(": ") {
            Some((key, value)) if !key.starts_with(['\'', '"']) => {
                prefix_len += key.len() + 2;
                value
            }
            _ => rest,
        };
        if ["|", "|-", "|+", ">", ">-", ">+"].contains(&value) {
            block = Some(indent);
        }
        if YAML11_BOOLEANS.contains(&value) {
            out.push_str(&line[..prefix_len]);
            out.push('\'');
            out.push_str(value);
            out.push('\'');
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
