//! The flow-mark fast path and the emulated NIC: marked output must be byte-identical to
//! the normal path's output for the same established flow; stale, unknown or out-of-range
//! marks fall back to the normal path and never reach a real that left.

use std::net::IpAddr;

use marklb_agent::vip::VipId;
use marklb_common::{Counter, MarkEntry};
use marklb_tests::datapath_fixture::*;

/// The normal path's output for an established flow (after a SYN taught the table).
fn normal_output(fx: &mut Fixture, syn: &[u8], ack: &[u8]) -> (IpAddr, Vec<u8>) {
    let flow = parse_l3l4(ack).unwrap().flow();
    let real = fx.model_real(&flow);
    fx.run_case(&Case::forward("SYN", syn.to_vec(), real, Counter::NewFlow));
    let r = fx.run_case(&Case::forward(
        "ACK, established",
        ack.to_vec(),
        real,
        Counter::ConnHit,
    ));
    (real, r.frame)
}

struct Fam {
    name: &'static str,
    client: IpAddr,
    vip: IpAddr,
}

fn fams() -> [Fam; 3] {
    [
        Fam {
            name: "IPv4",
            client: client4(),
            vip: vip4(),
        },
        Fam {
            name: "IPv6",
            client: client6(),
            vip: vip6(),
        },
        Fam {
            name: "IPv4-in-IPv6",
            client: client4(),
            vip: vip4_v6reals(),
        },
    ]
}

#[test]
fn per_flow_mark_output_is_identical_to_the_normal_path() {
    let mut fx = Fixture::standard();
    for fam in fams() {
        let vid = VipId::tcp(fam.vip, 80);
        let vip_id = fx.lb.vip_stats_id(&vid).unwrap();
        for i in 0..10u16 {
            let sport = 33_000 + i;
            let syn = tcp(fam.client, sport, fam.vip, 80, true);
            let ack = set_tos(tcp(fam.client, sport, fam.vip, 80, false), 0x28);
            let (real, want) = normal_output(&mut fx, &syn, &ack);
            let conn = fx
                .dp
                .conn(&parse_l3l4(&ack).unwrap().flow())
                .expect("learned");
            let mark = 1000 + i as u32;
            fx.dp
                .set_mark(
                    mark,
                    &MarkEntry {
                        real_id: conn.real_id,
                        real_gen: conn.real_gen,
                        vip_id,
                        _pad: 0,
                    },
                )
                .unwrap();
            let real_id = fx.lb.real_id(&real).unwrap();
            let vip_before = fx.dp.vip_stats(vip_id).unwrap();
            let real_before = fx.dp.real_stats(real_id).unwrap();
            let r = fx.run_case(
                &Case::forward(
                    format!("{} per-flow mark {mark}", fam.name),
                    ack.clone(),
                    real,
                    Counter::MarkHit,
                )
                .with_mark(mark),
            );
            assert_eq!(
                r.frame, want,
                "{}: marked output differs from the normal path's",
                fam.name
            );
            let vs = fx.dp.vip_stats(vip_id).unwrap();
            let rs = fx.dp.real_stats(real_id).unwrap();
            assert_eq!(vs.packets, vip_before.packets + 1, "VIP counted");
            assert_eq!(vs.bytes, vip_before.bytes + ack.len() as u64);
            assert_eq!(rs.packets, real_before.packets + 1, "real counted");
        }
    }
}

#[test]
fn per_real_mark_is_shared_by_the_flows_of_a_real() {
    let mut fx = Fixture::standard();
    for fam in fams() {
        let vid = VipId::tcp(fam.vip, 80);
        // One mark per (VIP, real): 100 + real id (+ 1000 per family to keep them apart).
        let base =
            100 + 1000 * fam.vip.is_ipv6() as u32 + 2000 * (fam.vip == vip4_v6reals()) as u32;
        let mut used = std::collections::HashSet::new();
        for i in 0..24u16 {
            let sport = 44_000 + i;
            let syn = tcp(fam.client, sport, fam.vip, 80, true);
            let ack = tcp(fam.client, sport, fam.vip, 80, false)
                .into_iter()
                .chain((0..i).map(|b| b as u8))
                .collect::<Vec<_>>();
            let (real, want) = normal_output(&mut fx, &syn, &ack);
            let mark = base + fx.lb.real_id(&real).unwrap();
            fx.dp.set_mark(mark, &fx.mark_entry(&vid, &real)).unwrap();
            used.insert(mark);
            let r = fx.run_case(
                &Case::forward(
                    format!("{} per-real mark {mark}", fam.name),
                    ack,
                    real,
                    Counter::MarkHit,
                )
                .with_mark(mark),
            );
            assert_eq!(r.frame, want);
        }
        assert!(
            used.len() >= 3,
            "{}: flows spread over {} reals only",
            fam.name,
            used.len()
        );
    }
}

#[test]
fn stale_marks_fall_back_and_never_reach_the_removed_real() {
    let mut fx = Fixture::new();
    let r4 = reals4();
    let vid = VipId::tcp(vip4(), 80);
    fx.update_vip(vid, &backends(&r4[0..4]));
    // Flows on every real, each with a per-flow mark.
    let mut flows = Vec::new();
    for i in 0..40u16 {
        let sport = 12_000 + i;
        let (real, _) = normal_output(
            &mut fx,
            &tcp(client4(), sport, vip4(), 80, true),
            &tcp(client4(), sport, vip4(), 80, false),
        );
        let mark = 1 + i as u32;
        fx.dp.set_mark(mark, &fx.mark_entry(&vid, &real)).unwrap();
        flows.push((sport, real, mark));
    }
    let gone = r4[1];
    let gone_id = fx.lb.real_id(&gone).unwrap();
    assert!(flows.iter().any(|f| f.1 == gone));
    // The real leaves the VIP and is retired (its marks deliberately left in place).
    let leaving = fx.set_vip(vid, &backends(&[r4[0], r4[2], r4[3]]));
    assert_eq!(leaving.len(), 1);
    fx.lb.retire(&mut fx.dp, &leaving).unwrap();
    for &(sport, real, mark) in &flows {
        let ack = tcp(client4(), sport, vip4(), 80, false);
        let before = fx.counters();
        if real == gone {
            // MarkStale, then the normal path: the table entry is stale too -> new pick.
            let to = fx.model_real(&parse_l3l4(&ack).unwrap().flow());
            assert_ne!(to, gone);
            fx.run_case(
                &Case::forward(format!("stale mark {mark}"), ack, to, Counter::NewFlow)
                    .with_mark(mark),
            );
            let d = fx.counters().since(&before);
            assert_eq!(
                (
                    d.get(Counter::MarkStale),
                    d.get(Counter::MarkHit),
                    d.get(Counter::MarkMiss)
                ),
                (1, 0, 0)
            );
        } else {
            fx.run_case(
                &Case::forward(format!("live mark {mark}"), ack, real, Counter::MarkHit)
                    .with_mark(mark),
            );
        }
    }
    // The freed slot goes to a new real with a new generation: the old marks still point at
    // the slot, and must not reach the newcomer through the fast path.
    let newcomer = r4[5];
    fx.update_vip(VipId::udp(vip4(), 53), &backends(&[newcomer]));
    assert_eq!(fx.lb.real_id(&newcomer), Some(gone_id), "slot reused");
    for &(sport, real, mark) in flows.iter().filter(|f| f.1 == gone) {
        let ack = tcp(client4(), sport, vip4(), 80, false);
        let to = fx.model_real(&parse_l3l4(&ack).unwrap().flow());
        assert!(to != newcomer && to != real);
        let before = fx.counters();
        fx.run_case(
            &Case::forward(
                format!("old-generation mark {mark}"),
                ack,
                to,
                Counter::ConnHit,
            )
            .with_mark(mark),
        );
        assert_eq!(fx.counters().since(&before).get(Counter::MarkStale), 1);
    }
    // A generation mismatch on a live real is stale as well.
    let live = r4[0];
    let mut e = fx.mark_entry(&vid, &live);
    e.real_gen += 7;
    fx.dp.set_mark(9999, &e).unwrap();
    let (sport, real, _) = *flows.iter().find(|f| f.1 != gone).unwrap();
    let before = fx.counters();
    fx.run_case(
        &Case::forward(
            "wrong generation",
            tcp(client4(), sport, vip4(), 80, false),
            real,
            Counter::ConnHit,
        )
        .with_mark(9999),
    );
    assert_eq!(fx.counters().since(&before).get(Counter::MarkStale), 1);
}

#[test]
fn unknown_zero_and_out_of_range_marks_take_the_normal_path() {
    let mut fx = Fixture::standard();
    let vid = VipId::tcp(vip4(), 80);
    let syn = tcp(client4(), 7000, vip4(), 80, true);
    let ack = tcp(client4(), 7000, vip4(), 80, false);
    let (real, want) = normal_output(&mut fx, &syn, &ack);
    // Marks 65536 and above cannot index the table even if a real exists for the id.
    fx.dp.set_mark(65_535, &fx.mark_entry(&vid, &real)).unwrap();
    fx.dp.set_mark(5, &MarkEntry::default()).unwrap();
    fx.dp.set_mark(6, &fx.mark_entry(&vid, &real)).unwrap();
    fx.dp.clear_mark(6).unwrap();
    for (mark, miss) in [
        (0u32, 0u64),
        (5, 1),
        (6, 1),
        (77, 1),
        (65_536, 1),
        (65_536 + 65_535, 1),
        (u32::MAX, 1),
    ] {
        let before = fx.counters();
        let r = fx.run_case(
            &Case::forward(format!("mark {mark}"), ack.clone(), real, Counter::ConnHit)
                .with_mark(mark),
        );
        assert_eq!(r.frame, want);
        let d = fx.counters().since(&before);
        assert_eq!(d.get(Counter::MarkMiss), miss, "mark {mark}: MarkMiss");
        assert_eq!(d.get(Counter::MarkStale), 0);
    }
    // A new flow with an unknown mark is a new flow on the normal path.
    let f = tcp(client4(), 7001, vip4(), 80, true);
    let to = fx.model_real(&parse_l3l4(&f).unwrap().flow());
    fx.run_case(
        &Case::forward("new flow, unknown mark", f, to, Counter::NewFlow).with_mark(31_337),
    );
    // Sanity: 65535 itself is a valid mark.
    fx.run_case(&Case::forward("mark 65535", ack, real, Counter::MarkHit).with_mark(65_535));
}

#[test]
fn marked_packets_the_fast_path_cannot_take_fall_back() {
    let mut fx = Fixture::standard();
    let vid = VipId::tcp(vip4(), 80);
    let real = reals4()[0];
    fx.dp.set_mark(3, &fx.mark_entry(&vid, &real)).unwrap();
    // Too big once encapsulated: the normal path answers with ICMP (mark ignored).
    let big = tcp_sized(client4(), 1, vip4(), 80, 1481);
    let before = fx.counters();
    fx.run_case(
        &Case::new(
            "oversized, marked",
            big,
            Expect::TooBigSent { mtu: 1480 },
            Counter::IcmpTooBigSent,
        )
        .with_mark(3),
    );
    assert_eq!(fx.counters().since(&before).get(Counter::MarkHit), 0);
    // IPv4 options: not the minimal parse; the normal path drops it.
    let opt = with_ipv4_options(&tcp(client4(), 1, vip4(), 80, false), 2);
    fx.run_case(&Case::drop("IPv4 options, marked", opt, Counter::DropIpOptions).with_mark(3));
    // IP length beyond the frame.
    let mut short = tcp(client4(), 1, vip4(), 80, false);
    short.truncate(short.len() - 1);
    fx.run_case(&Case::drop("truncated, marked", short, Counter::DropMalformed).with_mark(3));
    // Not IP at all.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    fx.run_case(&Case::pass("ARP, marked", arp, Counter::PassNotIp).with_mark(3));
}

#[test]
fn emulated_nic_marks_known_flows_and_the_balancer_takes_the_fast_path() {
    let mut fx = Fixture::standard();
    fx.dp.chain_nic_to_balancer().unwrap();
    for (i, fam) in fams().iter().enumerate() {
        let vid = VipId::tcp(fam.vip, 80);
        let sport = 21_000 + i as u16;
        let syn = tcp(fam.client, sport, fam.vip, 80, true);
        let ack = tcp(fam.client, sport, fam.vip, 80, false);
        let (real, want) = normal_output(&mut fx, &syn, &ack);
        let flow = parse_l3l4(&ack).unwrap().flow();
        let mark = 500 + i as u32;
        fx.dp.set_mark(mark, &fx.mark_entry(&vid, &real)).unwrap();
        fx.dp.set_nic_flow(&flow, mark).unwrap();

        let before = fx.counters();
        let r = fx.run_nic(&ack);
        let d = fx.counters().since(&before);
        assert_eq!(r.action, 3, "{}: NIC + balancer", fam.name);
        assert_eq!(
            r.frame, want,
            "{}: NIC-marked output differs from the normal path's",
            fam.name
        );
        assert_eq!(
            (d.get(Counter::NicMarked), d.get(Counter::MarkHit)),
            (1, 1),
            "{}: {d:?}",
            fam.name
        );
        assert_eq!(d.get(Counter::ConnHit) + d.get(Counter::NewFlow), 0);
        assert_eq!(exits(&d), vec![(Counter::MarkHit, 1)]);

        // A flow without a rule: unmarked, normal path.
        let other = tcp(fam.client, sport + 100, fam.vip, 80, true);
        let to = fx.model_real(&parse_l3l4(&other).unwrap().flow());
        let before = fx.counters();
        let r = fx.run_nic(&other);
        let d = fx.counters().since(&before);
        let input = other.clone();
        check_encap(&fx.cfg, &input, &r.frame, to, fam.client, sport + 100).unwrap();
        assert_eq!(
            (
                d.get(Counter::NicUnmarked),
                d.get(Counter::NewFlow),
                d.get(Counter::MarkHit)
            ),
            (1, 1, 0)
        );

        // The rule's mark goes stale: marked by the NIC, the balancer falls back.
        fx.dp.clear_mark(mark).unwrap();
        let before = fx.counters();
        let r = fx.run_nic(&ack);
        let d = fx.counters().since(&before);
        assert_eq!(r.frame, want);
        assert_eq!(
            (
                d.get(Counter::NicMarked),
                d.get(Counter::MarkMiss),
                d.get(Counter::ConnHit)
            ),
            (1, 1, 1)
        );
    }
    // Non-VIP traffic through the NIC passes untouched.
    let f = tcp(client4(), 1, other4(), 80, true);
    let r = fx.run_nic(&f);
    assert_eq!((r.action, &r.frame), (2, &f));
}

#[test]
fn emulated_nic_without_the_balancer_passes() {
    // The tail call fails when nothing is chained: count it and pass the packet.
    let mut fx = Fixture::standard();
    let f = tcp(client4(), 1, vip4(), 80, true);
    let before = fx.counters();
    let r = fx.run_nic(&f);
    assert_eq!((r.action, &r.frame), (2, &f));
    assert_eq!(
        fx.counters().since(&before).get(Counter::NicTailCallFailed),
        1
    );
}

/// Regression: the fast path forwarded marked packets the normal path refuses (IP length
/// shorter than the transport header, fragments, IPv6 extension headers, other protocols):
/// a mark vouches for a flow, not for the packet. Found by the marked-mutation fuzzer; the
/// first inputs below were `XDP_TX`'d via `MarkHit` before `minimal_parse` checked them.
#[test]
fn marked_malformed_packets_are_left_to_the_normal_path() {
    let mut fx = Fixture::standard();
    let vid4 = VipId::tcp(vip4(), 80);
    let vid6 = VipId::tcp(vip6(), 80);
    let base4 = tcp(client4(), 61_000, vip4(), 80, true);
    let base6 = tcp(client6(), 61_000, vip6(), 80, true);
    let r4 = fx.model_real(&parse_l3l4(&base4).unwrap().flow());
    let r6 = fx.model_real(&parse_l3l4(&base6).unwrap().flow());
    fx.dp.set_mark(100, &fx.mark_entry(&vid4, &r4)).unwrap();
    fx.dp.set_mark(103, &fx.mark_entry(&vid6, &r6)).unwrap();
    let set16 = |f: &[u8], off: usize, v: u16| {
        let mut f = f.to_vec();
        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
        if off < 34 && f[12..14] == [8, 0] {
            fix_ipv4_checksum(&mut f);
        }
        f
    };
    let mut gre = base4.clone();
    gre[23] = 47;
    fix_ipv4_checksum(&mut gre);
    let cases = vec![
        // Fuzzer inputs (mark 100: IPv4 flow, mark 103: IPv6 flow).
        Case::drop(
            "fuzzer: IPv4 total length 8",
            unhex("0200000000020200000000010800450000080000400040066edcc000020a0a00000aee480050000003e8000000005002fa0055630000070a11181f262d343b424950575e656c"),
            Counter::DropMalformed,
        )
        .with_mark(100),
        Case::drop(
            "fuzzer: IPv6 routing header",
            unhex("02000000000202000000000186dd6000000000242b4020010db800000000000000000000001020010db8000f00000000000000000010ee490050000003e8000000015010fa00c5c60000030a11181f262d343b424950575e656c"),
            Counter::DropUnsupported,
        )
        .with_mark(103),
        Case::drop("IPv4 total length 34: TCP header cut", set16(&base4, 16, 34), Counter::DropMalformed).with_mark(100),
        Case::drop("IPv4 total length 20: no transport header", set16(&base4, 16, 20), Counter::DropMalformed).with_mark(100),
        Case::drop("IPv4 first fragment (MF)", with_frag(&base4, 0x2000), Counter::DropFragment).with_mark(100),
        Case::drop("IPv4 later fragment", with_frag(&base4, 0x0010), Counter::DropFragment).with_mark(100),
        Case::pass("IPv4 GRE to the VIP", gre, Counter::PassNotVip).with_mark(100),
        Case::drop("IPv6 payload 10: TCP header cut", set16(&base6, 18, 10), Counter::DropMalformed).with_mark(103),
        Case::drop("IPv6 fragment header", with_ipv6_ext(&base6, 44), Counter::DropFragment).with_mark(103),
        Case::drop("IPv6 hop-by-hop header", with_ipv6_ext(&base6, 0), Counter::DropUnsupported).with_mark(103),
        Case::drop("IPv6 destination options", with_ipv6_ext(&base6, 60), Counter::DropUnsupported).with_mark(103),
    ];
    for c in &cases {
        let before = fx.counters();
        fx.run_case(c);
        assert_eq!(
            fx.counters().since(&before).get(Counter::MarkHit),
            0,
            "[{}] took the fast path",
            c.desc
        );
    }
    // DF alone is fine for the fast path, and UDP is too.
    let df = with_frag(&tcp(client4(), 61_000, vip4(), 80, false), 0x4000);
    fx.run_case(&Case::forward("IPv4 DF, marked", df, r4, Counter::MarkHit).with_mark(100));
    let u = udp(client4(), 61_000, vip4(), 53);
    fx.run_case(&Case::forward("IPv4 UDP, marked", u, r4, Counter::MarkHit).with_mark(100));
}
