//! New-flow events: one per ring pick, none for established flows, bounded per CPU.

use marklb_agent::{datapath::EventReader, vip::VipId};
use marklb_common::{CFG_F_EVENTS, Counter, LbConfig};
use marklb_tests::datapath_fixture::*;

fn events_config(interval_ns: u32, burst: u32) -> LbConfig {
    let mut cfg = test_config();
    cfg.flags |= CFG_F_EVENTS;
    cfg.event_interval_ns = interval_ns;
    cfg.events_burst = burst;
    cfg
}

fn drain(r: &mut EventReader) -> Vec<marklb_common::NewFlowEvent> {
    std::iter::from_fn(|| r.next_event()).collect()
}

#[test]
fn a_new_flow_emits_one_event_with_its_flow_vip_and_real() {
    pin_to_current_cpu();
    let mut fx = Fixture::with_config(events_config(0, 0));
    fx.add_standard_vips();
    let mut reader = fx.dp.take_events().expect("event reader");
    for (client, vip, proto_tcp) in [
        (client4(), vip4(), true),
        (client6(), vip6(), false),
        (client4(), vip4_v6reals(), true),
    ] {
        let frame = if proto_tcp {
            tcp(client, 4000, vip, 80, true)
        } else {
            udp(client, 4000, vip, 53)
        };
        let flow = parse_l3l4(&frame).unwrap().flow();
        let pick = fx.model_pick(&flow).unwrap();
        let t0 = monotonic_ns();
        fx.run_case(&Case::forward(
            "new flow",
            frame.clone(),
            pick.addr,
            Counter::NewFlow,
        ));
        let t1 = monotonic_ns();
        let ev = drain(&mut reader);
        assert_eq!(ev.len(), 1, "{vip}: one event per new flow");
        let e = ev[0];
        assert_eq!(e.flow, flow);
        assert_eq!(e.real_id, pick.real_id);
        assert_eq!(e.real_gen, pick.generation);
        assert_eq!(e.real_gen, fx.dp.real(pick.real_id).unwrap().generation);
        let vid = if proto_tcp {
            VipId::tcp(vip, 80)
        } else {
            VipId::udp(vip, 53)
        };
        assert_eq!(e.vip_id, fx.lb.vip_stats_id(&vid).unwrap());
        assert_eq!(e.vip_id, pick.vip_id);
        assert!(
            t0 <= e.ts_ns && e.ts_ns <= t1,
            "timestamp {} outside [{t0}, {t1}]",
            e.ts_ns
        );

        // Established: no event.
        let again = if proto_tcp {
            tcp(client, 4000, vip, 80, false)
        } else {
            frame.clone()
        };
        fx.run_case(&Case::forward(
            "established",
            again,
            pick.addr,
            Counter::ConnHit,
        ));
        assert!(
            drain(&mut reader).is_empty(),
            "{vip}: established flow emitted an event"
        );
        // Marked: no event.
        fx.dp.set_mark(9, &fx.mark_entry(&vid, &pick.addr)).unwrap();
        let again = if proto_tcp {
            tcp(client, 4000, vip, 80, false)
        } else {
            frame.clone()
        };
        fx.run_case(&Case::forward("marked", again, pick.addr, Counter::MarkHit).with_mark(9));
        assert!(drain(&mut reader).is_empty());
    }
    // A SYN on a known flow is a new pick: one event.
    let syn = tcp(client4(), 4000, vip4(), 80, true);
    let real = fx.model_real(&parse_l3l4(&syn).unwrap().flow());
    fx.run_case(&Case::forward("SYN again", syn, real, Counter::NewFlow));
    assert_eq!(drain(&mut reader).len(), 1);
    // Nothing for passed, dropped, ICMP or too-big traffic.
    fx.run_case(&Case::pass(
        "not a VIP",
        tcp(client4(), 1, other4(), 80, true),
        Counter::PassNotVip,
    ));
    fx.run_case(&Case::drop(
        "fragment",
        with_frag(&tcp(client4(), 2, vip4(), 80, true), 0x2001),
        Counter::DropFragment,
    ));
    fx.run_case(&Case::new(
        "echo",
        icmp_echo(client4(), vip4(), 1, 1, 4),
        Expect::EchoReply,
        Counter::IcmpEchoReply,
    ));
    let c = fx.counters();
    assert!(drain(&mut reader).is_empty());
    assert_eq!(c.get(Counter::EventSent), 4, "3 new flows + 1 SYN re-pick");
    assert_eq!(
        c.get(Counter::EventLost) + c.get(Counter::EventRateLimited),
        0
    );
}

#[test]
fn events_are_off_without_the_flag() {
    pin_to_current_cpu();
    let mut fx = Fixture::standard();
    let mut reader = fx.dp.take_events().expect("event reader");
    for i in 0..10u16 {
        let f = tcp(client4(), 100 + i, vip4(), 80, true);
        let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
        fx.run_case(&Case::forward(
            "new flow, events off",
            f,
            real,
            Counter::NewFlow,
        ));
    }
    assert!(drain(&mut reader).is_empty());
    let c = fx.counters();
    assert_eq!(
        c.get(Counter::EventSent) + c.get(Counter::EventLost) + c.get(Counter::EventRateLimited),
        0
    );
}

#[test]
fn the_per_cpu_rate_limit_suppresses_events_beyond_the_burst() {
    // The limiter is per CPU: stay on one.
    pin_to_current_cpu();
    let mut fx = Fixture::with_config(events_config(1_000_000_000, 2));
    fx.add_standard_vips();
    let mut reader = fx.dp.take_events().expect("event reader");
    let mut flows = Vec::new();
    for i in 0..5u16 {
        let f = tcp(client4(), 7000 + i, vip4(), 80, true);
        let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
        let before = fx.counters();
        // The packet is forwarded either way; only the event is limited.
        fx.run_case(&Case::forward(
            format!("new flow {i}"),
            f.clone(),
            real,
            Counter::NewFlow,
        ));
        let d = fx.counters().since(&before);
        let (sent, limited) = (d.get(Counter::EventSent), d.get(Counter::EventRateLimited));
        if i < 2 {
            assert_eq!((sent, limited), (1, 0), "flow {i} within the burst of 2");
        } else {
            assert_eq!(
                (sent, limited),
                (0, 1),
                "flow {i} beyond the burst of 2 within 1 s"
            );
        }
        flows.push(parse_l3l4(&f).unwrap().flow());
    }
    let ev = drain(&mut reader);
    assert_eq!(
        ev.iter().map(|e| e.flow).collect::<Vec<_>>(),
        flows[..2].to_vec()
    );
    // Established traffic does not touch the limiter.
    let f = tcp(client4(), 7000, vip4(), 80, false);
    let real = fx.model_real(&flows[0]);
    let before = fx.counters();
    fx.run_case(&Case::forward("established", f, real, Counter::ConnHit));
    assert_eq!(
        fx.counters().since(&before).get(Counter::EventRateLimited),
        0
    );

    // A short interval refills: after 2 intervals, 2 more events pass.
    fx.set_config(events_config(20_000_000, 2));
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let before = fx.counters();
    for i in 0..3u16 {
        let f = tcp(client4(), 8000 + i, vip4(), 80, true);
        let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
        fx.run_case(&Case::forward("after refill", f, real, Counter::NewFlow));
    }
    let d = fx.counters().since(&before);
    assert!(d.get(Counter::EventSent) >= 2, "{d:?}");
    assert_eq!(drain(&mut reader).len() as u64, d.get(Counter::EventSent));
}
