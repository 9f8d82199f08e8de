//! New-flow events: which packet of a flow raises one (TCP: the first after the SYN, never
//! the SYN; UDP: the configured packet count; again later for a flow still without a
//! mark), none for marked packets, bounded per CPU. Each behaviour is checked on the XDP
//! and on the TC balancer (the same paths behind either hook).

use marklb_agent::{datapath::EventReader, vip::VipId};
use marklb_common::{
    CFG_F_EVENTS, Counter, DEFAULT_UDP_EVENT_PACKETS, EVENT_RETRY_FIRST, LbConfig, NewFlowEvent,
};
use marklb_tests::datapath_fixture::*;

fn events_config(interval_ns: u32, burst: u32) -> LbConfig {
    let mut cfg = test_config();
    cfg.flags |= CFG_F_EVENTS;
    cfg.event_interval_ns = interval_ns;
    cfg.events_burst = burst;
    cfg
}

fn drain(r: &mut EventReader) -> Vec<NewFlowEvent> {
    std::iter::from_fn(|| r.next_event()).collect()
}

/// A fixture with events on (unlimited) and the standard VIPs, running `hook`.
fn events_fixture(hook: Hook) -> (Fixture, EventReader) {
    let mut fx = Fixture::with_config(events_config(0, 0));
    fx.hook = hook;
    fx.add_standard_vips();
    let reader = fx.dp.take_events().expect("event reader");
    (fx, reader)
}

const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// A TCP RST+ACK from the client (checksums valid).
fn tcp_rst(src: std::net::IpAddr, sport: u16, dst: std::net::IpAddr, dport: u16) -> Vec<u8> {
    let (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s.octets(), d.octets(), 64)
        .tcp(sport, dport, 1000, 0)
        .rst()
        .ack(1)
        .write(&mut out, &[])
        .expect("frame");
    out
}

/// Sends `frame` (forwarded to its model real, counted as `counter`) and returns the events
/// it raised.
fn send(
    fx: &mut Fixture,
    reader: &mut EventReader,
    desc: &str,
    frame: &[u8],
    counter: Counter,
) -> Vec<NewFlowEvent> {
    let flow = parse_l3l4(frame).unwrap().flow();
    let real = fx.model_real(&flow);
    fx.run_case(&Case::forward(desc, frame.to_vec(), real, counter));
    drain(reader)
}

#[test]
fn a_syn_raises_no_event_and_the_first_packet_after_it_does() {
    pin_to_current_cpu();
    for hook in HOOKS {
        let (mut fx, mut reader) = events_fixture(hook);
        for (client, vip) in [
            (client4(), vip4()),
            (client6(), vip6()),
            (client4(), vip4_v6reals()),
        ] {
            let tag = format!("{hook:?} {vip}");
            let syn = tcp(client, 4000, vip, 80, true);
            let ack = tcp(client, 4000, vip, 80, false);
            let flow = parse_l3l4(&syn).unwrap().flow();
            let pick = fx.model_pick(&flow).unwrap();
            let before = fx.counters();
            let ev = send(&mut fx, &mut reader, "SYN", &syn, Counter::NewFlow);
            assert!(ev.is_empty(), "{tag}: the SYN raised {ev:?}");
            // A retransmitted SYN is a new pick again, and raises nothing either.
            let ev = send(&mut fx, &mut reader, "SYN again", &syn, Counter::NewFlow);
            assert!(ev.is_empty(), "{tag}: the second SYN raised {ev:?}");
            let d = fx.counters().since(&before);
            assert_eq!(
                d.get(Counter::EventSent) + d.get(Counter::EventRateLimited),
                0,
                "{tag}: {d:?}"
            );

            let t0 = monotonic_ns();
            let ev = send(
                &mut fx,
                &mut reader,
                "handshake ACK",
                &ack,
                Counter::ConnHit,
            );
            let t1 = monotonic_ns();
            assert_eq!(ev.len(), 1, "{tag}: one event on the packet after the SYN");
            let e = ev[0];
            assert_eq!(e.flow, flow, "{tag}");
            assert_eq!(e.real_id, pick.real_id, "{tag}");
            assert_eq!(e.real_gen, pick.generation, "{tag}");
            assert_eq!(e.real_gen, fx.dp.real(pick.real_id).unwrap().generation);
            assert_eq!(
                e.vip_id,
                fx.lb.vip_stats_id(&VipId::tcp(vip, 80)).unwrap(),
                "{tag}"
            );
            assert!(
                t0 <= e.ts_ns && e.ts_ns <= t1,
                "{tag}: timestamp {} outside [{t0}, {t1}]",
                e.ts_ns
            );
            // The packets after it, up to the first retry, raise nothing.
            for i in 3..EVENT_RETRY_FIRST {
                let ev = send(&mut fx, &mut reader, "established", &ack, Counter::ConnHit);
                assert!(ev.is_empty(), "{tag}: packet {i} raised {ev:?}");
            }
            // Marked packets take the fast path: no event, and they do not count.
            fx.dp
                .set_mark(9, &fx.mark_entry(&VipId::tcp(vip, 80), &pick.addr))
                .unwrap();
            for _ in 0..40 {
                let real = fx.model_real(&flow);
                fx.run_case(
                    &Case::forward("marked", ack.clone(), real, Counter::MarkHit).with_mark(9),
                );
            }
            assert!(
                drain(&mut reader).is_empty(),
                "{tag}: marked packets raised"
            );
            // A SYN on the known flow starts it over: nothing on the SYN, one event after.
            assert!(send(&mut fx, &mut reader, "new SYN", &syn, Counter::NewFlow).is_empty());
            let ev = send(&mut fx, &mut reader, "its ACK", &ack, Counter::ConnHit);
            assert_eq!(ev.len(), 1, "{tag}: the reused 5-tuple's ACK");
        }

        // A TCP flow first seen mid-connection (the table lost it, or an ACK flood): its
        // first packet teaches the table and raises nothing; the next one raises it.
        let mid = tcp(client4(), 4100, vip4(), 80, false);
        let ev = send(&mut fx, &mut reader, "unknown ACK", &mid, Counter::NewFlow);
        assert!(ev.is_empty(), "{hook:?}: a lone ACK raised {ev:?}");
        let ev = send(&mut fx, &mut reader, "second ACK", &mid, Counter::ConnHit);
        assert_eq!(ev.len(), 1, "{hook:?}");

        // A reset after the SYN (what a spoofed address's owner answers to a flood's
        // SYN-ACK) earns nothing; the flow's next packet is no "first after the SYN" either.
        let syn = tcp(client4(), 4200, vip4(), 80, true);
        assert!(send(&mut fx, &mut reader, "SYN", &syn, Counter::NewFlow).is_empty());
        let ev = send(
            &mut fx,
            &mut reader,
            "RST",
            &tcp_rst(client4(), 4200, vip4(), 80),
            Counter::ConnHit,
        );
        assert!(ev.is_empty(), "{hook:?}: the RST raised {ev:?}");
        let after = tcp(client4(), 4200, vip4(), 80, false);
        assert!(
            send(
                &mut fx,
                &mut reader,
                "after the RST",
                &after,
                Counter::ConnHit
            )
            .is_empty()
        );

        // Nothing for passed, dropped or ICMP traffic.
        fx.run_case(&Case::pass(
            "not a VIP",
            tcp(client4(), 1, other4(), 80, false),
            Counter::PassNotVip,
        ));
        fx.run_case(&Case::drop(
            "fragment",
            with_frag(&tcp(client4(), 4000, vip4(), 80, false), 0x2001),
            Counter::DropFragment,
        ));
        fx.run_case(&Case::new(
            "echo",
            icmp_echo(client4(), vip4(), 1, 1, 4),
            Expect::EchoReply,
            Counter::IcmpEchoReply,
        ));
        assert!(drain(&mut reader).is_empty());
        let c = fx.counters();
        assert_eq!(
            c.get(Counter::EventSent),
            7,
            "{hook:?}: 3 flows x (ACK + ACK after a new SYN) + the mid-connection flow"
        );
        assert_eq!(
            c.get(Counter::EventLost) + c.get(Counter::EventRateLimited),
            0
        );
    }
}

#[test]
fn a_udp_flow_raises_its_event_at_its_packet_threshold() {
    pin_to_current_cpu();
    for hook in HOOKS {
        let (mut fx, mut reader) = events_fixture(hook);
        // The default (the configuration's 0), then explicit thresholds.
        for (setting, threshold, sport) in [
            (0u8, DEFAULT_UDP_EVENT_PACKETS, 5000u16),
            (2, 2, 5001),
            (1, 1, 5002),
            (7, 7, 5003),
        ] {
            let mut cfg = events_config(0, 0);
            cfg.udp_event_packets = setting;
            fx.set_config(cfg);
            for (client, vip) in [(client4(), vip4()), (client6(), vip6())] {
                let frame = udp(client, sport, vip, 53);
                let flow = parse_l3l4(&frame).unwrap().flow();
                let mut raised = Vec::new();
                for n in 1..=EVENT_RETRY_FIRST - 1 {
                    let counter = if n == 1 {
                        Counter::NewFlow
                    } else {
                        Counter::ConnHit
                    };
                    let ev = send(&mut fx, &mut reader, "datagram", &frame, counter);
                    for e in &ev {
                        assert_eq!(e.flow, flow);
                        assert_eq!(e.vip_id, fx.lb.vip_stats_id(&VipId::udp(vip, 53)).unwrap());
                    }
                    raised.extend(std::iter::repeat_n(n, ev.len()));
                }
                assert_eq!(
                    raised,
                    [threshold as u16],
                    "{hook:?} {vip}: udp_event_packets {setting}: the packets that raised an event"
                );
            }
        }
    }
}

/// A flow whose event was suppressed (here by the rate limit) gets another chance at 16,
/// 32, ... packets, within the limit; one that has a mark by then raises nothing.
#[test]
fn an_unmarked_flow_raises_its_event_again_after_more_packets() {
    pin_to_current_cpu();
    for hook in HOOKS {
        // One event per 300 ms per CPU.
        let mut fx = Fixture::with_config(events_config(300_000_000, 1));
        fx.hook = hook;
        fx.add_standard_vips();
        let mut reader = fx.dp.take_events().expect("event reader");
        let open = |fx: &mut Fixture, reader: &mut EventReader, sport: u16| {
            let syn = tcp(client4(), sport, vip4(), 80, true);
            assert!(send(fx, reader, "SYN", &syn, Counter::NewFlow).is_empty());
            tcp(client4(), sport, vip4(), 80, false)
        };
        let a = open(&mut fx, &mut reader, 6000);
        let b = open(&mut fx, &mut reader, 6001);
        let flow_b = parse_l3l4(&b).unwrap().flow();
        assert_eq!(
            send(&mut fx, &mut reader, "A's ACK", &a, Counter::ConnHit).len(),
            1
        );
        let before = fx.counters();
        let ev = send(&mut fx, &mut reader, "B's ACK", &b, Counter::ConnHit);
        assert!(ev.is_empty(), "{hook:?}: B's event should be rate-limited");
        assert_eq!(
            fx.counters().since(&before).get(Counter::EventRateLimited),
            1
        );
        std::thread::sleep(std::time::Duration::from_millis(400));
        // Packets 3..15 of B: nothing; packet 16: B's event, now within the limit.
        let mut raised = Vec::new();
        for n in 3..=EVENT_RETRY_FIRST {
            let ev = send(&mut fx, &mut reader, "B", &b, Counter::ConnHit);
            raised.extend(ev.iter().map(|e| (n, e.flow)));
        }
        assert_eq!(raised, [(EVENT_RETRY_FIRST, flow_b)], "{hook:?}");
        // Still unmarked: again at 32 (the limit has refilled by then).
        std::thread::sleep(std::time::Duration::from_millis(400));
        let mut raised = Vec::new();
        for n in EVENT_RETRY_FIRST + 1..=2 * EVENT_RETRY_FIRST {
            let ev = send(&mut fx, &mut reader, "B", &b, Counter::ConnHit);
            raised.extend(ev.iter().map(|_| n));
        }
        assert_eq!(raised, [2 * EVENT_RETRY_FIRST], "{hook:?}");
        // Marked from now on: its packets take the fast path and raise nothing, however many.
        let pick = fx.model_pick(&flow_b).unwrap();
        fx.dp
            .set_mark(7, &fx.mark_entry(&VipId::tcp(vip4(), 80), &pick.addr))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        for _ in 0..70 {
            fx.run_case(
                &Case::forward("B marked", b.clone(), pick.addr, Counter::MarkHit).with_mark(7),
            );
        }
        assert!(drain(&mut reader).is_empty(), "{hook:?}");
    }
}

#[test]
fn events_are_off_without_the_flag() {
    pin_to_current_cpu();
    let mut fx = Fixture::standard();
    let mut reader = fx.dp.take_events().expect("event reader");
    for i in 0..10u16 {
        for (syn, counter) in [(true, Counter::NewFlow), (false, Counter::ConnHit)] {
            let f = tcp(client4(), 100 + i, vip4(), 80, syn);
            let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
            fx.run_case(&Case::forward("events off", f, real, counter));
        }
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
        let syn = tcp(client4(), 7000 + i, vip4(), 80, true);
        let ack = tcp(client4(), 7000 + i, vip4(), 80, false);
        let real = fx.model_real(&parse_l3l4(&syn).unwrap().flow());
        let before = fx.counters();
        fx.run_case(&Case::forward("SYN", syn, real, Counter::NewFlow));
        // The packet is forwarded either way; only the event is limited.
        fx.run_case(&Case::forward(
            format!("ACK of flow {i}"),
            ack.clone(),
            real,
            Counter::ConnHit,
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
        flows.push(parse_l3l4(&ack).unwrap().flow());
    }
    let ev = drain(&mut reader);
    assert_eq!(
        ev.iter().map(|e| e.flow).collect::<Vec<_>>(),
        flows[..2].to_vec()
    );
    // Established traffic that raises no event does not touch the limiter.
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
        let syn = tcp(client4(), 8000 + i, vip4(), 80, true);
        let ack = tcp(client4(), 8000 + i, vip4(), 80, false);
        let real = fx.model_real(&parse_l3l4(&syn).unwrap().flow());
        fx.run_case(&Case::forward(
            "after refill, SYN",
            syn,
            real,
            Counter::NewFlow,
        ));
        fx.run_case(&Case::forward(
            "after refill, ACK",
            ack,
            real,
            Counter::ConnHit,
        ));
    }
    let d = fx.counters().since(&before);
    assert!(d.get(Counter::EventSent) >= 2, "{d:?}");
    assert_eq!(drain(&mut reader).len() as u64, d.get(Counter::EventSent));
}

#[test]
fn a_repeated_syn_of_a_live_flow_keeps_its_pick_and_counts_from_one_again() {
    pin_to_current_cpu();
    for hook in HOOKS {
        let (mut fx, mut reader) = events_fixture(hook);
        for (client, vip) in [(client4(), vip4()), (client6(), vip6())] {
            let tag = format!("{hook:?} {vip}");
            let syn = tcp(client, 4100, vip, 80, true);
            let ack = tcp(client, 4100, vip, 80, false);
            let flow = parse_l3l4(&syn).unwrap().flow();
            let ev = send(&mut fx, &mut reader, "SYN", &syn, Counter::NewFlow);
            assert!(ev.is_empty(), "{tag}: the SYN raised {ev:?}");
            let ev = send(&mut fx, &mut reader, "ACK", &ack, Counter::ConnHit);
            assert_eq!(
                ev.len(),
                1,
                "{tag}: the packet after the SYN raises one event"
            );
            for i in 3..EVENT_RETRY_FIRST {
                let ev = send(&mut fx, &mut reader, "established", &ack, Counter::ConnHit);
                assert!(ev.is_empty(), "{tag}: packet {i} raised {ev:?}");
            }
            let before = fx.dp.conn(&flow).expect("learned");
            assert_eq!(before.seen, EVENT_RETRY_FIRST - 1, "{tag}: {before:?}");
            // The same SYN again (retransmitted, or the client port reused): the entry is
            // refreshed where it is, the same pick, its count back to one.
            let ev = send(&mut fx, &mut reader, "SYN again", &syn, Counter::NewFlow);
            assert!(ev.is_empty(), "{tag}: the repeated SYN raised {ev:?}");
            let after = fx.dp.conn(&flow).expect("still learned");
            assert_eq!(
                (after.real_id, after.real_gen, after.vip_id, after.vip_gen),
                (
                    before.real_id,
                    before.real_gen,
                    before.vip_id,
                    before.vip_gen
                ),
                "{tag}: the repeated SYN changed the pick: {before:?} -> {after:?}"
            );
            assert_eq!(after.seen, 1, "{tag}: {after:?}");
            let ev = send(&mut fx, &mut reader, "ACK again", &ack, Counter::ConnHit);
            assert_eq!(
                ev.len(),
                1,
                "{tag}: the packet after the repeated SYN raises the event again"
            );
        }
    }
}
