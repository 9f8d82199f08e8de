//! The pool CRD: its examples through every validation layer (Rust, schema bounds with the
//! apiserver's messages, CEL with kube-cel), defaults, and the Rust rules on their own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use serde_json::Value;

use super::*;
use crate::crd::tests::schema_of;
use crate::schema_check;

fn pool_schema() -> Value {
    let crd = crate::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "LoadBalancerIPPool")
        .expect("the pool is among the CRDs");
    schema_of(&crd)
}

fn files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/pools")
        .join(kind);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no examples in {}", dir.display());
    out
}

fn defaulted(text: &str) -> Value {
    let mut value: Value = serde_yaml::from_str(text).unwrap();
    schema_check::apply_defaults(&pool_schema(), &mut value);
    value
}

fn schema_errors(text: &str) -> Vec<String> {
    schema_check::check(&pool_schema(), &defaulted(text))
}

fn cel_errors(text: &str) -> Vec<String> {
    match kube::core::cel::Validator::new().validate(&pool_schema(), &defaulted(text), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn rust_errors(text: &str) -> Result<LoadBalancerIPPool, String> {
    let pool: LoadBalancerIPPool = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    pool.spec.validate().map_err(|e| e.to_string())?;
    Ok(pool)
}

fn header<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {name}:")))
        .unwrap_or_else(|| panic!("no `# {name}:` line"))
        .trim()
}

#[test]
fn valid_pool_examples_pass_every_layer() {
    for path in files("valid") {
        let name = path.display();
        let text = std::fs::read_to_string(&path).unwrap();
        let pool = rust_errors(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(schema_errors(&text), Vec::<String>::new(), "{name}");
        assert_eq!(cel_errors(&text), Vec::<String>::new(), "{name}");
        // The apiserver's defaults read back as serde's.
        let spec: LoadBalancerIPPoolSpec =
            serde_json::from_value(defaulted(&text)["spec"].clone()).unwrap();
        assert_eq!(spec, pool.spec, "{name}");
    }
}

#[test]
fn invalid_pool_examples_are_refused_by_rust_and_by_their_layer() {
    for path in files("invalid") {
        let name = path.display();
        let text = std::fs::read_to_string(&path).unwrap();
        let (expect, layer) = (header(&text, "expect"), header(&text, "layer"));
        let rust = rust_errors(&text).err();
        assert!(rust.is_some(), "{name}: accepted by the Rust validation");
        let schema = schema_errors(&text);
        let cel = cel_errors(&text);
        match layer {
            "schema" => assert!(
                schema.iter().any(|e| e.contains(expect)),
                "{name}: {schema:#?}"
            ),
            "cel" => {
                assert!(
                    schema.is_empty(),
                    "{name}: a `cel` case fails the schema: {schema:#?}"
                );
                assert!(cel.iter().any(|e| e.contains(expect)), "{name}: {cel:#?}");
            }
            // Accepted by every apiserver; the operator refuses it with this message.
            "operator" => {
                assert!(
                    schema.is_empty() && cel.is_empty(),
                    "{name}: {schema:#?} {cel:#?}"
                );
                let rust = rust.unwrap();
                assert!(rust.contains(expect), "{name}: {rust}");
            }
            other => panic!("{name}: unknown layer {other:?}"),
        }
    }
}

#[test]
fn cel_accepts_every_form_the_rust_parser_accepts() {
    for address in [
        "10.0.0.0/8",
        "10.0.0.1",
        "10.0.0.1-10.0.0.1",
        "2001:db8::/64",
        "2001:db8::1-2001:db8::ff",
        "::1",
        "0.0.0.0/0",
    ] {
        let text = format!(
            "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: x}}\nspec: {{addresses: ['{address}']}}\n"
        );
        assert!(rust_errors(&text).is_ok(), "{address}");
        assert_eq!(schema_errors(&text), Vec::<String>::new(), "{address}");
        assert_eq!(cel_errors(&text), Vec::<String>::new(), "{address}");
    }
}

#[test]
fn the_pool_is_cluster_scoped_and_defaults_to_auto_assign() {
    let crd = LoadBalancerIPPool::crd();
    assert_eq!(crd.spec.scope, "Cluster");
    let pool: LoadBalancerIPPoolSpec = serde_yaml::from_str("addresses: [10.0.0.0/30]").unwrap();
    assert!(pool.auto_assign && !pool.avoid_buggy_ips);
    assert_eq!(pool.load_balancer(), PoolLoadBalancer::default());
    assert_eq!(
        pool.load_balancer().spec(None),
        LoadBalancerSpec::default(),
        "the default settings are a default LoadBalancer's"
    );
    let json = serde_json::to_value(&pool).unwrap();
    assert_eq!(json["avoidBuggyIPs"], false);
}

#[test]
fn admission_needs_every_condition_given() {
    let spec: LoadBalancerIPPoolSpec = serde_yaml::from_str(
        "addresses: [10.0.0.0/30]\nserviceAllocation:\n  namespaces: [shop]\n  serviceSelector: {matchLabels: {tier: edge}}\n",
    )
    .unwrap();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let edge = labels(&[("tier", "edge")]);
    assert!(spec.admits("shop", &labels(&[]), &edge));
    assert!(!spec.admits("dev", &labels(&[]), &edge));
    assert!(!spec.admits("shop", &labels(&[]), &labels(&[])));
    let open: LoadBalancerIPPoolSpec = serde_yaml::from_str("addresses: [10.0.0.0/30]").unwrap();
    assert!(open.admits("any", &labels(&[]), &labels(&[])));
    let by_ns_label: LoadBalancerIPPoolSpec = serde_yaml::from_str(
        "addresses: [10.0.0.0/30]\nserviceAllocation: {namespaceSelector: {matchLabels: {team: web}}}\n",
    )
    .unwrap();
    assert!(by_ns_label.admits("x", &labels(&[("team", "web")]), &labels(&[])));
    assert!(!by_ns_label.admits("x", &labels(&[("team", "db")]), &labels(&[])));
}

#[test]
fn every_error_is_reported_with_its_path() {
    let spec: LoadBalancerIPPoolSpec = serde_yaml::from_str(
        "addresses: [nope, 10.0.0.0/24, 10.0.0.128/25]\nserviceAllocation: {namespaces: [Bad]}\nloadBalancer: {hashing: {maglevTableSize: 8}}\n",
    )
    .unwrap();
    let errors = spec.validate().unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.addresses[0]",
            "spec.addresses[2]",
            "spec.serviceAllocation.namespaces[0]",
            "spec.loadBalancer.hashing.maglevTableSize"
        ],
        "{errors}"
    );
    assert!(
        errors
            .to_string()
            .contains("overlaps spec.addresses[1] (10.0.0.0-10.0.0.255)")
    );
}
