//! The connection table's own behaviour in the datapath (4-way sets, `marklb_common::conn`):
//! which flow a full set lets go, that a slot torn by two CPUs' writes is a miss and never
//! another flow's real, and that a pinned table keeps its flows and size across a reload.
//! Checked on the XDP and the TC balancer where a packet is involved.

use std::{thread::sleep, time::Duration};

use marklb_agent::{
    datapath::{Datapath, LoadOptions, Prog},
    model::DatapathModel,
    vip::VipId,
};
use marklb_common::{Counter, FlowKey};
use marklb_tests::{agent_proc::Workdir, datapath_fixture::*};

const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// Longer than a slot's time unit (2^24 ns, 16.8 ms), so consecutive writes get distinct
/// stamps.
const TICK: Duration = Duration::from_millis(40);

fn syn(sport: u16) -> Vec<u8> {
    tcp(client4(), sport, vip4(), 80, true)
}

fn ack(sport: u16) -> Vec<u8> {
    tcp(client4(), sport, vip4(), 80, false)
}

fn flow(sport: u16) -> FlowKey {
    tcp_flow(client4(), sport, vip4(), 80)
}

/// Sends `frame`, asserting it went to the model's real for its flow through `path`.
fn forward(fx: &mut Fixture, desc: &str, frame: Vec<u8>, path: Counter) {
    let f = parse_l3l4(&frame).unwrap().flow();
    let real = fx.model_real(&f);
    fx.run_case(&Case::forward(desc, frame, real, path));
}

#[test]
fn a_full_set_lets_its_least_recently_used_flow_go() {
    for hook in HOOKS {
        // Four flows: the whole table is one set.
        let mut fx = Fixture::with_conn_table(test_config(), 4);
        fx.hook = hook;
        fx.add_standard_vips();
        assert_eq!(fx.dp.conn_table().sets(), 1);
        for p in 1..=4 {
            forward(
                &mut fx,
                &format!("{hook:?} SYN {p}"),
                syn(p),
                Counter::NewFlow,
            );
            sleep(TICK);
        }
        assert_eq!(fx.dp.conn_count(), 4);
        // Flow 1 is used again: flow 2 is now the least recently used.
        forward(
            &mut fx,
            &format!("{hook:?} ACK 1"),
            ack(1),
            Counter::ConnHit,
        );
        sleep(TICK);
        let before = fx.counters();
        forward(
            &mut fx,
            &format!("{hook:?} SYN 5"),
            syn(5),
            Counter::NewFlow,
        );
        let d = fx.counters().since(&before);
        assert_eq!(
            d.get(Counter::ConnEvicted),
            1,
            "{hook:?}: one flow gave way"
        );
        assert!(fx.dp.conn(&flow(2)).is_none(), "{hook:?}: flow 2 left");
        for p in [1, 3, 4, 5] {
            assert!(fx.dp.conn(&flow(p)).is_some(), "{hook:?}: flow {p} held");
        }
        assert_eq!(fx.dp.conn_count(), 4);
        // Flow 2's next packet is picked from the ring again: the same real, unchanged ring.
        forward(
            &mut fx,
            &format!("{hook:?} ACK 2 after eviction"),
            ack(2),
            Counter::NewFlow,
        );
        assert!(
            fx.dp.conn(&flow(2)).is_some(),
            "{hook:?}: flow 2 learned again"
        );
    }
}

#[test]
fn a_torn_slot_is_a_miss_never_another_flows_real() {
    for hook in HOOKS {
        let mut fx = Fixture::standard();
        fx.hook = hook;
        // Flow a (vip4, IPv4 reals) and flow b (another VIP with IPv6 reals).
        let a = flow(1000);
        let b_frame = tcp(client4(), 2000, vip4_v6reals(), 80, true);
        let b = parse_l3l4(&b_frame).unwrap().flow();
        forward(&mut fx, "SYN a", syn(1000), Counter::NewFlow);
        forward(&mut fx, "SYN b", b_frame, Counter::NewFlow);
        let (set, way, good) = fx.dp.conn_table().raw_slot(&a).expect("a held");
        let (_, _, other) = fx.dp.conn_table().raw_slot(&b).expect("b held");
        assert_ne!(good.entry.real_id, other.entry.real_id);
        let mut torn = Vec::new();
        let mut s = good;
        s.entry = other.entry;
        torn.push(("a's key and check, b's entry", s));
        s.check = other.check;
        torn.push(("a's key, b's entry and check", s));
        let mut s = good;
        s.check = other.check;
        torn.push(("a's key and entry, b's check", s));
        let mut s = good;
        s.entry.real_id = other.entry.real_id;
        torn.push(("a's entry with b's real id", s));
        for (what, slot) in torn {
            fx.dp.conn_table_mut().overwrite_slot(set, way, slot);
            assert!(fx.dp.conn(&a).is_none(), "{hook:?} {what}: read as a miss");
            // The datapath picks a's real from the ring again and writes the slot whole.
            forward(
                &mut fx,
                &format!("{hook:?} ACK a, {what}"),
                ack(1000),
                Counter::NewFlow,
            );
            let e = fx.dp.conn(&a).expect("a learned again");
            assert_eq!(e.real_id, good.entry.real_id, "{hook:?} {what}");
            forward(
                &mut fx,
                &format!("{hook:?} ACK a after {what}"),
                ack(1000),
                Counter::ConnHit,
            );
        }
    }
}

#[test]
fn a_pinned_table_keeps_its_flows_and_its_size_across_a_reload() {
    require_root_bpf();
    let work = Workdir::new("marklb-conn-pins").expect("work dir");
    let bpffs = work.bpffs();
    marklb_agent::ensure_bpffs(&bpffs)
        .unwrap_or_else(|e| panic!("mounting a bpffs on {}: {e:#}", bpffs.display()));
    let opts = LoadOptions {
        ring_capacity: 1 << 18,
        conn_table_size: 1 << 12,
        pin_dir: Some(bpffs.clone()),
        ..Default::default()
    };
    let learned = {
        let mut dp = Datapath::load(&opts).expect("load");
        dp.set_config(&test_config()).unwrap();
        DatapathModel::new(&dp)
            .set_vip(
                &mut dp,
                VipId::tcp(vip4(), 80),
                &backends(&reals4()[0..4]),
                65_537,
            )
            .unwrap();
        let r = dp.test_run(Prog::Balancer, &syn(7), None).unwrap();
        assert_eq!(r.action, 3, "SYN forwarded (XDP_TX)");
        dp.conn(&flow(7)).expect("learned")
    };
    // A new agent asking for another size adopts the pinned table as it is.
    let mut dp = Datapath::load(&LoadOptions {
        conn_table_size: 1 << 16,
        ..opts
    })
    .expect("reload");
    assert_eq!(dp.conn_table().sets(), 1 << 10, "the pinned table's size");
    assert_eq!(dp.conn(&flow(7)), Some(learned));
    let before = dp.counters().unwrap();
    let r = dp.test_run(Prog::Balancer, &ack(7), None).unwrap();
    assert_eq!(r.action, 3);
    let d = dp.counters().unwrap().since(&before);
    assert_eq!(
        d.get(Counter::ConnHit),
        1,
        "established through the adopted table"
    );
    drop(dp);
    work.unmount();
}
