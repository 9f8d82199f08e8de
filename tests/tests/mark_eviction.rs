//! Which flows hold the marks when there are not enough: the datapath's events (raised by
//! the packet after the SYN) go to the mark manager, and once every mark is taken the
//! idlest flows give theirs to the flows that earned one; flows seen in the last aging
//! period keep theirs. Real datapath, emulated NIC, no network. Needs root.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use marklb_agent::{
    apply,
    datapath::{Datapath, EventReader, LoadOptions, Prog, testrun::XDP_TX},
    desired::{Desired, MarkPolicy, NextHop, NodeSettings, Owner, VipPlan},
    maglev::Backend,
    marks::{EmulatedNic, MarkManager},
    model::DatapathModel,
    packet::FrameSpec,
    plan,
    vip::VipId,
};
use marklb_common::{Counter, FlowKey};
use marklb_crds::loadbalancer::MarkScope;
use marklb_tests::datapath_fixture::{pin_to_current_cpu, require_root_bpf};

const CAPACITY: u32 = 4;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn desired() -> Desired {
    let backends = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        .iter()
        .map(|r| Backend {
            addr: ip(r),
            weight: 1,
        })
        .collect();
    let vips = BTreeMap::from([(
        VipId::tcp(ip("10.0.0.1"), 80),
        VipPlan {
            label: "web".into(),
            backends,
            table_size: 1_009,
            owner: Owner::new("test", "web"),
        },
    )]);
    Desired {
        vips,
        settings: NodeSettings {
            interface: None,
            next_hop: NextHop::default(),
            marks: MarkPolicy {
                scope: MarkScope::PerFlow,
                capacity: CAPACITY,
                idle_timeout: Duration::from_secs(600),
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
    marks: MarkManager,
    events: EventReader,
}

impl Node {
    fn new() -> Self {
        require_root_bpf();
        let desired = desired();
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
        let mut lb = DatapathModel::new(&dp);
        let nic = EmulatedNic::new(&dp).expect("emulated NIC");
        let mut marks = MarkManager::new(Box::new(nic), desired.settings.marks);
        plan::check_capacity(&lb, &desired).expect("fits");
        apply::apply(&mut dp, &mut lb, &mut marks, &desired).expect("apply");
        let events = dp.take_events().expect("event reader");
        Self { dp, marks, events }
    }

    /// One packet through the emulated NIC and the balancer; the path counter it took.
    fn send(&mut self, frame: &FrameSpec) -> Counter {
        let before = self.dp.counters().expect("counters");
        let r = self
            .dp
            .test_run(Prog::EmulatedNic, &frame.build(), None)
            .expect("test run");
        assert_eq!(r.action, XDP_TX, "not forwarded");
        let d = self.dp.counters().expect("counters").since(&before);
        [Counter::MarkHit, Counter::ConnHit, Counter::NewFlow]
            .into_iter()
            .find(|c| d.get(*c) == 1)
            .expect("one forwarding path")
    }

    /// Hands every waiting event to the mark manager, as the agent's consumer does;
    /// returns how many marks it installed.
    fn deliver(&mut self) -> usize {
        let mut installed = 0;
        while let Some(ev) = self.events.next_event() {
            installed += self.marks.on_event(&mut self.dp, &ev).is_some() as usize;
        }
        installed
    }

    /// A connection's handshake (SYN, then the ACK that raises its event) and the event
    /// delivered; returns the frame of its later packets and whether it got a mark.
    fn connect(&mut self, sport: u16) -> (FrameSpec, bool) {
        let syn = FrameSpec::tcp(ip("192.0.2.7"), sport, ip("10.0.0.1"), 80, true);
        assert_eq!(self.send(&syn), Counter::NewFlow);
        assert_eq!(self.deliver(), 0, "the SYN raised an event");
        let ack = FrameSpec::tcp(ip("192.0.2.7"), sport, ip("10.0.0.1"), 80, false);
        assert_eq!(self.send(&ack), Counter::ConnHit);
        let got = self.deliver() == 1;
        (ack, got)
    }

    fn mark_of(&self, flow: &FlowKey) -> Option<u32> {
        self.dp.nic_flow(flow).map(|r| r.mark)
    }
}

#[test]
fn when_marks_run_out_the_idlest_flows_give_way_to_flows_that_earned_one() {
    pin_to_current_cpu();
    let mut n = Node::new();
    let flows: Vec<FrameSpec> = (0..CAPACITY as u16)
        .map(|i| {
            let (f, got) = n.connect(21_000 + i);
            assert!(got, "flow {i}: no mark while marks are free");
            f
        })
        .collect();
    let marks: Vec<u32> = flows
        .iter()
        .map(|f| n.mark_of(&f.flow()).expect("rule installed"))
        .collect();
    assert_eq!(n.marks.in_use(), CAPACITY as usize);

    // Full, and no aging sample yet: nobody has shown to be idle, so nobody gives way.
    let (late, got) = n.connect(22_000);
    assert!(!got, "a mark was taken before any flow was seen idle");
    assert_eq!(
        (n.marks.stats.evicted, n.marks.stats.capacity_exhausted),
        (0, 1)
    );

    // Two samples a period apart; flows 2 and 3 send in between, 0 and 1 stay quiet.
    n.marks.age(&mut n.dp).expect("age");
    std::thread::sleep(Duration::from_millis(20));
    for f in &flows[2..] {
        assert_eq!(n.send(f), Counter::MarkHit);
    }
    n.marks.age(&mut n.dp).expect("age");

    // New flows earn marks from the idle ones, the idlest (quiet longest: flow 0) first.
    let (f5, got) = n.connect(23_000);
    assert!(got, "no mark for a flow that earned one");
    assert_eq!(n.mark_of(&flows[0].flow()), None, "flow 0 kept its rule");
    assert_eq!(n.mark_of(&f5.flow()), Some(marks[0]), "flow 0's mark");
    let (f6, got) = n.connect(23_001);
    assert!(got);
    assert_eq!(n.mark_of(&flows[1].flow()), None, "flow 1 kept its rule");
    assert_eq!(n.mark_of(&f6.flow()), Some(marks[1]));
    assert_eq!(n.marks.stats.evicted, 2);

    // The busy flows keep theirs: the next one gets none.
    let (f7, got) = n.connect(23_002);
    assert!(!got, "a busy flow's mark was taken");
    assert_eq!(n.marks.stats.evicted, 2);
    assert_eq!(n.marks.stats.capacity_exhausted, 2);
    assert_eq!(n.mark_of(&flows[2].flow()), Some(marks[2]));
    assert_eq!(n.mark_of(&flows[3].flow()), Some(marks[3]));
    assert_eq!(n.mark_of(&f7.flow()), None);
    assert_eq!(n.marks.in_use(), CAPACITY as usize);

    // Flows that gave way are still served (normal path) by the same real; the new owners
    // of their marks take the fast path to theirs.
    for f in &flows[..2] {
        let conn = n.dp.conn(&f.flow()).expect("still in the connection table");
        assert_eq!(n.send(f), Counter::ConnHit);
        assert_eq!(n.dp.conn(&f.flow()).unwrap().real_id, conn.real_id);
    }
    for f in [&f5, &f6, &flows[2], &flows[3]] {
        assert_eq!(n.send(f), Counter::MarkHit);
    }
    let _ = late;
}
