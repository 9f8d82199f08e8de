//! Label selectors (`matchLabels` + `matchExpressions`, the Kubernetes `LabelSelector`) as the
//! pool uses them for namespaces and Services: matching, and the checks the apiserver makes
//! of selectors elsewhere (operators `In`, `NotIn`, `Exists`, `DoesNotExist`; values present
//! exactly for the first two), so a bad selector is refused with a message naming the field
//! rather than silently matching nothing.
//!
//! An absent selector matches everything; an empty one (`{}`) matches everything too, as in
//! Kubernetes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector` (every `matchLabels` pair and every expression). A
/// selector that fails [`check`] matches nothing.
pub fn matches(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    if !check(selector).is_empty() {
        return false;
    }
    let pairs_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs_match && expressions_match
}

/// What is wrong with `selector`, as `(field below the selector, message)` pairs.
pub fn check(selector: &LabelSelector) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let path = format!("matchExpressions[{i}]");
        if e.key.is_empty() {
            errors.push((format!("{path}.key"), "must not be empty".to_string()));
        }
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errors.push((
                format!("{path}.values"),
                format!("must be non-empty when operator is {}", e.operator),
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => errors.push((
                format!("{path}.values"),
                format!("must be empty when operator is {}", e.operator),
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push((
                format!("{path}.operator"),
                format!("{other:?} is not a valid operator (In, NotIn, Exists, DoesNotExist)"),
            )),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn every_operator_matches_as_kubernetes_does() {
        let team_a = labels(&[("team", "a"), ("tier", "web")]);
        let none = labels(&[]);
        let sel = |exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: None,
            match_expressions: Some(exprs),
        };
        assert!(matches(None, &none));
        assert!(matches(Some(&LabelSelector::default()), &none));
        let by_label = LabelSelector {
            match_labels: Some(labels(&[("team", "a")])),
            match_expressions: None,
        };
        assert!(matches(Some(&by_label), &team_a) && !matches(Some(&by_label), &none));
        let cases = [
            (expr("team", "In", &["a", "b"]), true, false),
            (expr("team", "NotIn", &["a"]), false, true),
            (expr("team", "Exists", &[]), true, false),
            (expr("team", "DoesNotExist", &[]), false, true),
        ];
        for (e, on_a, on_none) in cases {
            let s = sel(vec![e.clone()]);
            assert_eq!(matches(Some(&s), &team_a), on_a, "{e:?}");
            assert_eq!(matches(Some(&s), &none), on_none, "{e:?}");
        }
    }

    #[test]
    fn bad_selectors_are_named_and_match_nothing() {
        let bad = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("team", "In", &[]),
                expr("team", "Exists", &["x"]),
                expr("", "Equals", &["x"]),
            ]),
        };
        let errors = check(&bad);
        assert_eq!(
            errors.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            [
                "matchExpressions[0].values",
                "matchExpressions[1].values",
                "matchExpressions[2].key",
                "matchExpressions[2].operator"
            ]
        );
        assert!(!matches(Some(&bad), &labels(&[("team", "x")])));
    }
}
