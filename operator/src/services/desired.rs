//! What should exist for a served Service, computed without I/O: its LoadBalancer, its
//! status, and the decapsulator DaemonSet of all nodes.
//!
//! Invariants:
//! - the LoadBalancer of Service `s` is named [`lb_name`] (`svc-<s>`), lives in the Service's
//!   namespace, carries the [`SERVICE_LABEL`] and an owner reference (controller) to the
//!   Service, and has one VIP per (address, port, protocol) of the Service, whose backends
//!   are the nodes of the address's family ([`super::reals`]); its node selector and
//!   datapath settings are its pool's; it passes `LoadBalancerSpec::validate`;
//! - the Service's status holds exactly the allocated addresses as `ingress` (in the
//!   Service's family order) and the two marklb conditions;
//! - the decapsulator DaemonSet runs `marklb-agent decap --mode tc` on every node (all taints
//!   tolerated, as kube-proxy: a pod of the Service may run anywhere), with the agent's
//!   capabilities only, no API credentials, and only fields Kubernetes 1.20 knows.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::LoadBalancerStatus as ServiceLbStatus;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, LoadBalancerIngress, ObjectFieldSelector,
    PodSpec, PodTemplateSpec, ResourceRequirements, SecurityContext, Service, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use marklb_crds::conditions::{ConditionStatus, set_condition};
use marklb_crds::labels::{MANAGED_BY_LABEL, OPERATOR_FIELD_MANAGER};
use marklb_crds::pool::Family;
use marklb_crds::{Backend, LoadBalancer, LoadBalancerIPPoolSpec, Vip};

use super::request::Request;
use super::{SERVICE_LABEL, condition};
use crate::settings::AgentSettings;

/// Name of the decapsulator DaemonSet.
pub const DECAP_NAME: &str = "marklb-decap";

/// The name of Service `service`'s LoadBalancer.
pub fn lb_name(service: &str) -> String {
    format!("svc-{service}")
}

/// The owner reference to a Service (controller: the Service's deletion collects its
/// LoadBalancer where a garbage collector runs; the operator deletes it itself too).
pub fn owner_reference(svc: &Service) -> OwnerReference {
    OwnerReference {
        api_version: Service::api_version(&()).into_owned(),
        kind: Service::kind(&()).into_owned(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The LoadBalancer serving `svc` at `addresses` (from a pool with `pool`), with `reals`
/// per family.
pub fn load_balancer(
    svc: &Service,
    req: &Request,
    pool: &LoadBalancerIPPoolSpec,
    addresses: &[IpAddr],
    reals: &BTreeMap<Family, Vec<Backend>>,
) -> LoadBalancer {
    let mut spec = pool.load_balancer().spec(pool.node_selector.clone());
    for address in addresses {
        let backends = reals
            .get(&Family::of(*address))
            .cloned()
            .unwrap_or_default();
        for port in &req.ports {
            spec.vips.push(Vip {
                name: None,
                address: address.to_string(),
                port: port.port,
                protocol: port.protocol,
                backends: backends.clone(),
                backend_service: None,
            });
        }
    }
    let mut lb = LoadBalancer::new(&lb_name(&svc.name_any()), spec);
    lb.metadata.namespace = svc.namespace();
    lb.metadata.labels = Some(BTreeMap::from([
        (SERVICE_LABEL.to_string(), svc.name_any()),
        (
            MANAGED_BY_LABEL.to_string(),
            OPERATOR_FIELD_MANAGER.to_string(),
        ),
    ]));
    lb.metadata.owner_references = Some(vec![owner_reference(svc)]);
    lb
}

/// Whether `lb` is the LoadBalancer of `svc` (owned by it, by uid).
pub fn owned_by(lb: &LoadBalancer, svc: &Service) -> bool {
    let uid = svc.uid();
    lb.owner_references()
        .iter()
        .any(|o| o.kind == "Service" && Some(&o.uid) == uid.as_ref())
}

/// One marklb condition of a Service: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// The Service's status part marklb owns: `ingress` and its conditions, upserted into the
/// current ones (so `lastTransitionTime` moves only on a status change).
pub fn service_status(
    svc: &Service,
    addresses: &[IpAddr],
    wanted: &[ServiceCondition],
    now: Time,
) -> (Vec<LoadBalancerIngress>, Vec<Condition>) {
    let ingress = addresses
        .iter()
        .map(|a| LoadBalancerIngress {
            ip: Some(a.to_string()),
            ..Default::default()
        })
        .collect();
    let current: Vec<Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| [condition::ADDRESS_ALLOCATED, condition::READY].contains(&c.type_.as_str()))
        .collect();
    let mut conditions = current;
    for c in wanted {
        set_condition(
            &mut conditions,
            c.type_,
            ConditionStatus::from(c.status),
            &c.reason,
            &c.message,
            svc.metadata.generation,
            now.clone(),
        );
    }
    conditions.retain(|c| wanted.iter().any(|w| w.type_ == c.type_));
    (ingress, conditions)
}

/// The ingress addresses of a Service's current status.
pub fn current_ingress(svc: &Service) -> Vec<LoadBalancerIngress> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l: &ServiceLbStatus| l.ingress.clone())
        .unwrap_or_default()
}

/// marklb's conditions in a Service's current status.
pub fn current_conditions(svc: &Service) -> Vec<Condition> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| [condition::ADDRESS_ALLOCATED, condition::READY].contains(&c.type_.as_str()))
        .collect()
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

/// The decapsulator's command line: TC mode (it shares the node's interface with the
/// balancer's XDP program on balancer nodes, and TC runs after XDP), on the interface that
/// holds the node's address.
pub fn decap_args() -> Vec<String> {
    vec![
        "--log-format=json".into(),
        "decap".into(),
        "--mode=tc".into(),
        "--interface-of=$(HOST_IP)".into(),
        "--stats-interval=60".into(),
    ]
}

/// The decapsulator DaemonSet in `namespace`, with the agent's image.
pub fn decap_daemonset(namespace: &str, agent: &AgentSettings) -> DaemonSet {
    let labels = BTreeMap::from([(
        crate::desired::AGENT_APP_LABEL.to_string(),
        DECAP_NAME.to_string(),
    )]);
    let mut meta_labels = labels.clone();
    meta_labels.insert(MANAGED_BY_LABEL.into(), OPERATOR_FIELD_MANAGER.into());
    let container = Container {
        name: "decap".into(),
        image: Some(agent.image.clone()),
        image_pull_policy: Some(agent.image_pull_policy.clone()),
        args: Some(decap_args()),
        env: Some(vec![
            env_from_field("HOST_IP", "status.hostIP"),
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some(agent.log_level.clone()),
                value_from: None,
            },
            EnvVar {
                name: "NO_COLOR".into(),
                value: Some("1".into()),
                value_from: None,
            },
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("5m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".into()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    DaemonSet {
        metadata: ObjectMeta {
            name: Some(DECAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(meta_labels),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            // `maxSurge` is unknown to Kubernetes 1.20 (server-side apply refuses it).
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: None,
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    host_network: Some(true),
                    // It needs no API access: no token in the pod.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(5),
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::at;
    use crate::services::fixtures::service;
    use crate::services::request;

    #[test]
    fn the_loadbalancer_has_a_vip_per_address_and_port_and_the_pools_settings() {
        let svc = service(
            "shop",
            "web",
            "spec: {type: LoadBalancer, ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], ports: [{port: 80}, {port: 53, protocol: UDP}]}",
        );
        let req = request::read(&svc).unwrap();
        let pool: LoadBalancerIPPoolSpec = serde_yaml::from_str(
            "addresses: [192.0.2.0/28, 'fd00::/120']\nnodeSelector: {role: lb}\nloadBalancer: {interface: eth1, flowMarks: {scope: PerReal}}",
        )
        .unwrap();
        let reals = BTreeMap::from([
            (
                Family::V4,
                vec![Backend {
                    address: "10.0.0.2".into(),
                    weight: 1,
                }],
            ),
            (
                Family::V6,
                vec![Backend {
                    address: "fd01::2".into(),
                    weight: 2,
                }],
            ),
        ]);
        let addresses = ["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let lb = load_balancer(&svc, &req, &pool, &addresses, &reals);
        assert_eq!(lb.metadata.name.as_deref(), Some("svc-web"));
        assert_eq!(lb.metadata.namespace.as_deref(), Some("shop"));
        assert!(owned_by(&lb, &svc));
        assert_eq!(lb.labels()[SERVICE_LABEL], "web");
        let vips: Vec<(String, u16, String, String)> = lb
            .spec
            .vips
            .iter()
            .map(|v| {
                (
                    v.address.clone(),
                    v.port,
                    v.protocol.to_string(),
                    v.backends[0].address.clone(),
                )
            })
            .collect();
        assert_eq!(
            vips,
            [
                ("192.0.2.1".into(), 80, "TCP".into(), "10.0.0.2".into()),
                ("192.0.2.1".into(), 53, "UDP".into(), "10.0.0.2".into()),
                ("fd00::1".into(), 80, "TCP".into(), "fd01::2".into()),
                ("fd00::1".into(), 53, "UDP".into(), "fd01::2".into()),
            ]
        );
        assert_eq!(lb.spec.interface.as_deref(), Some("eth1"));
        assert_eq!(lb.spec.node_selector.as_ref().unwrap()["role"], "lb");
        lb.spec.validate().unwrap();
    }

    #[test]
    fn status_conditions_keep_their_transition_time_until_they_flip() {
        let mut svc = service(
            "shop",
            "web",
            "spec: {type: LoadBalancer, ports: [{port: 80}]}",
        );
        let ok = ServiceCondition {
            type_: condition::ADDRESS_ALLOCATED,
            status: true,
            reason: "Allocated".into(),
            message: "192.0.2.1 from pool public".into(),
        };
        let addresses = ["192.0.2.1".parse().unwrap()];
        let (ingress, conditions) =
            service_status(&svc, &addresses, std::slice::from_ref(&ok), at(1));
        assert_eq!(ingress[0].ip.as_deref(), Some("192.0.2.1"));
        svc.status = Some(k8s_openapi::api::core::v1::ServiceStatus {
            conditions: Some(conditions.clone()),
            ..Default::default()
        });
        let (_, again) = service_status(&svc, &addresses, std::slice::from_ref(&ok), at(2));
        assert_eq!(again, conditions, "unchanged: same time");
        let refused = ServiceCondition {
            status: false,
            reason: "PoolExhausted".into(),
            ..ok
        };
        let (ingress, flipped) = service_status(&svc, &[], &[refused], at(3));
        assert!(ingress.is_empty());
        assert_eq!(flipped[0].last_transition_time, at(3));
    }

    #[test]
    fn the_decapsulator_runs_everywhere_with_the_agents_capabilities_only() {
        let ds = decap_daemonset("marklb-system", &AgentSettings::default());
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.tolerations.as_ref().unwrap()[0].operator.as_deref(),
            Some("Exists")
        );
        assert!(pod.affinity.is_none() && pod.node_selector.is_none());
        let c = &pod.containers[0];
        let caps = c
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(
            caps.add.as_deref().unwrap(),
            ["BPF", "NET_ADMIN", "PERFMON"]
        );
        assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
        assert!(c.args.as_ref().unwrap().contains(&"--mode=tc".to_string()));
        let text = serde_json::to_string(&ds).unwrap();
        assert!(
            !text.contains("maxSurge") && !text.contains("hostUsers"),
            "{text}"
        );
    }
}
