use std::collections::BTreeMap;

use marklb_crds::labels;
use serde_json::json;

use super::*;
use crate::fixtures::{lb, node};

fn set(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

#[test]
fn selectors_match_all_pairs_and_none_matches_every_node() {
    let labels = node("n1", &[("zone", "a"), ("role", "lb")])
        .metadata
        .labels
        .unwrap();
    let sel = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    assert!(selects(None, &labels));
    assert!(selects(Some(&sel(&[])), &labels));
    assert!(selects(Some(&sel(&[("zone", "a")])), &labels));
    assert!(selects(
        Some(&sel(&[("zone", "a"), ("role", "lb")])),
        &labels
    ));
    assert!(!selects(
        Some(&sel(&[("zone", "a"), ("role", "web")])),
        &labels
    ));
    assert!(!selects(Some(&sel(&[("rack", "1")])), &labels));
}

#[test]
fn node_states_are_named_labelled_owned_and_dated() {
    let web = lb(
        "prod",
        "web",
        1000,
        "vips: [{address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}]}]\ninterface: eth1",
    );
    let states = node_states(&web, &set(&["node-b", "node-a"]), &web.spec);
    let names: Vec<_> = states.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["web-node-a", "web-node-b"]);
    let a = &states[0];
    assert_eq!(a.namespace().as_deref(), Some("prod"));
    assert_eq!(
        a.labels().get(labels::NODE_LABEL).map(String::as_str),
        Some("node-a")
    );
    assert_eq!(
        a.labels()
            .get(labels::LOADBALANCER_LABEL)
            .map(String::as_str),
        Some("web")
    );
    let owner = &a.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("LoadBalancer", "web", "uid-prod-web")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(a.spec.node_name, "node-a");
    assert_eq!(a.spec.load_balancer, "web");
    assert_eq!(a.spec.interface.as_deref(), Some("eth1"));
    assert_eq!(
        a.spec.load_balancer_created,
        web.metadata.creation_timestamp
    );
    assert_eq!(a.spec.lb, web.spec);
    assert_eq!(a.spec.validate(), Ok(()));
    // Long names stay valid object names and label values.
    let long = "n".repeat(250);
    let s = node_state(&web, &long, &web.spec);
    assert!(s.name_any().len() <= 253);
    assert!(s.labels()[labels::NODE_LABEL].len() <= 63);
}

#[test]
fn backend_services_resolve_to_ready_addresses_of_the_vip_family() {
    let spec: LoadBalancerSpec = serde_yaml::from_str(
        "vips:
  - {address: 10.0.0.1, port: 80, backendService: {name: web}}
  - {address: '2001:db8::1', port: 80, backendService: {name: web}}
  - {address: 10.0.0.2, port: 53, protocol: UDP, backendService: {name: dns}}
  - {address: 10.0.0.3, port: 22, backends: [{address: 10.9.0.1, weight: 3}]}",
    )
    .unwrap();
    let web = ServiceEndpoints {
        v4: ["10.1.0.2", "10.1.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
        v6: ["2001:db8::a"].iter().map(|a| a.parse().unwrap()).collect(),
        slices: 2,
        skipped: 0,
    };
    let endpoints = BTreeMap::from([("web".to_string(), web)]);
    let resolved = resolve_spec(&spec, &endpoints).unwrap();
    let addrs = |i: usize| {
        resolved.vips[i]
            .backends
            .iter()
            .map(|b| (b.address.as_str(), b.weight))
            .collect::<Vec<_>>()
    };
    assert_eq!(addrs(0), [("10.1.0.1", 1), ("10.1.0.2", 1)]);
    assert_eq!(addrs(1), [("2001:db8::a", 1)]);
    // A Service without endpoints (or missing): the VIP is served and drops, as with no backends.
    assert_eq!(addrs(2), []);
    assert_eq!(addrs(3), [("10.9.0.1", 3)]);
    assert!(resolved.vips.iter().all(|v| v.backend_service.is_none()));
    assert!(!resolved.uses_backend_service());
}

#[test]
fn a_service_too_big_for_the_vip_is_refused_with_the_reason() {
    let spec: LoadBalancerSpec = serde_yaml::from_str(
        "vips: [{address: 10.0.0.1, backendService: {name: big}}]\nhashing: {maglevTableSize: 7}",
    )
    .unwrap();
    let mut big = ServiceEndpoints {
        v4: (1..=7u8)
            .map(|i| format!("10.1.0.{i}").parse().unwrap())
            .collect(),
        ..ServiceEndpoints::default()
    };
    let err = resolve_spec(&spec, &BTreeMap::from([("big".to_string(), big.clone())])).unwrap_err();
    assert!(
        err.to_string()
            .contains("must exceed the number of backends"),
        "{err}"
    );
    big.v4 = (0..=MAX_BACKENDS_PER_VIP as u32)
        .map(|i| std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let err = resolve_spec(&spec, &BTreeMap::from([("big".to_string(), big)])).unwrap_err();
    assert!(
        err.to_string()
            .contains("has 1025 ready endpoints, a VIP serves at most 1024"),
        "{err}"
    );
}

#[test]
fn affinity_is_one_term_per_distinct_selector() {
    let a = BTreeMap::from([
        ("zone".to_string(), "a".to_string()),
        ("role".to_string(), "lb".to_string()),
    ]);
    let b = BTreeMap::from([("zone".to_string(), "b".to_string())]);
    let affinity = agent_affinity([Some(&a), Some(&b), Some(&a)]).unwrap();
    let json = serde_json::to_value(&affinity).unwrap();
    assert_eq!(
        json["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([
            {"matchExpressions": [
                {"key": "role", "operator": "In", "values": ["lb"]},
                {"key": "zone", "operator": "In", "values": ["a"]},
            ]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
        ])
    );
    // One LoadBalancer without selector: agents everywhere.
    assert_eq!(agent_affinity([Some(&a), None]), None);
    // No LoadBalancer: a term no node matches.
    let none = serde_json::to_value(agent_affinity([]).unwrap()).unwrap();
    assert_eq!(
        none["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{"matchExpressions": [{"key": NO_LOADBALANCER_LABEL, "operator": "Exists"}]}])
    );
}

#[test]
fn the_agent_daemonset_has_only_what_the_agent_needs() {
    let settings = AgentSettings {
        image: "registry.local/marklb-agent:1".into(),
        hw_backend: "emulated".into(),
        mark_delivery: Some("xdp-metadata".into()),
        ..AgentSettings::default()
    };
    let zone = BTreeMap::from([("zone".to_string(), "a".to_string())]);
    let ds = agent_daemonset("marklb-system", &settings, [Some(&zone)]);
    let json = serde_json::to_value(&ds).unwrap();
    assert_eq!(json["metadata"]["name"], "marklb-agent");
    assert_eq!(json["metadata"]["namespace"], "marklb-system");
    let pod = &json["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "marklb-agent");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.local/marklb-agent:1");
    assert_eq!(
        c["args"],
        json!([
            "--log-format=json",
            "run",
            "--kubernetes",
            "--interface-of=$(HOST_IP)",
            "--hw-backend=emulated",
            "--mark-delivery=xdp-metadata",
            "--metrics-addr=$(HOST_IP):9464",
            "--bpffs=/sys/fs/bpf"
        ])
    );
    assert_eq!(
        c["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]})
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["env"][0],
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "bpffs", "mountPath": "/sys/fs/bpf"}])
    );
    assert_eq!(
        pod["volumes"][0]["hostPath"],
        json!({"path": "/sys/fs/bpf", "type": "Directory"})
    );
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"],
        json!([{"key": "zone", "operator": "In", "values": ["a"]}])
    );
    // Fields Kubernetes 1.20 does not know make server-side apply fail with 500 there.
    let text = json.to_string();
    for unknown in [
        "maxSurge",
        "hostUsers",
        "seccompProfile",
        "minReadySeconds\":0",
    ] {
        assert!(!text.contains(unknown), "{unknown} in {text}");
    }
    // Without mark delivery, the agent keeps its default.
    let plain = agent_args(&AgentSettings::default());
    assert!(
        !plain.iter().any(|a| a.starts_with("--mark-delivery")),
        "{plain:?}"
    );
}

#[test]
fn agent_xdp_mode_metrics_bind_and_tolerations_come_from_the_settings() {
    use crate::settings::MetricsBind;
    use k8s_openapi::api::core::v1::Toleration;
    let settings = AgentSettings {
        xdp_mode: Some("native".into()),
        metrics_bind: MetricsBind::All,
        metrics_port: 9555,
        tolerations: vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("lb".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }],
        ..AgentSettings::default()
    };
    let args = agent_args(&settings);
    assert!(args.contains(&"--xdp-mode=native".to_string()), "{args:?}");
    assert!(
        args.contains(&"--metrics-addr=0.0.0.0:9555".to_string()),
        "{args:?}"
    );
    let ds = serde_json::to_value(agent_daemonset("marklb-system", &settings, [])).unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["tolerations"],
        json!([{"key": "dedicated", "operator": "Equal", "value": "lb", "effect": "NoSchedule"}])
    );
    // Defaults: the agent's own XDP mode, the node's InternalIP.
    let plain = agent_args(&AgentSettings::default());
    assert!(
        !plain.iter().any(|a| a.starts_with("--xdp-mode")),
        "{plain:?}"
    );
    assert!(plain.contains(&"--metrics-addr=$(HOST_IP):9464".to_string()));
}

#[test]
fn the_agents_attach_to_the_interface_the_loadbalancers_name() {
    let plain = agent_args(&AgentSettings::default());
    assert!(
        plain.contains(&"--interface-of=$(HOST_IP)".to_string()),
        "{plain:?}"
    );
    assert_eq!(
        agent_interface([None, Some("eth1"), Some("eth1")]),
        Some("eth1".into())
    );
    assert_eq!(agent_interface([None, Some("")]), None);
    assert_eq!(agent_interface([Some("eth1"), Some("eth2")]), None);
    let ds = serde_json::to_value(agent_daemonset_on(
        "ns",
        &AgentSettings::default(),
        [None],
        Some("eth1"),
    ))
    .unwrap();
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--interface=eth1")),
        "{args}"
    );
    assert!(!args.to_string().contains("--interface-of"), "{args}");
}
