//! Reading a LoadBalancer manifest file without an apiserver (`marklb-agent run --config`).
//!
//! The file is the same YAML a user would `kubectl apply`, so it is checked the way the
//! apiserver would check it, with messages that name the field: header first (so a Service
//! manifest is reported as the wrong kind, not as a pile of unknown fields), then strict
//! parsing (unknown fields are errors, serde_yaml's path and line in the message), then
//! [`LoadBalancerSpec::validate`](crate::LoadBalancerSpec::validate).

use kube::Resource;
use serde::Deserialize;

use crate::loadbalancer::{LoadBalancer, LoadBalancerSpec, LoadBalancerStatus};
use crate::validate::ValidationErrors;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML, or a field is unknown or of the wrong type (the message has its path).
    #[error("invalid LoadBalancer manifest: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// The document is not a mapping (e.g. an empty file or a list).
    #[error(
        "invalid LoadBalancer manifest: expected a mapping with apiVersion, kind, metadata and spec"
    )]
    NotAMapping,
    /// `apiVersion` is missing or not `marklb.io/v1alpha1`.
    #[error("apiVersion: expected {expected:?}, got {found:?}")]
    ApiVersion { expected: String, found: String },
    /// `kind` is missing or not `LoadBalancer`.
    #[error("kind: expected {expected:?}, got {found:?}")]
    Kind { expected: String, found: String },
    /// A field under `metadata` that ObjectMeta does not have.
    #[error("metadata.{0}: unknown field")]
    UnknownMetadataField(String),
    /// `metadata.name` is missing or empty.
    #[error("metadata.name: required")]
    MissingName,
    /// `spec:` is present but empty (null). Refused rather than read as "no VIPs": a file
    /// caught half-written looks exactly like this, and would remove every VIP.
    #[error("spec: empty; write `spec: {{}}` to serve no VIPs")]
    EmptySpec,
    /// The spec parsed but breaks a rule (one line per error).
    #[error("invalid LoadBalancer spec:\n{0}")]
    Invalid(#[from] ValidationErrors),
    /// An error in one document of a multi-document file (see [`from_yaml_manifests`]).
    #[error("document {index} (starting at line {line}): {source}")]
    InDocument {
        /// 1-based position of the document in the file.
        index: usize,
        /// 1-based line where the document starts.
        line: usize,
        /// What is wrong with it.
        #[source]
        source: Box<ManifestError>,
    },
}

/// Fields of `metadata` (ObjectMeta) as the API spells them. k8s-openapi's ObjectMeta ignores
/// unknown fields when deserializing, so typos such as `nmae` are caught against this list.
const OBJECT_META_FIELDS: &[&str] = &[
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Manifest {
    #[allow(dead_code)] // checked before the strict parse
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: LoadBalancerSpec,
    #[serde(default)]
    status: Option<LoadBalancerStatus>,
}

/// Parses one LoadBalancer manifest (`apiVersion: marklb.io/v1alpha1`, `kind: LoadBalancer`,
/// `metadata` with a `name`, `spec`), applies the spec's defaults and validates it.
pub fn from_yaml_manifest(text: &str) -> Result<LoadBalancer, ManifestError> {
    let value: serde_yaml::Value = serde_yaml::from_str(text)?;
    let map = value.as_mapping().ok_or(ManifestError::NotAMapping)?;
    let field = |name: &str| -> String {
        match map.get(name) {
            None | Some(serde_yaml::Value::Null) => String::new(),
            Some(serde_yaml::Value::String(s)) => s.clone(),
            Some(other) => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    };
    let expected_api_version = LoadBalancer::api_version(&()).into_owned();
    let api_version = field("apiVersion");
    if api_version != expected_api_version {
        return Err(ManifestError::ApiVersion {
            expected: expected_api_version,
            found: api_version,
        });
    }
    let expected_kind = LoadBalancer::kind(&()).into_owned();
    let kind = field("kind");
    if kind != expected_kind {
        return Err(ManifestError::Kind {
            expected: expected_kind,
            found: kind,
        });
    }
    if matches!(map.get("spec"), Some(serde_yaml::Value::Null)) {
        return Err(ManifestError::EmptySpec);
    }
    if let Some(serde_yaml::Value::Mapping(meta)) = map.get("metadata") {
        for key in meta.keys() {
            let key = key.as_str().unwrap_or_default();
            if !OBJECT_META_FIELDS.contains(&key) {
                return Err(ManifestError::UnknownMetadataField(key.to_string()));
            }
        }
    }

    // Parse the text again (not the Value) so that serde_yaml errors carry line numbers.
    let manifest: Manifest = serde_yaml::from_str(text)?;
    if manifest
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(ManifestError::MissingName);
    }
    manifest.spec.validate()?;
    let mut lb = LoadBalancer::new("", manifest.spec);
    lb.metadata = manifest.metadata;
    lb.status = manifest.status;
    Ok(lb)
}

/// Parses a file of one or more LoadBalancer manifests separated by `---` lines (as
/// `kubectl apply -f` accepts), each checked like [`from_yaml_manifest`]. Documents holding only
/// comments are skipped. Errors name the document and the line it starts at.
pub fn from_yaml_manifests(text: &str) -> Result<Vec<LoadBalancer>, ManifestError> {
    // Each document is padded with the blank lines before it, so that serde_yaml's line numbers
    // are lines of the file.
    let mut documents: Vec<(usize, String)> = vec![(1, String::new())];
    for (n, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---#") {
            documents.push((n + 2, "\n".repeat(n + 1)));
        } else {
            let doc = &mut documents.last_mut().expect("never empty").1;
            doc.push_str(line);
            doc.push('\n');
        }
    }
    let mut lbs = Vec::new();
    for (index, (line, doc)) in documents.iter().enumerate() {
        let blank = doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            continue;
        }
        let lb = from_yaml_manifest(doc).map_err(|e| ManifestError::InDocument {
            index: index + 1,
            line: *line,
            source: Box::new(e),
        })?;
        lbs.push(lb);
    }
    Ok(lbs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
apiVersion: marklb.io/v1alpha1
kind: LoadBalancer
metadata:
  name: web
spec:
  vips:
    - address: 10.0.0.10
      port: 80
      backends:
        - address: 10.1.0.1
";

    fn err(text: &str) -> String {
        from_yaml_manifest(text)
            .expect_err("manifest should be refused")
            .to_string()
    }

    #[test]
    fn minimal_manifest_gets_every_default() {
        let lb = from_yaml_manifest(MINIMAL).unwrap();
        assert_eq!(lb.metadata.name.as_deref(), Some("web"));
        let json = serde_json::to_value(&lb).unwrap();
        assert_eq!(json["apiVersion"], "marklb.io/v1alpha1");
        assert_eq!(json["kind"], "LoadBalancer");
        let spec = &lb.spec;
        assert_eq!(spec.vips[0].protocol, crate::Protocol::Tcp);
        assert_eq!(spec.vips[0].backends[0].weight, 1);
        assert_eq!(spec.hashing.maglev_table_size, 65_537);
        assert_eq!(spec.flow_marks.scope, crate::MarkScope::PerFlow);
        assert_eq!(spec.flow_marks.capacity, 65_535);
        assert_eq!(spec.flow_marks.idle_timeout_seconds, 30);
        assert_eq!(spec.mtu.size, 1500);
        assert_eq!(spec.mtu.too_big, crate::TooBig::Icmp);
        assert!(spec.icmp_echo);
        assert_eq!(spec.next_hop, None);
        assert_eq!(spec.encap.source_prefix_v4, "172.16.0.0/16");
        assert_eq!(spec.encap.source_prefix_v6, "fc00:6d6c:62::/96");
        assert_eq!(spec.node_selector, None);
        assert_eq!(spec.interface, None);
    }

    #[test]
    fn empty_spec_is_a_valid_loadbalancer_without_vips() {
        let text =
            "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: x}\nspec: {}\n";
        let lb = from_yaml_manifest(text).unwrap();
        assert_eq!(lb.spec, LoadBalancerSpec::default());
    }

    #[test]
    fn a_null_spec_is_refused_not_read_as_no_vips() {
        // What a file caught half-written looks like: applying it would remove every VIP.
        let text =
            "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: x}\nspec:\n";
        assert!(err(text).contains("spec: empty"), "{}", err(text));
    }

    #[test]
    fn wrong_api_version_is_named() {
        let e = err(&MINIMAL.replace("marklb.io/v1alpha1", "marklb.io/v1"));
        assert_eq!(
            e,
            r#"apiVersion: expected "marklb.io/v1alpha1", got "marklb.io/v1""#
        );
        let e = err(&MINIMAL.replace("apiVersion: marklb.io/v1alpha1\n", ""));
        assert_eq!(e, r#"apiVersion: expected "marklb.io/v1alpha1", got """#);
    }

    #[test]
    fn wrong_kind_is_named_before_spec_errors() {
        let e = err(&MINIMAL.replace("kind: LoadBalancer", "kind: Service"));
        assert_eq!(e, r#"kind: expected "LoadBalancer", got "Service""#);
    }

    #[test]
    fn unknown_spec_field_has_path_and_line() {
        let e = err(&MINIMAL.replace("- address: 10.1.0.1", "- adress: 10.1.0.1"));
        assert!(
            e.contains("spec.vips[0].backends[0]: unknown field `adress`"),
            "{e}"
        );
        assert!(e.contains("line 10"), "{e}");
        let e = err(&MINIMAL.replace("spec:\n", "spec:\n  hashng: {}\n"));
        assert!(e.contains("spec: unknown field `hashng`"), "{e}");
        let e = err(&format!(
            "{MINIMAL}  flowMarks:\n    scope: PerFlow\n    capcity: 5\n"
        ));
        assert!(e.contains("spec.flowMarks: unknown field `capcity`"), "{e}");
    }

    #[test]
    fn unknown_top_level_and_metadata_fields_are_errors() {
        let e = err(&format!("{MINIMAL}extra: 1\n"));
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = err(&MINIMAL.replace("  name: web", "  nmae: web"));
        assert_eq!(e, "metadata.nmae: unknown field");
    }

    #[test]
    fn wrong_types_and_enum_values_have_paths() {
        let e = err(&MINIMAL.replace("port: 80", "port: 70000"));
        assert!(e.contains("spec.vips[0].port"), "{e}");
        let e = err(&MINIMAL.replace("port: 80", "port: 80\n      protocol: SCTP"));
        assert!(
            e.contains("spec.vips[0].protocol: unknown variant `SCTP`"),
            "{e}"
        );
    }

    #[test]
    fn missing_name_spec_and_non_mappings_are_refused() {
        let e = err(&MINIMAL.replace("  name: web\n", "  labels: {a: b}\n"));
        assert_eq!(e, "metadata.name: required");
        let e = err("apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: x}\n");
        assert!(e.contains("missing field `spec`"), "{e}");
        assert!(matches!(
            from_yaml_manifest("- a\n- b\n"),
            Err(ManifestError::NotAMapping)
        ));
        assert!(matches!(
            from_yaml_manifest(""),
            Err(ManifestError::Yaml(_) | ManifestError::NotAMapping)
        ));
    }

    #[test]
    fn spec_rules_run_and_report_every_error() {
        let text = MINIMAL
            .replace("address: 10.1.0.1", "address: 10.0.0.300")
            .replace("spec:\n", "spec:\n  mtu: {size: 100}\n");
        let e = from_yaml_manifest(&text).unwrap_err();
        let ManifestError::Invalid(errors) = &e else {
            panic!("{e}")
        };
        assert_eq!(errors.len(), 2, "{errors}");
        let text = e.to_string();
        assert!(
            text.contains(r#"spec.vips[0].backends[0].address: "10.0.0.300" is not an IP address"#),
            "{text}"
        );
        assert!(
            text.contains("spec.mtu.size: 100 is out of range"),
            "{text}"
        );
    }

    #[test]
    fn multi_document_files_yield_every_loadbalancer() {
        let other = MINIMAL
            .replace("name: web", "name: dns")
            .replace("10.0.0.10", "10.0.0.53");
        let text = format!("# two LBs\n---\n{MINIMAL}---\n# comment only\n---\n{other}");
        let lbs = from_yaml_manifests(&text).unwrap();
        let names: Vec<_> = lbs
            .iter()
            .map(|lb| lb.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["web", "dns"]);
        assert_eq!(from_yaml_manifests(MINIMAL).unwrap().len(), 1);
        assert!(from_yaml_manifests("# nothing\n").unwrap().is_empty());
    }

    #[test]
    fn multi_document_errors_name_the_document_and_its_line() {
        let bad = MINIMAL.replace("port: 80", "port: 80\n      protocol: SCTP");
        let text = format!("{MINIMAL}---\n{bad}");
        let e = from_yaml_manifests(&text).unwrap_err().to_string();
        assert!(e.starts_with("document 2 (starting at line 12): "), "{e}");
        assert!(
            e.contains("spec.vips[0].protocol: unknown variant `SCTP`"),
            "{e}"
        );
        // Line numbers inside the message are lines of the file, not of the document.
        assert!(e.contains("at line 20 column"), "{e}");
        // Line numbers inside the message are lines of the file, not of the document.
        assert!(e.contains("at line 20 column"), "{e}");
    }

    #[test]
    fn status_and_server_metadata_are_accepted() {
        let text = MINIMAL.replace(
            "  name: web\n",
            "  name: web\n  namespace: lb\n  uid: 0c1d\n  generation: 4\n  labels: {app: web}\n",
        ) + "status:\n  observedGeneration: 4\n  nodesReady: 2\n";
        let lb = from_yaml_manifest(&text).unwrap();
        assert_eq!(lb.metadata.namespace.as_deref(), Some("lb"));
        assert_eq!(lb.status.unwrap().nodes_ready, 2);
    }
}
