//! Normal-path forwarding: VIP match, Maglev pick, connection table, IP-in-IP encapsulation,
//! asserted on the output bytes (see `marklb_tests::datapath_fixture`).

use std::{collections::HashSet, net::IpAddr};

use marklb_agent::{maglev::Backend, vip::VipId};
use marklb_common::{CFG_F_ENABLED, Counter, FlowKey};
use marklb_tests::datapath_fixture::*;

/// A forwarding case whose real is the model's ring pick for the frame's flow.
fn model_case(fx: &Fixture, desc: &str, frame: Vec<u8>, counter: Counter) -> Case {
    let flow = parse_l3l4(&frame).expect("frame parses").flow();
    let real = fx.model_real(&flow);
    Case::forward(desc, frame, real, counter)
}

fn flow_of(frame: &[u8]) -> FlowKey {
    parse_l3l4(frame).expect("frame parses").flow()
}

/// Outer destination of a forwarded frame.
fn outer_dst(out: &[u8]) -> IpAddr {
    if be16(out, 12) == 0x86dd {
        let o: [u8; 16] = out[38..54].try_into().unwrap();
        IpAddr::from(o)
    } else {
        let o: [u8; 4] = out[30..34].try_into().unwrap();
        IpAddr::from(o)
    }
}

#[test]
fn every_family_is_encapsulated_to_the_model_real() {
    let mut fx = Fixture::standard();
    let mut cases = Vec::new();
    let mut reals_seen: HashSet<IpAddr> = HashSet::new();
    for i in 0..12u16 {
        let sport = 40_000 + i * 7;
        let tos = [0x00, 0xb8, 0x2e, 0x03][i as usize % 4];
        let c4 = client4();
        let c6 = client6();
        let rows: Vec<(String, Vec<u8>, Counter)> = vec![
            (
                format!("IPv4 TCP SYN :{sport}"),
                tcp(c4, sport, vip4(), 80, true),
                Counter::NewFlow,
            ),
            (
                format!("IPv4 TCP ACK (established) :{sport}"),
                tcp(c4, sport, vip4(), 80, false),
                Counter::ConnHit,
            ),
            (
                format!("IPv4 TCP ACK, new flow :{sport}"),
                tcp(c4, sport + 1, vip4(), 80, false),
                Counter::NewFlow,
            ),
            (
                format!("IPv4 UDP :{sport}"),
                udp(c4, sport, vip4(), 53),
                Counter::NewFlow,
            ),
            (
                format!("IPv4 UDP again :{sport}"),
                udp(c4, sport, vip4(), 53),
                Counter::ConnHit,
            ),
            (
                format!("IPv6 TCP SYN :{sport}"),
                tcp(c6, sport, vip6(), 80, true),
                Counter::NewFlow,
            ),
            (
                format!("IPv6 TCP ACK :{sport}"),
                tcp(c6, sport, vip6(), 80, false),
                Counter::ConnHit,
            ),
            (
                format!("IPv6 UDP :{sport}"),
                udp(c6, sport, vip6(), 53),
                Counter::NewFlow,
            ),
            (
                format!("IPv6 UDP again :{sport}"),
                udp(c6, sport, vip6(), 53),
                Counter::ConnHit,
            ),
            (
                format!("IPv4-in-IPv6 TCP SYN :{sport}"),
                tcp(c4, sport, vip4_v6reals(), 80, true),
                Counter::NewFlow,
            ),
            (
                format!("IPv4-in-IPv6 TCP ACK :{sport}"),
                tcp(c4, sport, vip4_v6reals(), 80, false),
                Counter::ConnHit,
            ),
            (
                format!("IPv4-in-IPv6 UDP (all-ports VIP) :{sport}"),
                udp(c4, sport, vip4_v6reals(), 5000 + i),
                Counter::NewFlow,
            ),
        ];
        for (desc, frame, counter) in rows {
            let frame = set_tos(frame, tos);
            let c = model_case(&fx, &format!("{desc} tos {tos:#04x}"), frame, counter);
            if let Expect::Forward { real, .. } = c.expect {
                reals_seen.insert(real);
            }
            cases.push(c);
        }
    }
    fx.run_table(&cases);
    // Sanity of the sample: the flows spread over several reals of each family.
    assert!(
        reals_seen.iter().filter(|a| a.is_ipv4()).count() >= 3,
        "{reals_seen:?}"
    );
    assert!(
        reals_seen.iter().filter(|a| a.is_ipv6()).count() >= 3,
        "{reals_seen:?}"
    );
}

#[test]
fn outer_headers_field_by_field() {
    // One frame per encapsulation kind, checked here with explicit offsets in addition to
    // the fixture's checks, so a fixture mistake cannot hide a datapath mistake.
    let mut fx = Fixture::standard();
    let f = set_tos(tcp(client4(), 5555, vip4(), 80, true), 0xb8);
    let real = fx.model_real(&flow_of(&f));
    let r = fx.run(&f, None);
    assert_eq!(r.action, 3);
    let o = &r.frame;
    assert_eq!(o.len(), f.len() + 20);
    assert_eq!(&o[0..6], &NEXT_HOP_MAC);
    assert_eq!(&o[6..12], &f[0..6]);
    assert_eq!(&o[12..14], &[0x08, 0x00]);
    assert_eq!(o[14], 0x45);
    assert_eq!(o[15], 0xb8);
    assert_eq!(be16(o, 16) as usize, f.len() - 14 + 20);
    assert_eq!(o[22], 64);
    assert_eq!(o[23], 4);
    assert!(ipv4_header_valid(&o[14..34]));
    let mut h = o[14..34].to_vec();
    h[10] = 0;
    h[11] = 0;
    let (eh, _) = etherparse::Ipv4Header::from_slice(&o[14..34]).unwrap();
    assert_eq!(
        eh.calc_header_checksum(),
        be16(o, 24),
        "etherparse agrees on the checksum"
    );
    assert_eq!(checksum(&h), be16(o, 24));
    assert_eq!(&o[26..28], &[172, 16], "outer source in the /16 prefix");
    assert_eq!(outer_dst(o), real);
    assert_eq!(&o[34..], &f[14..]);

    let f6 = set_tos(udp(client6(), 6666, vip6(), 53), 0x2e);
    let real6 = fx.model_real(&flow_of(&f6));
    let r = fx.run(&f6, None);
    assert_eq!(r.action, 3);
    let o = &r.frame;
    assert_eq!(o.len(), f6.len() + 40);
    assert_eq!(&o[12..14], &[0x86, 0xdd]);
    assert_eq!(o[14] >> 4, 6);
    assert_eq!(((o[14] & 0xf) << 4) | (o[15] >> 4), 0x2e);
    assert_eq!(be16(o, 18) as usize, f6.len() - 14);
    assert_eq!(o[20], 41);
    assert_eq!(o[21], 64);
    assert_eq!(
        &o[22..34],
        &[0xfc, 0, 0x6d, 0x6c, 0, 0x62, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(outer_dst(o), real6);
    assert_eq!(&o[54..], &f6[14..]);

    let f46 = tcp(client4(), 7777, vip4_v6reals(), 80, true);
    let real46 = fx.model_real(&flow_of(&f46));
    assert!(real46.is_ipv6());
    let r = fx.run(&f46, None);
    assert_eq!(r.action, 3);
    let o = &r.frame;
    assert_eq!(o.len(), f46.len() + 40);
    assert_eq!(o[20], 4, "IPv4-in-IPv6: next header 4");
    assert_eq!(be16(o, 18) as usize, f46.len() - 14);
    // For an IPv4 client the last word of the outer source carries its address, mixed with
    // the port.
    assert_eq!(outer_dst(o), real46);
    assert_eq!(&o[54..], &f46[14..]);
}

#[test]
fn ethernet_padding_is_carried_and_lengths_come_from_the_ip_header() {
    let mut fx = Fixture::standard();
    let mut f = udp(client4(), 1111, vip4(), 53);
    f.extend_from_slice(&[0xee; 9]);
    let c = model_case(
        &fx,
        "IPv4 UDP with 9 bytes of Ethernet padding",
        f,
        Counter::NewFlow,
    );
    fx.run_case(&c);
    let mut f6 = tcp(client6(), 1111, vip6(), 80, true);
    f6.extend_from_slice(&[0; 6]);
    let c = model_case(
        &fx,
        "IPv6 TCP with 6 bytes of Ethernet padding",
        f6,
        Counter::NewFlow,
    );
    fx.run_case(&c);
}

#[test]
fn all_ports_vip_and_exact_port_precedence() {
    let mut fx = Fixture::standard();
    let r4 = reals4();
    let exact_id = fx
        .lb
        .vip_stats_id(&VipId::tcp(vip4_allports(), 443))
        .unwrap();
    let any_id = fx.lb.vip_stats_id(&VipId::tcp(vip4_allports(), 0)).unwrap();
    let mut cases = Vec::new();
    let mut any_reals = HashSet::new();
    for i in 0..20u16 {
        let sport = 20_000 + i;
        // Exact port 443 wins over the all-ports entry: its only real is reals4()[3].
        cases.push(Case::forward(
            format!("TCP :443 from :{sport} -> exact entry"),
            tcp(client4(), sport, vip4_allports(), 443, true),
            r4[3],
            Counter::NewFlow,
        ));
        let port = 1 + i * 3119;
        let c = model_case(
            &fx,
            &format!("TCP :{port} -> all-ports entry"),
            tcp(client4(), sport, vip4_allports(), port, true),
            Counter::NewFlow,
        );
        if let Expect::Forward { real, .. } = c.expect {
            assert!(
                real == r4[0] || real == r4[1],
                "all-ports VIP has reals 0 and 1, model says {real}"
            );
            any_reals.insert(real);
        }
        cases.push(c);
    }
    cases.push(Case::pass(
        "UDP to the all-ports TCP address: no UDP VIP",
        udp(client4(), 1, vip4_allports(), 443),
        Counter::PassNotVip,
    ));
    fx.run_table(&cases);
    assert_eq!(any_reals.len(), 2, "both all-ports reals used");
    assert_eq!(fx.dp.vip_stats(exact_id).unwrap().packets, 20);
    assert_eq!(fx.dp.vip_stats(any_id).unwrap().packets, 20);
}

#[test]
fn traffic_that_is_not_ours_passes_untouched() {
    let mut fx = Fixture::standard();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 10, 0, 0, 10,
    ]);
    let mut vlan = tcp(client4(), 1, vip4(), 80, true);
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 1, 0x88, 0xcc];
    lldp.extend_from_slice(&[0; 32]);
    let mut gre = tcp(client4(), 1, vip4(), 80, true);
    gre[23] = 47;
    fix_ipv4_checksum(&mut gre);
    let cases = vec![
        Case::pass(
            "IPv4 TCP to another address",
            tcp(client4(), 1, other4(), 80, true),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv6 TCP to another address",
            tcp(client6(), 1, other6(), 80, true),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv4 UDP to another address",
            udp(client4(), 1, other4(), 53),
            Counter::PassNotVip,
        ),
        Case::pass("ARP request", arp, Counter::PassNotIp),
        Case::pass("VLAN-tagged frame", vlan, Counter::PassNotIp),
        Case::pass("LLDP", lldp, Counter::PassNotIp),
        Case::pass("GRE to a VIP address", gre, Counter::PassNotVip),
        Case::pass(
            "VIP address, TCP port without VIP",
            tcp(client4(), 1, vip4(), 81, true),
            Counter::PassNotVip,
        ),
        Case::pass(
            "VIP address, UDP port without VIP",
            udp(client4(), 1, vip4(), 80),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv6 VIP address, TCP port without VIP",
            tcp(client6(), 1, vip6(), 443, true),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv6 VIP address, UDP port without VIP",
            udp(client6(), 1, vip6(), 54),
            Counter::PassNotVip,
        ),
        Case::pass(
            "ICMP echo to another address",
            icmp_echo(client4(), other4(), 1, 1, 8),
            Counter::PassNotVip,
        ),
        Case::pass(
            "ICMP redirect to a VIP (not handled)",
            icmp_raw(client4(), vip4(), 5, 1, [1, 2, 3, 4], &[0; 28]),
            Counter::PassNotVip,
        ),
        Case::pass(
            "ICMPv6 neighbour solicitation to a VIP (for the stack)",
            icmp_raw(client6(), vip6(), 135, 0, [0; 4], &[0; 16]),
            Counter::PassNotVip,
        ),
    ];
    fx.run_table(&cases);
}

/// Learns `n` TCP flows to `vip:80` from `client` and returns (frame maker, flow, real).
fn learn_flows(
    fx: &mut Fixture,
    client: IpAddr,
    vip: IpAddr,
    n: u16,
) -> Vec<(u16, FlowKey, IpAddr)> {
    let mut out = Vec::new();
    for i in 0..n {
        let sport = 30_000 + i;
        let f = tcp(client, sport, vip, 80, true);
        let c = model_case(fx, &format!("learn :{sport}"), f.clone(), Counter::NewFlow);
        let Expect::Forward { real, .. } = c.expect else {
            unreachable!()
        };
        fx.run_case(&c);
        out.push((sport, flow_of(&f), real));
    }
    out
}

#[test]
fn established_flows_keep_their_real_when_backends_change_and_syn_repicks() {
    for (client, vip, reals) in [(client4(), vip4(), reals4()), (client6(), vip6(), reals6())] {
        let mut fx = Fixture::standard();
        let vid = VipId::tcp(vip, 80);
        let learned = learn_flows(&mut fx, client, vip, 200);
        // A fifth backend joins: Maglev moves about a fifth of the slots to it.
        fx.update_vip(vid, &backends(&reals[0..5]));
        let mut moved = 0;
        for &(sport, flow, old_real) in &learned {
            let new_pick = fx.model_real(&flow);
            // Established (ACK): the connection table wins over the new ring.
            let ack = tcp(client, sport, vip, 80, false);
            fx.run_case(&Case::forward(
                format!("{vip} ACK :{sport} keeps {old_real}"),
                ack.clone(),
                old_real,
                Counter::ConnHit,
            ));
            if new_pick != old_real {
                moved += 1;
                // A SYN starts over: the ring decides, and the table follows.
                let syn = tcp(client, sport, vip, 80, true);
                fx.run_case(&Case::forward(
                    format!("{vip} SYN :{sport} re-picks {new_pick}"),
                    syn,
                    new_pick,
                    Counter::NewFlow,
                ));
                fx.run_case(&Case::forward(
                    format!("{vip} ACK :{sport} now on {new_pick}"),
                    ack,
                    new_pick,
                    Counter::ConnHit,
                ));
            }
        }
        assert!(
            moved > 10 && moved < 100,
            "{moved} of 200 flows would move to the new backend"
        );
        // New flows follow the new ring, including to the new backend.
        let mut to_new = 0;
        for i in 0..200u16 {
            let f = tcp(client, 50_000 + i, vip, 80, false);
            let c = model_case(&fx, "new flow after the change", f, Counter::NewFlow);
            if matches!(c.expect, Expect::Forward { real, .. } if real == reals[4]) {
                to_new += 1;
            }
            fx.run_case(&c);
        }
        assert!(
            to_new > 10,
            "only {to_new} new flows reached the new backend"
        );
    }
}

#[test]
fn drained_backend_keeps_established_flows_but_gets_no_new_ones() {
    for (client, vip, reals) in [(client4(), vip4(), reals4()), (client6(), vip6(), reals6())] {
        let mut fx = Fixture::standard();
        let vid = VipId::tcp(vip, 80);
        let learned = learn_flows(&mut fx, client, vip, 120);
        let drained = reals[1];
        let on_drained: Vec<_> = learned.iter().filter(|l| l.2 == drained).collect();
        assert!(
            on_drained.len() > 10,
            "sample has {} flows on the drained real",
            on_drained.len()
        );
        let mut bs = backends(&reals[0..4]);
        bs[1].weight = 0;
        fx.update_vip(vid, &bs);
        assert!(
            fx.lb.real_id(&drained).is_some(),
            "a drained real keeps its slot"
        );
        for &&(sport, _, real) in &on_drained {
            let ack = tcp(client, sport, vip, 80, false);
            fx.run_case(&Case::forward(
                format!("established :{sport} stays on drained {real}"),
                ack,
                real,
                Counter::ConnHit,
            ));
        }
        for i in 0..300u16 {
            let f = tcp(client, 10_000 + i, vip, 80, i % 2 == 0);
            let c = model_case(
                &fx,
                &format!("new flow :{}", 10_000 + i),
                f,
                Counter::NewFlow,
            );
            let Expect::Forward { real, .. } = c.expect else {
                unreachable!()
            };
            assert_ne!(real, drained, "model gives a new flow to the drained real");
            fx.run_case(&c);
        }
        // A SYN on a flow of the drained real moves it away.
        let &&(sport, flow, _) = on_drained.first().unwrap();
        let to = fx.model_real(&flow);
        assert_ne!(to, drained);
        fx.run_case(&Case::forward(
            "SYN leaves the drained real",
            tcp(client, sport, vip, 80, true),
            to,
            Counter::NewFlow,
        ));
    }
}

#[test]
fn flows_of_a_removed_real_are_repicked_never_sent_to_it() {
    let mut fx = Fixture::new();
    let reals = reals4();
    let vid = VipId::tcp(vip4(), 80);
    fx.update_vip(vid, &backends(&reals[0..4]));
    let learned = learn_flows(&mut fx, client4(), vip4(), 120);
    let gone = reals[2];
    let gone_id = fx.lb.real_id(&gone).unwrap();
    fx.update_vip(vid, &backends(&[reals[0], reals[1], reals[3]]));
    assert!(
        fx.lb.real_id(&gone).is_none(),
        "the removed real is retired"
    );
    // A new real takes the freed slot (new generation): old entries must not reach it.
    fx.update_vip(VipId::udp(vip4(), 53), &backends(&[reals[5]]));
    assert_eq!(fx.lb.real_id(&reals[5]), Some(gone_id), "slot reused");
    let mut checked = 0;
    for &(sport, flow, real) in &learned {
        let ack = tcp(client4(), sport, vip4(), 80, false);
        if real == gone {
            let to = fx.model_real(&flow);
            assert!(to != gone && to != reals[5]);
            fx.run_case(&Case::forward(
                format!(":{sport} left {gone}, re-picked"),
                ack,
                to,
                Counter::NewFlow,
            ));
            checked += 1;
        } else {
            fx.run_case(&Case::forward(
                format!(":{sport} keeps {real}"),
                ack,
                real,
                Counter::ConnHit,
            ));
        }
    }
    assert!(checked > 10, "{checked} flows were on the removed real");
}

#[test]
fn removed_vip_stops_forwarding() {
    let mut fx = Fixture::standard();
    let f = tcp(client4(), 4242, vip4(), 80, true);
    let c = model_case(&fx, "learn", f, Counter::NewFlow);
    fx.run_case(&c);
    fx.remove_vip(&VipId::tcp(vip4(), 80));
    // The address still carries UDP 53: the packet is parsed, its connection entry names
    // a dead VIP generation, and no VIP matches.
    fx.run_case(&Case::pass(
        "established flow of a removed VIP",
        tcp(client4(), 4242, vip4(), 80, false),
        Counter::PassNotVip,
    ));
    fx.remove_vip(&VipId::udp(vip4(), 53));
    fx.run_case(&Case::pass(
        "address without VIPs",
        udp(client4(), 4242, vip4(), 53),
        Counter::PassNotVip,
    ));
}

#[test]
fn vips_without_usable_reals_drop() {
    let mut fx = Fixture::standard();
    fx.run_table(&[
        Case::drop(
            "VIP whose only backend is drained",
            tcp(client4(), 1, vip4_empty(), 80, true),
            Counter::DropNoReal,
        ),
        Case::drop(
            "IPv6 VIP with an IPv4 real (no IPv6-in-IPv4)",
            tcp(client6(), 1, vip6_v4real(), 80, true),
            Counter::DropNoReal,
        ),
    ]);
}

#[test]
fn unconfigured_datapath_passes_everything() {
    let mut fx = Fixture::standard();
    let frames = [
        tcp(client4(), 1, vip4(), 80, true),
        tcp(client6(), 1, vip6(), 80, false),
        udp(client4(), 1, vip4(), 53),
        icmp_echo(client4(), vip4(), 1, 1, 8),
        icmp_echo(client6(), vip6(), 1, 1, 8),
        tcp_sized(client4(), 1, vip4(), 80, 1490),
    ];
    // Mark 1 points at a live real: even the fast path is off.
    let entry = fx.mark_entry(&VipId::tcp(vip4(), 80), &reals4()[0]);
    fx.dp.set_mark(1, &entry).unwrap();
    for cfg in [LbConfigKind::Zeroed, LbConfigKind::FlagsWithoutEnabled] {
        let c = match cfg {
            LbConfigKind::Zeroed => Default::default(),
            LbConfigKind::FlagsWithoutEnabled => {
                let mut c = test_config();
                c.flags &= !CFG_F_ENABLED;
                c
            }
        };
        fx.set_config(c);
        for (i, f) in frames.iter().enumerate() {
            fx.run_case(&Case::pass(
                format!("{cfg:?} frame {i}"),
                f.clone(),
                Counter::PassDisabled,
            ));
            fx.run_case(
                &Case::pass(
                    format!("{cfg:?} frame {i} marked"),
                    f.clone(),
                    Counter::PassDisabled,
                )
                .with_mark(1),
            );
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum LbConfigKind {
    Zeroed,
    FlagsWithoutEnabled,
}

#[test]
fn vip_and_real_stats_and_path_counters_add_up() {
    let mut fx = Fixture::standard();
    let tcp_vip = VipId::tcp(vip4(), 80);
    let udp_vip = VipId::udp(vip6(), 53);
    let tcp_id = fx.lb.vip_stats_id(&tcp_vip).unwrap();
    let udp_id = fx.lb.vip_stats_id(&udp_vip).unwrap();
    let start = fx.counters();
    let mut per_real: std::collections::HashMap<IpAddr, (u64, u64)> = Default::default();
    let (mut tcp_pk, mut tcp_by, mut udp_pk, mut udp_by) = (0u64, 0u64, 0u64, 0u64);
    let mut runs = 0u64;
    for i in 0..50u16 {
        for syn in [true, false, false] {
            let f = tcp(client4(), 9000 + i, vip4(), 80, syn);
            let r = fx.model_real(&flow_of(&f));
            fx.run_case(&Case::forward(
                "tcp",
                f.clone(),
                r,
                if syn {
                    Counter::NewFlow
                } else {
                    Counter::ConnHit
                },
            ));
            tcp_pk += 1;
            tcp_by += f.len() as u64;
            let e = per_real.entry(r).or_default();
            e.0 += 1;
            e.1 += f.len() as u64;
            runs += 1;
        }
        let f = udp(client6(), 9000 + i, vip6(), 53)
            .into_iter()
            .chain([0u8; 3])
            .collect::<Vec<u8>>();
        let r = fx.model_real(&flow_of(&f));
        fx.run_case(&Case::forward(
            "udp6 padded",
            f.clone(),
            r,
            Counter::NewFlow,
        ));
        udp_pk += 1;
        udp_by += f.len() as u64;
        let e = per_real.entry(r).or_default();
        e.0 += 1;
        e.1 += f.len() as u64;
        runs += 1;
        fx.run_case(&Case::pass(
            "other",
            tcp(client4(), 9000 + i, other4(), 80, true),
            Counter::PassNotVip,
        ));
        fx.run_case(&Case::drop(
            "fragment",
            with_frag(&tcp(client4(), 1, vip4(), 80, true), 0x2000),
            Counter::DropFragment,
        ));
        runs += 2;
    }
    let s = fx.dp.vip_stats(tcp_id).unwrap();
    assert_eq!(
        (s.packets, s.bytes),
        (tcp_pk, tcp_by),
        "TCP VIP stats (packets, bytes as received)"
    );
    let s = fx.dp.vip_stats(udp_id).unwrap();
    assert_eq!((s.packets, s.bytes), (udp_pk, udp_by), "UDP VIP stats");
    for (addr, (pk, by)) in &per_real {
        let id = fx.lb.real_id(addr).unwrap();
        let s = fx.dp.real_stats(id).unwrap();
        assert_eq!((s.packets, s.bytes), (*pk, *by), "real {addr} stats");
    }
    let d = fx.counters().since(&start);
    assert_eq!(d.get(Counter::NewFlow), 100);
    assert_eq!(d.get(Counter::ConnHit), 100);
    assert_eq!(d.get(Counter::PassNotVip), 50);
    assert_eq!(d.get(Counter::DropFragment), 50);
    let total: u64 = exits(&d).iter().map(|e| e.1).sum();
    assert_eq!(total, runs, "every run counted exactly once");
    let fwd = d.get(Counter::NewFlow) + d.get(Counter::ConnHit);
    assert_eq!(fwd, tcp_pk + udp_pk);
    // An unused VIP's stats stay at zero.
    let idle = fx.lb.vip_stats_id(&VipId::tcp(vip6(), 80)).unwrap();
    assert_eq!(fx.dp.vip_stats(idle).unwrap().packets, 0);
}

#[test]
fn weights_and_single_backend() {
    // A VIP with one real sends every flow there; changing to weights 3:1 follows the ring.
    let mut fx = Fixture::new();
    let r = reals4();
    let vid = VipId::tcp(vip4(), 80);
    fx.update_vip(
        vid,
        &[Backend {
            addr: r[0],
            weight: 1,
        }],
    );
    for i in 0..30u16 {
        fx.run_case(&Case::forward(
            "single real",
            tcp(client4(), i + 1, vip4(), 80, true),
            r[0],
            Counter::NewFlow,
        ));
    }
    fx.update_vip(
        vid,
        &[
            Backend {
                addr: r[0],
                weight: 3,
            },
            Backend {
                addr: r[1],
                weight: 1,
            },
        ],
    );
    let mut n1 = 0;
    for i in 0..400u16 {
        let f = tcp(client4(), 2000 + i, vip4(), 80, true);
        let c = model_case(&fx, "weighted", f, Counter::NewFlow);
        if matches!(c.expect, Expect::Forward { real, .. } if real == r[1]) {
            n1 += 1;
        }
        fx.run_case(&c);
    }
    assert!(
        (50..150).contains(&n1),
        "weight 1 of 4 got {n1} of 400 flows"
    );
}

/// The output checks must bite: every single-bit corruption of a correct output is
/// rejected, except in the one field the checks deliberately leave free (the IPv6 flow
/// label).
#[test]
fn output_checks_reject_every_corruption() {
    let mut fx = Fixture::standard();
    for f in [
        set_tos(tcp(client4(), 1234, vip4(), 80, true), 0xb8),
        set_tos(udp(client6(), 1234, vip6(), 53), 0x2e),
        tcp(client4(), 1234, vip4_v6reals(), 80, true),
    ] {
        let p = parse_l3l4(&f).unwrap();
        let real = fx.model_real(&p.flow());
        let r = fx.run(&f, None);
        check_encap(&fx.cfg, &f, &r.frame, real, p.src, p.sport).expect("correct output");
        let outer_v6 = real.is_ipv6();
        for pos in 0..r.frame.len() {
            for bit in [0x01u8, 0x10, 0x80] {
                // Flow label (low nibble of byte 15, bytes 16 and 17) is left free; the
                // IPv4 identification is free too but covered by the header checksum.
                let free = outer_v6 && ((pos == 15 && bit < 0x10) || pos == 16 || pos == 17);
                let mut bad = r.frame.clone();
                bad[pos] ^= bit;
                let res = check_encap(&fx.cfg, &f, &bad, real, p.src, p.sport);
                assert_eq!(res.is_ok(), free, "byte {pos} bit {bit:#04x}: {res:?}");
            }
        }
        // Wrong real, wrong client port, one byte missing or extra.
        let other = if outer_v6 { reals6()[5] } else { reals4()[5] };
        assert!(check_encap(&fx.cfg, &f, &r.frame, other, p.src, p.sport).is_err());
        assert!(check_encap(&fx.cfg, &f, &r.frame, real, p.src, p.sport + 1).is_err());
        assert!(
            check_encap(
                &fx.cfg,
                &f,
                &r.frame[..r.frame.len() - 1],
                real,
                p.src,
                p.sport
            )
            .is_err()
        );
        let mut longer = r.frame.clone();
        longer.push(0);
        assert!(check_encap(&fx.cfg, &f, &longer, real, p.src, p.sport).is_err());
    }
    // Echo replies and too-big errors: checksum, type, quote and MTU corruptions.
    let e = icmp_echo(client4(), vip4(), 1, 2, 10);
    let r = fx.run(&e, None);
    check_echo_reply(&e, &r.frame).unwrap();
    for pos in [22usize, 24, 26, 34, 36, 40, 47] {
        let mut bad = r.frame.clone();
        bad[pos] ^= 0x01;
        assert!(check_echo_reply(&e, &bad).is_err(), "echo byte {pos}");
    }
    let big = tcp_sized(client6(), 1, vip6(), 80, 1600);
    let r = fx.run(&big, None);
    check_too_big(&big, &r.frame, 1460).unwrap();
    assert!(check_too_big(&big, &r.frame, 1461).is_err());
    for pos in [22usize, 23, 38, 54, 56, 57, 61, 62, 100, 109] {
        let mut bad = r.frame.clone();
        bad[pos] ^= 0x01;
        assert!(
            check_too_big(&big, &bad, 1460).is_err(),
            "too-big byte {pos}"
        );
    }
}
