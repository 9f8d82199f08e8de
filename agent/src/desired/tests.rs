//! Resolving specs and merging several LoadBalancers on one node.

use marklb_crds::{
    LoadBalancerSpec,
    loadbalancer::{Backend as SpecBackend, NextHop as SpecNextHop, Vip},
};

use super::*;

fn spec(vips: &[(&str, u16)]) -> LoadBalancerSpec {
    LoadBalancerSpec {
        vips: vips
            .iter()
            .map(|(a, port)| Vip {
                name: None,
                address: a.to_string(),
                port: *port,
                protocol: Default::default(),
                backends: vec![SpecBackend {
                    address: "10.1.0.1".into(),
                    weight: 1,
                }],
                backend_service: None,
            })
            .collect(),
        ..LoadBalancerSpec::default()
    }
}

fn part(ns: &str, name: &str, s: &LoadBalancerSpec) -> OwnerDesired {
    OwnerDesired::from_spec(Owner::new(ns, name), s).expect("resolves")
}

fn vip(a: &str, port: u16) -> VipId {
    VipId::tcp(a.parse().unwrap(), port)
}

#[test]
fn owners_display_as_namespace_slash_name() {
    assert_eq!(Owner::new("lb", "web").to_string(), "lb/web");
    assert_eq!(Owner::new("", "web").to_string(), "web");
}

#[test]
fn a_spec_resolves_with_its_owner_on_every_vip() {
    let mut s = spec(&[("10.0.0.1", 80), ("2001:db8::1", 443)]);
    s.interface = Some("eth1".into());
    s.next_hop = Some(SpecNextHop {
        mac: Some("02:00:00:00:00:fe".into()),
        address: None,
    });
    let p = part("lb", "web", &s);
    assert_eq!(p.vips.len(), 2);
    assert!(p.vips.values().all(|v| v.owner == Owner::new("lb", "web")));
    assert_eq!(p.settings.interface.as_deref(), Some("eth1"));
    assert_eq!(p.settings.next_hop.mac, Some([2, 0, 0, 0, 0, 0xfe]));
    assert_eq!(p.vips[&vip("10.0.0.1", 80)].label, "10.0.0.1:80/TCP");
}

#[test]
fn a_backend_service_is_for_the_operator_to_resolve() {
    let mut s = spec(&[("10.0.0.1", 80)]);
    s.vips[0].backends.clear();
    s.vips[0].backend_service = Some(marklb_crds::loadbalancer::ServiceRef { name: "web".into() });
    let e = OwnerDesired::from_spec(Owner::new("", "x"), &s).unwrap_err();
    assert!(
        e.contains("spec.vips[0].backendService: Service web"),
        "{e}"
    );
}

#[test]
fn a_duplicate_vip_in_one_spec_is_refused() {
    let s = spec(&[("10.0.0.1", 80), ("10.0.0.1", 80)]);
    let e = OwnerDesired::from_spec(Owner::new("", "x"), &s).unwrap_err();
    assert!(
        e.contains("spec.vips[1]: duplicate VIP 10.0.0.1:80/TCP"),
        "{e}"
    );
}

#[test]
fn disjoint_owners_are_all_served_and_keep_their_owner() {
    let a = part("lb", "a", &spec(&[("10.0.0.1", 80)]));
    let b = part("lb", "b", &spec(&[("10.0.0.1", 443), ("10.0.0.2", 80)]));
    let m = merge(&[a, b], Some("eth0"));
    assert_eq!(m.desired.vips.len(), 3);
    assert_eq!(
        m.desired.vips[&vip("10.0.0.2", 80)].owner,
        Owner::new("lb", "b")
    );
    assert!(m.owners.values().all(OwnerVerdict::is_serving));
    assert_eq!(m.order, [Owner::new("lb", "a"), Owner::new("lb", "b")]);
    assert_eq!(m.desired.settings.interface.as_deref(), Some("eth0"));
}

#[test]
fn the_older_owner_keeps_a_contested_vip_and_the_newer_is_left_out_whole() {
    let old = part("lb", "old", &spec(&[("10.0.0.1", 80)]));
    let new = part("lb", "new", &spec(&[("10.0.0.9", 80), ("10.0.0.1", 80)]));
    let m = merge(&[old.clone(), new.clone()], None);
    assert_eq!(
        m.desired.vips.keys().collect::<Vec<_>>(),
        [&vip("10.0.0.1", 80)]
    );
    assert_eq!(
        m.owners[&Owner::new("lb", "new")],
        OwnerVerdict::Conflict {
            winner: Owner::new("lb", "old"),
            what: "VIP 10.0.0.1:80/TCP".into()
        }
    );
    let msg = m.owners[&Owner::new("lb", "new")].problem().unwrap();
    assert_eq!(
        msg,
        "conflicts with lb/old, which holds VIP 10.0.0.1:80/TCP"
    );
    // Same protocol and address on another port, or another protocol, is no conflict.
    let mut udp = spec(&[("10.0.0.1", 80)]);
    udp.vips[0].protocol = marklb_crds::Protocol::Udp;
    let m = merge(&[old, part("lb", "udp", &udp)], None);
    assert_eq!(m.desired.vips.len(), 2);
}

#[test]
fn a_different_node_wide_setting_is_a_conflict_naming_the_setting() {
    let a = part("x", "a", &spec(&[("10.0.0.1", 80)]));
    let mut s = spec(&[("10.0.0.2", 80)]);
    s.mtu.size = 9000;
    let b = part("x", "b", &s);
    let m = merge(&[a.clone(), b], None);
    let msg = m.owners[&Owner::new("x", "b")].problem().unwrap();
    assert_eq!(
        msg,
        "conflicts with x/a, which holds the node-wide setting mtu 1500/Icmp (asked: 9000/Icmp)"
    );
    assert_eq!(m.desired.vips.len(), 1);
    type Edit = fn(&mut LoadBalancerSpec);
    let edits: [(&str, Edit); 6] = [
        ("nextHop", |s| {
            s.next_hop = Some(SpecNextHop {
                mac: Some("02:00:00:00:00:01".into()),
                address: None,
            })
        }),
        ("encap source prefixes", |s| {
            s.encap.source_prefix_v4 = "172.17.0.0/16".into()
        }),
        ("flowMarks", |s| s.flow_marks.idle_timeout_seconds = 5),
        ("flowMarks", |s| s.flow_marks.udp_packets_before_mark = 10),
        ("icmpEcho", |s| s.icmp_echo = false),
        ("interface", |s| s.interface = Some("eth9".into())),
    ];
    for (what, edit) in edits {
        let mut s = spec(&[("10.0.0.2", 80)]);
        edit(&mut s);
        let m = merge(&[a.clone(), part("x", "b", &s)], None);
        let msg = m.owners[&Owner::new("x", "b")].problem().unwrap();
        assert!(
            msg.contains(&format!("node-wide setting {what}")),
            "{what}: {msg}"
        );
    }
}

#[test]
fn an_owner_without_vips_claims_no_setting_and_blocks_nobody() {
    let mut empty = spec(&[]);
    empty.mtu.size = 9000;
    let a = part("x", "deleting", &empty);
    let b = part("x", "b", &spec(&[("10.0.0.2", 80)]));
    let m = merge(&[a, b], None);
    assert!(m.owners.values().all(OwnerVerdict::is_serving), "{m:?}");
    assert_eq!(m.desired.settings.mtu, 1500, "the served owner's settings");
    // Alone, an owner without VIPs gives its settings (nothing else asks).
    let m = merge(&[part("x", "only", &empty)], None);
    assert_eq!(m.desired.settings.mtu, 9000);
    assert!(m.desired.vips.is_empty());
    // Nobody at all: the defaults.
    assert_eq!(merge(&[], None).desired.settings, NodeSettings::default());
}

#[test]
fn another_interface_than_the_agents_is_refused() {
    let mut s = spec(&[("10.0.0.1", 80)]);
    s.interface = Some("eth1".into());
    let m = merge(&[part("x", "a", &s)], Some("eth0"));
    assert_eq!(
        m.owners[&Owner::new("x", "a")].problem().unwrap(),
        "spec.interface is eth1 but this agent serves eth0; restart it to move"
    );
    assert!(m.desired.vips.is_empty());
    // The agent's own interface named by both is fine; named by one and left to the default
    // by the other is a difference, as the operator sees it too.
    s.interface = Some("eth0".into());
    let named = part("x", "a", &s);
    let mut t = spec(&[("10.0.0.2", 80)]);
    t.interface = Some("eth0".into());
    let m = merge(&[named.clone(), part("x", "b", &t)], Some("eth0"));
    assert!(m.owners.values().all(OwnerVerdict::is_serving), "{m:?}");
    let implied = part("x", "c", &spec(&[("10.0.0.3", 80)]));
    let m = merge(&[named, implied], Some("eth0"));
    let problem = m.owners[&Owner::new("x", "c")].problem().unwrap();
    assert_eq!(
        problem,
        "conflicts with x/a, which holds the node-wide setting interface"
    );
}

#[test]
fn a_repeated_owner_is_merged_once() {
    let a = part("x", "a", &spec(&[("10.0.0.1", 80)]));
    let again = part("x", "a", &spec(&[("10.0.0.2", 80)]));
    let m = merge(&[a, again], None);
    assert_eq!(
        m.desired.vips.keys().collect::<Vec<_>>(),
        [&vip("10.0.0.1", 80)]
    );
    assert_eq!(m.order.len(), 1);
}

#[test]
fn lb_config_follows_the_settings() {
    let mut s = spec(&[("10.0.0.1", 80)]);
    s.icmp_echo = false;
    s.mtu.too_big = marklb_crds::TooBig::Drop;
    let d = merge(&[part("", "a", &s)], None).desired;
    let c = d.lb_config([1, 2, 3, 4, 5, 6]);
    assert_eq!(c.next_hop_mac, [1, 2, 3, 4, 5, 6]);
    assert_eq!(c.mtu, 1500);
    assert_eq!(c.flags & marklb_common::CFG_F_ICMP_ECHO, 0);
    assert_eq!(c.flags & marklb_common::CFG_F_ICMP_TOO_BIG, 0);
    assert_ne!(c.flags & marklb_common::CFG_F_EVENTS, 0);
    assert_eq!(
        c.encap_src_v4_be,
        u32::from_be_bytes([172, 16, 0, 0]).to_be()
    );
    assert_eq!(
        c.udp_event_packets,
        marklb_common::DEFAULT_UDP_EVENT_PACKETS,
        "the default spec asks for the datapath's default"
    );
    s.flow_marks.udp_packets_before_mark = 12;
    let d = merge(&[part("", "a", &s)], None).desired;
    assert_eq!(d.lb_config([0; 6]).udp_event_packets, 12);
}
