//! The address pool CRD (`LoadBalancerIPPool`) against real API servers, with the examples of
//! `crds/examples/pools/`: on the current apiextensions-apiserver (CEL) every valid example is
//! accepted and every invalid one of layer `schema` or `cel` is refused with the error its
//! `# expect:` header names; on kube-apiserver 1.20 (no CEL) the `schema` ones are refused (with
//! `# expect-legacy:` when 1.20 words it differently) and
//! the `cel` ones accepted (the operator's Rust validation refuses them: pool `Valid=False`).
//! Examples of layer `operator` (reversed range, overlapping blocks, a selector without
//! values) are accepted by both: only the operator can tell, and does. Each server starts once
//! per test (a few seconds).

use std::fs;
use std::path::{Path, PathBuf};

use marklb_tests::kube_harness::{
    Flavor, KubeServer, create_value, install_crds, report, yaml_documents,
};
use marklb_tests::kube_server_or_skip;

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

fn yaml_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

fn header(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map_while(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

fn short_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => status.message.clone(),
        _ => format!("{e:#}"),
    }
}

/// Installs the pool CRD of `flavor`, creates every example; returns (accepted valid,
/// rejected invalid, accepted invalid) after asserting each behaved as its header says.
async fn check_pool_examples(server: &KubeServer) -> (usize, usize, usize) {
    let client = server.client().await.unwrap();
    let mut crd = crds_dir().join("yaml");
    if server.flavor() == Flavor::Kube120 {
        crd = crd.join("legacy-1.20");
    }
    let text = fs::read_to_string(crd.join("loadbalancerippools.marklb.io.yaml")).unwrap();
    install_crds(&client, &text)
        .await
        .expect("installing the pool CRD");
    let examples = crds_dir().join("examples/pools");
    let mut valid = 0;
    for path in yaml_in(&examples.join("valid")) {
        for doc in yaml_documents(&fs::read_to_string(&path).unwrap()).unwrap() {
            create_value(&client, &doc).await.unwrap_or_else(|e| {
                panic!(
                    "{}: {} refused a valid pool: {}",
                    path.display(),
                    server.flavor(),
                    short_error(&e)
                )
            });
        }
        valid += 1;
    }
    let (mut rejected, mut accepted, mut failures) = (0, 0, Vec::new());
    for path in yaml_in(&examples.join("invalid")) {
        let text = fs::read_to_string(&path).unwrap();
        let mut expect = header(&text, "expect").expect("# expect:");
        if server.flavor() == Flavor::Kube120 {
            // 1.20 words some messages differently (set items without their index).
            expect = header(&text, "expect-legacy").unwrap_or(expect);
        }
        let layer = header(&text, "layer").expect("# layer:");
        let must_reject = match layer.as_str() {
            "schema" => true,
            "cel" => server.flavor() == Flavor::Current,
            _ => false,
        };
        let mut errors = Vec::new();
        for doc in yaml_documents(&text).unwrap() {
            if let Err(e) = create_value(&client, &doc).await {
                errors.push(short_error(&e));
            }
        }
        match (must_reject, errors.is_empty()) {
            (true, false) if errors.iter().any(|m| m.contains(&expect)) => rejected += 1,
            (false, true) => accepted += 1,
            _ => failures.push(format!(
                "{}: layer {layer}, {} must {}: {errors:?} (expected {expect:?})",
                path.display(),
                server.flavor(),
                if must_reject {
                    "refuse it"
                } else {
                    "accept it"
                }
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    (valid, rejected, accepted)
}

#[tokio::test]
async fn pool_examples_on_current() {
    let server = kube_server_or_skip!(Flavor::Current);
    let (valid, rejected, accepted) = check_pool_examples(&server).await;
    assert!(rejected >= 6, "{rejected}");
    report(&format!(
        "apiextensions-apiserver (CEL): {valid} valid pools accepted, {rejected} invalid refused with the expected error, {accepted} accepted for the operator to refuse"
    ));
}

#[tokio::test]
async fn pool_examples_on_kube120() {
    let server = kube_server_or_skip!(Flavor::Kube120);
    let (valid, rejected, accepted) = check_pool_examples(&server).await;
    report(&format!(
        "kube-apiserver 1.20 (no CEL): {valid} valid pools accepted, {rejected} schema-layer invalid refused, {accepted} accepted for the operator to refuse"
    ));
}
