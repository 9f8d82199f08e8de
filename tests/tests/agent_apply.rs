//! The agent's diff-apply (`plan::plan`, carried out by `apply::apply`) against a real
//! datapath: what a reload changes, what it leaves alone, that flows and marks of a real
//! that leaves a VIP move even when other VIPs keep that real, and that a real moving between
//! VIPs keeps its slot. Needs root and the kernel's BPF.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use marklb_agent::{
    apply::{self, ApplyReport},
    datapath::{Datapath, LoadOptions, Prog, testrun::XDP_TX},
    desired::{Desired, MarkPolicy, NextHop, NodeSettings, Owner, VipPlan},
    maglev::Backend,
    marks::{EmulatedNic, MarkManager},
    model::DatapathModel,
    packet::FrameSpec,
    plan,
    vip::VipId,
};
use marklb_common::{FlowKey, NewFlowEvent};
use marklb_crds::loadbalancer::MarkScope;
use marklb_tests::datapath_fixture::require_root_bpf;

const TABLE: u32 = 1_009;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn plan(vips: &[(&str, &[&str])]) -> Desired {
    let mut map = BTreeMap::new();
    for (vip, reals) in vips {
        let backends = reals
            .iter()
            .map(|r| Backend {
                addr: ip(r),
                weight: 1,
            })
            .collect();
        map.insert(
            VipId::tcp(ip(vip), 80),
            VipPlan {
                label: vip.to_string(),
                backends,
                table_size: TABLE,
                owner: Owner::new("test", "lb"),
            },
        );
    }
    Desired {
        vips: map,
        settings: NodeSettings {
            interface: None,
            next_hop: NextHop::default(),
            marks: MarkPolicy {
                scope: MarkScope::PerFlow,
                capacity: 1_000,
                idle_timeout: Duration::from_secs(60),
            },
            mtu: 1500,
            icmp_too_big: true,
            icmp_echo: true,
            encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
            encap_src_v6_be: [0; 4],
            udp_packets_before_mark: marklb_common::DEFAULT_UDP_EVENT_PACKETS,
        },
    }
}

struct Node {
    dp: Datapath,
    lb: DatapathModel,
    marks: MarkManager,
}

impl Node {
    fn new(desired: &Desired) -> Self {
        require_root_bpf();
        let mut dp = Datapath::load(&LoadOptions {
            ring_capacity: 1 << 16,
            conn_table_size: 1 << 12,
            nic_flows: 1 << 10,
            pin_dir: None,
        })
        .expect("load datapath");
        dp.set_config(&desired.lb_config([2, 0, 0, 0, 0, 0xfe]))
            .expect("config");
        dp.chain_nic_to_balancer().expect("chain");
        let lb = DatapathModel::new(&dp);
        let nic = EmulatedNic::new(&dp).expect("emulated NIC");
        let marks = MarkManager::new(Box::new(nic), desired.settings.marks);
        let mut n = Self { dp, lb, marks };
        n.apply(desired);
        n
    }

    fn apply(&mut self, desired: &Desired) -> ApplyReport {
        plan::check_capacity(&self.lb, desired).expect("fits");
        apply::apply(&mut self.dp, &mut self.lb, &mut self.marks, desired).expect("apply")
    }

    /// The real the balancer sends this frame to (outer IPv4 destination).
    fn send(&mut self, prog: Prog, frame: &FrameSpec) -> IpAddr {
        let r = self
            .dp
            .test_run(prog, &frame.build(), None)
            .expect("test run");
        assert_eq!(r.action, XDP_TX, "not forwarded");
        IpAddr::from(<[u8; 4]>::try_from(&r.frame[30..34]).expect("outer daddr"))
    }

    /// Opens a flow (SYN) from a client port whose Maglev pick is `real`, and gives it a
    /// mark through the mark manager as the agent would from the new-flow event.
    fn flow_to(&mut self, vip: &str, real: &str) -> FrameSpec {
        for port in 20_000..30_000u16 {
            let syn = FrameSpec::tcp(ip("192.0.2.7"), port, ip(vip), 80, true);
            if self.send(Prog::Balancer, &syn) != ip(real) {
                continue;
            }
            let flow = syn.flow();
            let conn = self.dp.conn(&flow).expect("learned");
            let ev = NewFlowEvent {
                flow,
                vip_id: conn.vip_id.into(),
                real_id: conn.real_id,
                real_gen: conn.real_gen,
                check: 0,
                ts_ns: 0,
            };
            self.marks
                .on_event(&mut self.dp, &ev)
                .expect("mark installed");
            return FrameSpec::tcp(ip("192.0.2.7"), port, ip(vip), 80, false);
        }
        panic!("no client port of {vip} maps to {real}");
    }

    fn mark_of(&self, flow: &FlowKey) -> Option<u32> {
        self.dp.nic_flow(flow).map(|r| r.mark)
    }
}

#[test]
fn a_real_leaving_one_vip_moves_that_vips_flows_even_if_other_vips_keep_it() {
    let before = plan(&[
        ("10.0.0.1", &["10.1.0.1", "10.1.0.2"]),
        ("10.0.0.2", &["10.1.0.1", "10.1.0.3"]),
    ]);
    let mut n = Node::new(&before);
    let a = n.flow_to("10.0.0.1", "10.1.0.1");
    let b = n.flow_to("10.0.0.2", "10.1.0.1");
    let (mark_a, mark_b) = (n.mark_of(&a.flow()).unwrap(), n.mark_of(&b.flow()).unwrap());
    // Before: both flows reach 10.1.0.1 on the normal and the marked path.
    assert_eq!(n.send(Prog::Balancer, &a), ip("10.1.0.1"));
    assert_eq!(n.send(Prog::EmulatedNic, &a), ip("10.1.0.1"));

    // 10.1.0.1 leaves VIP 10.0.0.1 but stays in 10.0.0.2.
    let after = plan(&[
        ("10.0.0.1", &["10.1.0.2"]),
        ("10.0.0.2", &["10.1.0.1", "10.1.0.3"]),
    ]);
    let report = n.apply(&after);
    assert_eq!(report.changed.len(), 1);
    assert_eq!(report.unchanged, 1);
    assert_eq!(report.reals_retired, 0, "10.1.0.1 still serves 10.0.0.2");

    // A's flow moves on both paths; its mark and NIC rule are gone.
    assert_eq!(n.send(Prog::Balancer, &a), ip("10.1.0.2"));
    assert_eq!(n.send(Prog::EmulatedNic, &a), ip("10.1.0.2"));
    assert_eq!(n.mark_of(&a.flow()), None);
    assert_eq!(
        n.dp.mark(mark_a).unwrap().real_id,
        0,
        "mark map entry cleared"
    );
    // B's flow, to the same real through the other VIP, keeps its real and its mark.
    assert_eq!(n.send(Prog::Balancer, &b), ip("10.1.0.1"));
    assert_eq!(n.send(Prog::EmulatedNic, &b), ip("10.1.0.1"));
    assert_eq!(n.mark_of(&b.flow()), Some(mark_b));
}

#[test]
fn a_reload_without_changes_touches_nothing_and_a_removed_vip_loses_its_marks() {
    let desired = plan(&[
        ("10.0.0.1", &["10.1.0.1", "10.1.0.2"]),
        ("10.0.0.2", &["10.1.0.3"]),
    ]);
    let mut n = Node::new(&desired);
    let key = VipId::tcp(ip("10.0.0.1"), 80).key();
    let meta_before = n.dp.vip(&key).unwrap();
    let a = n.flow_to("10.0.0.1", "10.1.0.2");
    let b = n.flow_to("10.0.0.2", "10.1.0.3");
    let mark_b = n.mark_of(&b.flow()).unwrap();

    let report = n.apply(&desired);
    assert_eq!(
        (
            report.added.len(),
            report.changed.len(),
            report.removed.len()
        ),
        (0, 0, 0)
    );
    assert_eq!(report.unchanged, 2);
    assert_eq!(
        n.dp.vip(&key).unwrap(),
        meta_before,
        "same ring region, same generation"
    );
    assert_eq!(n.send(Prog::EmulatedNic, &a), ip("10.1.0.2"));

    // Dropping VIP 10.0.0.2 retires its only real and clears its marks.
    let report = n.apply(&plan(&[("10.0.0.1", &["10.1.0.1", "10.1.0.2"])]));
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.reals_retired, 1);
    assert_eq!(n.mark_of(&b.flow()), None);
    assert_eq!(n.dp.mark(mark_b).unwrap().real_id, 0);
    let r = n.dp.test_run(Prog::EmulatedNic, &b.build(), None).unwrap();
    assert_ne!(r.action, XDP_TX, "a removed VIP forwards nothing");
    assert_eq!(
        n.send(Prog::EmulatedNic, &a),
        ip("10.1.0.2"),
        "the other VIP is untouched"
    );
}

#[test]
fn a_plan_that_does_not_fit_is_refused_before_anything_changes() {
    let desired = plan(&[("10.0.0.1", &["10.1.0.1"])]);
    let n = Node::new(&desired);
    // 70 VIPs of 1,009 slots exceed the 65,536-slot ring storage.
    let many: Vec<(String, Vec<&str>)> = (0..70)
        .map(|i| (format!("10.0.1.{i}"), vec!["10.1.0.1"]))
        .collect();
    let refs: Vec<(&str, &[&str])> = many
        .iter()
        .map(|(v, r)| (v.as_str(), r.as_slice()))
        .collect();
    let err = plan::check_capacity(&n.lb, &plan(&refs)).unwrap_err();
    assert!(err.contains("ring storage"), "{err}");
    assert_eq!(n.lb.vip_count(), 1, "nothing applied");
}

#[test]
fn a_real_moving_from_a_removed_vip_to_a_new_one_keeps_its_slot_and_the_rest_is_untouched() {
    let before = plan(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.2", &["10.1.0.2"])]);
    let mut n = Node::new(&before);
    let kept = n.flow_to("10.0.0.1", "10.1.0.1");
    let kept_mark = n.mark_of(&kept.flow()).unwrap();
    let id = |n: &Node, a: &str| n.lb.real_id(&ip(a)).expect("programmed");
    let slot = id(&n, "10.1.0.2");
    let generation = n.dp.real(slot).unwrap().generation;

    // 10.0.0.2 goes; 10.0.0.3 arrives with its real in the same apply.
    let report = n.apply(&plan(&[
        ("10.0.0.1", &["10.1.0.1"]),
        ("10.0.0.3", &["10.1.0.2"]),
    ]));
    assert_eq!((report.removed.len(), report.added.len()), (1, 1));
    assert_eq!(report.unchanged, 1);
    assert_eq!(report.reals_retired, 0, "10.1.0.2 is still listed");
    assert_eq!(id(&n, "10.1.0.2"), slot, "same slot");
    assert_eq!(
        n.dp.real(slot).unwrap().generation,
        generation,
        "same generation"
    );
    // The new VIP forwards to it; the untouched VIP's flow keeps its real and its mark.
    let syn = FrameSpec::tcp(ip("192.0.2.9"), 40_000, ip("10.0.0.3"), 80, true);
    assert_eq!(n.send(Prog::Balancer, &syn), ip("10.1.0.2"));
    assert_eq!(n.send(Prog::EmulatedNic, &kept), ip("10.1.0.1"));
    assert_eq!(n.mark_of(&kept.flow()), Some(kept_mark));
}
