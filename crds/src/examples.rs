//! Runs every manifest of `crds/examples/` through all three validation layers: the Rust
//! validation (`from_yaml_manifest`), the generated schema's bounds (`schema_check`, with the
//! apiserver's message formats), and the CEL rules (kube-cel). Valid examples must pass all
//! three; each invalid one must be refused by Rust and by the layer its header names, with the
//! `# expect:` text in the message (see `crds/examples/README.md`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::crd::tests::loadbalancer_schema;
use crate::{from_yaml_manifest, schema_check};

fn example_files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

/// The manifest as the apiserver sees it after defaulting (JSON).
fn defaulted(text: &str) -> Value {
    let mut value: Value = serde_yaml::from_str(text).expect("examples are YAML");
    schema_check::apply_defaults(&loadbalancer_schema(), &mut value);
    value
}

fn schema_errors(text: &str) -> Vec<String> {
    schema_check::check(&loadbalancer_schema(), &defaulted(text))
}

fn cel_errors(text: &str) -> Vec<String> {
    let validator = kube::core::cel::Validator::new();
    match validator.validate(&loadbalancer_schema(), &defaulted(text), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

struct Header {
    expect: String,
    layer: String,
}

fn header(path: &Path, text: &str) -> Header {
    let field = |name: &str| {
        text.lines()
            .take_while(|l| l.starts_with('#'))
            .find_map(|l| {
                l.strip_prefix(&format!("# {name}:"))
                    .map(|v| v.trim().to_string())
            })
    };
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("# expect: "),
        "{}: must start with `# expect: `",
        path.display()
    );
    Header {
        expect: field("expect").unwrap(),
        layer: field("layer").unwrap_or_else(|| panic!("{}: no `# layer:` line", path.display())),
    }
}

#[test]
fn valid_examples_pass_every_layer() {
    for path in example_files("valid") {
        let name = path.display();
        let text = std::fs::read_to_string(&path).unwrap();
        let lb = from_yaml_manifest(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let errors = schema_errors(&text);
        assert!(errors.is_empty(), "{name}: schema: {errors:#?}");
        let errors = cel_errors(&text);
        assert!(errors.is_empty(), "{name}: CEL: {errors:#?}");
        // The apiserver's defaults and serde's defaults agree on every example.
        let spec: crate::LoadBalancerSpec =
            serde_json::from_value(defaulted(&text)["spec"].clone()).unwrap();
        assert_eq!(
            spec, lb.spec,
            "{name}: schema defaults differ from serde defaults"
        );
    }
}

#[test]
fn invalid_examples_are_refused_by_rust_and_by_their_layer() {
    for path in example_files("invalid") {
        let name = path.display();
        let text = std::fs::read_to_string(&path).unwrap();
        let h = header(&path, &text);
        assert!(
            from_yaml_manifest(&text).is_err(),
            "{name}: accepted by from_yaml_manifest"
        );
        let schema = schema_errors(&text);
        match h.layer.as_str() {
            "schema" => {
                assert!(
                    schema.iter().any(|e| e.contains(&h.expect)),
                    "{name}: no schema error contains {:?}: {schema:#?}",
                    h.expect
                );
            }
            "cel" => {
                // CEL-only cases must pass the schema, or the 1.20 apiserver (no CEL) would
                // refuse them for another reason than the one the file documents.
                assert!(
                    schema.is_empty(),
                    "{name}: a `cel` case fails the schema: {schema:#?}"
                );
                let cel = cel_errors(&text);
                assert!(
                    cel.iter().any(|e| e.contains(&h.expect)),
                    "{name}: no CEL error contains {:?}: {cel:#?}",
                    h.expect
                );
            }
            other => panic!("{name}: unknown layer {other:?}"),
        }
    }
}

#[test]
fn cel_rules_accept_edge_cases_the_rust_validation_accepts() {
    // Cases that are easy to get wrong in CEL: guards for absent lists and for invalid
    // addresses (reported by the address rule alone, not as evaluation errors of the others).
    let base = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: x}\n";
    for spec in [
        "spec: {}",
        "spec: {vips: []}",
        "spec: {vips: [{address: 10.0.0.1}]}",
        "spec: {vips: [{address: '2001:db8::1', backends: []}]}",
        "spec: {vips: [{address: 10.0.0.1, backends: [{address: '2001:db8::1'}]}]}",
        "spec: {vips: [{name: a, address: 10.0.0.1, port: 1}, {name: b, address: 10.0.0.1, port: 2}, {address: 10.0.0.1, port: 3}]}",
        "spec: {encap: {sourcePrefixV4: 10.255.0.0/16, sourcePrefixV6: 'fd00::/96'}}",
        "spec: {nextHop: {address: 'fe80::1'}, interface: eth0}",
    ] {
        let text = format!("{base}{spec}\n");
        assert!(from_yaml_manifest(&text).is_ok(), "{spec}");
        assert_eq!(cel_errors(&text), Vec::<String>::new(), "{spec}");
    }
    let text =
        format!("{base}spec: {{vips: [{{address: nope, backends: [{{address: 10.1.0.1}}]}}]}}\n");
    let errors = cel_errors(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("must be an IPv4 or IPv6 address"),
        "{errors:#?}"
    );
}
