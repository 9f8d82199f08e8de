//! The TC balancer (`--mark-delivery skb-mark`): the same maps and paths as the XDP one, the
//! mark read from `skb->mark` (low 16 bits, as mlx5 delivers a flower rule's flow tag).
//! Runs are `BPF_PROG_TEST_RUN` of the sched_cls program with the mark in the `__sk_buff`
//! context; verdicts are compared in XDP terms (`tc_as_xdp`: TC_ACT_UNSPEC = pass,
//! TC_ACT_SHOT = drop, TC_ACT_REDIRECT to the same device = transmit).
//!
//! Every XDP table also runs against the TC program with `MARKLB_DATAPATH_HOOK=tc`; the
//! tests here cover what is TC's own (the mark's source and mask, the emulated NIC's TC
//! program) and check that both hooks give the same bytes for the same input.

use std::net::IpAddr;

use marklb_agent::{
    datapath::{
        Prog, TcProg,
        testrun::{TC_ACT_REDIRECT, TC_ACT_UNSPEC, XDP_TX},
    },
    vip::VipId,
};
use marklb_common::{Counter, MarkEntry};
use marklb_tests::datapath_fixture::*;

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

fn tc_fixture() -> Fixture {
    let mut fx = Fixture::standard();
    fx.hook = Hook::Tc;
    fx
}

/// The frame of `proto` (TCP or UDP) for a family: `first` is a SYN for TCP.
fn frame(udp_flow: bool, fam: &Fam, sport: u16, first: bool) -> Vec<u8> {
    if udp_flow {
        let port = if fam.vip == vip4_v6reals() { 5353 } else { 53 };
        udp(fam.client, sport, fam.vip, port)
    } else {
        tcp(fam.client, sport, fam.vip, 80, first)
    }
}

fn vip_of(udp_flow: bool, fam: &Fam) -> VipId {
    if udp_flow {
        let port = if fam.vip == vip4_v6reals() { 0 } else { 53 };
        VipId::udp(fam.vip, port)
    } else {
        VipId::tcp(fam.vip, 80)
    }
}

/// Mark hit, miss (no entry), unknown (empty entry) and stale marks, for IPv4, IPv6 and
/// IPv4-in-IPv6, TCP and UDP: the hit gives the normal path's bytes exactly; the others take
/// the normal path and give the same bytes.
#[test]
fn skb_mark_fast_path_gives_the_normal_paths_bytes() {
    let mut fx = tc_fixture();
    let mut mark = 100u32;
    for fam in fams() {
        for udp_flow in [false, true] {
            let what = format!("{} {}", fam.name, if udp_flow { "UDP" } else { "TCP" });
            let vid = vip_of(udp_flow, &fam);
            let sport = 40_000 + mark as u16;
            let first = frame(udp_flow, &fam, sport, true);
            let next = set_tos(frame(udp_flow, &fam, sport, false), 0x28);
            let flow = parse_l3l4(&next).unwrap().flow();
            let real = fx.model_real(&flow);
            fx.run_case(&Case::forward(
                format!("{what}: first packet"),
                first,
                real,
                Counter::NewFlow,
            ));
            let normal = fx
                .run_case(&Case::forward(
                    format!("{what}: established"),
                    next.clone(),
                    real,
                    Counter::ConnHit,
                ))
                .frame;
            mark += 1;
            fx.dp.set_mark(mark, &fx.mark_entry(&vid, &real)).unwrap();
            let hit = fx.run_case(
                &Case::forward(
                    format!("{what}: mark hit"),
                    next.clone(),
                    real,
                    Counter::MarkHit,
                )
                .with_mark(mark),
            );
            assert_eq!(hit.frame, normal, "{what}: marked output != normal path");
            // mlx5 leaves the flow tag in the low 16 bits; the rest of skb->mark is not ours.
            let high = fx.run_case(
                &Case::forward(
                    format!("{what}: mark hit, high bits set"),
                    next.clone(),
                    real,
                    Counter::MarkHit,
                )
                .with_mark(0x5a5a_0000 | mark),
            );
            assert_eq!(high.frame, normal);
            // Miss: a mark with no entry; unknown: an entry without a real; both fall back.
            fx.dp.set_mark(mark + 5000, &MarkEntry::default()).unwrap();
            for (m, counter) in [
                (mark + 4000, Counter::MarkMiss),
                (mark + 5000, Counter::MarkMiss),
            ] {
                let before = fx.counters();
                let r = fx.run_case(
                    &Case::forward(
                        format!("{what}: mark {m}"),
                        next.clone(),
                        real,
                        Counter::ConnHit,
                    )
                    .with_mark(m),
                );
                assert_eq!(r.frame, normal);
                assert_eq!(fx.counters().since(&before).get(counter), 1, "{what}: {m}");
            }
            // Stale: the real's generation moved on (it left and the slot was reused).
            let mut stale = fx.mark_entry(&vid, &real);
            stale.real_gen = stale.real_gen.wrapping_add(1);
            fx.dp.set_mark(mark + 6000, &stale).unwrap();
            let before = fx.counters();
            let r = fx.run_case(
                &Case::forward(
                    format!("{what}: stale mark"),
                    next.clone(),
                    real,
                    Counter::ConnHit,
                )
                .with_mark(mark + 6000),
            );
            assert_eq!(r.frame, normal);
            assert_eq!(fx.counters().since(&before).get(Counter::MarkStale), 1);
        }
    }
}

/// Not a VIP, not IP, and malformed or unsupported VIP packets, with and without a valid
/// mark: passed untouched (TC_ACT_UNSPEC) or dropped, never forwarded.
#[test]
fn not_ours_passes_untouched_and_malformed_is_never_forwarded() {
    let mut fx = tc_fixture();
    let real = reals4()[0];
    fx.dp
        .set_mark(7, &fx.mark_entry(&VipId::tcp(vip4(), 80), &real))
        .unwrap();
    let real6 = reals6()[0];
    fx.dp
        .set_mark(8, &fx.mark_entry(&VipId::tcp(vip6(), 80), &real6))
        .unwrap();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let mut truncated4 = tcp(client4(), 1, vip4(), 80, false);
    truncated4.truncate(truncated4.len() - 1);
    let mut truncated6 = tcp(client6(), 1, vip6(), 80, false);
    truncated6.truncate(truncated6.len() - 1);
    // Unmarked: a NIC marks only the flows the agent asked for, all of them to VIPs (a mark
    // vouches for its flow, so a marked packet is not checked against the VIPs again).
    fx.run_table(&[
        Case::pass(
            "IPv4 not a VIP",
            tcp(client4(), 1, other4(), 80, false),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv6 not a VIP",
            tcp(client6(), 1, other6(), 80, false),
            Counter::PassNotVip,
        ),
        Case::pass(
            "UDP not a VIP",
            udp(client4(), 1, other4(), 53),
            Counter::PassNotVip,
        ),
        Case::pass(
            "UDP6 not a VIP",
            udp(client6(), 1, other6(), 53),
            Counter::PassNotVip,
        ),
    ]);
    for mark in [None, Some(7), Some(8)] {
        let cases = [
            Case::pass("ARP", arp.clone(), Counter::PassNotIp),
            Case::drop(
                "IPv4 options",
                with_ipv4_options(&tcp(client4(), 1, vip4(), 80, false), 2),
                Counter::DropIpOptions,
            ),
            Case::drop(
                "IPv4 fragment",
                with_frag(&udp(client4(), 1, vip4(), 53), 0x2000),
                Counter::DropFragment,
            ),
            Case::drop(
                "IPv6 fragment header",
                with_ipv6_ext(&tcp(client6(), 1, vip6(), 80, false), 44),
                Counter::DropFragment,
            ),
            Case::drop("IPv4 truncated", truncated4.clone(), Counter::DropMalformed),
            Case::drop("IPv6 truncated", truncated6.clone(), Counter::DropMalformed),
        ];
        for mut c in cases {
            c.mark = mark;
            c.desc = format!("{} (mark {mark:?})", c.desc);
            fx.run_case(&c);
        }
    }
    // What goes on to the stack leaves its flow tag behind (the stack's own mark bits, e.g.
    // kube-proxy's 0x4000 masquerade bit, must not be set by a NIC's tag); the rest of
    // skb->mark is kept.
    for (frame, mark) in [
        (arp.clone(), 0x5a5a_4007u32),
        (arp.clone(), 0),
        (with_frag(&udp(client4(), 1, other4(), 53), 0x2000), 0xc000),
    ] {
        let r = fx.dp.test_run_tc(TcProg::Balancer, &frame, mark).unwrap();
        assert_eq!(r.action, TC_ACT_UNSPEC);
        assert_eq!(r.mark, mark & 0xffff_0000, "mark {mark:#x} after a pass");
        assert_eq!(r.frame, frame);
    }
    // Every truncation of VIP frames, marked or not: pass or drop, never transmitted.
    for full in [
        tcp(client4(), 9, vip4(), 80, false),
        tcp(client6(), 9, vip6(), 80, false),
        udp(client4(), 9, vip4(), 53),
        udp(client6(), 9, vip6(), 53),
    ] {
        let mark = if full[12..14] == [0x86, 0xdd] { 8 } else { 7 };
        let mut refused = Vec::new();
        for len in 14..full.len() {
            for m in [None, Some(mark)] {
                // The kernel refuses skb test runs of frames too short for their network
                // header; those never reach a TC program.
                let Ok(r) = fx.try_run(&full[..len], m) else {
                    if !refused.contains(&len) {
                        refused.push(len);
                    }
                    continue;
                };
                assert_ne!(r.action, XDP_TX, "truncated to {len} (mark {m:?}) was sent");
                if r.action != 1 {
                    assert_eq!(r.frame, &full[..len], "passed frame modified");
                }
            }
        }
        // Up to the whole IPv4 / IPv6 header: what the skb test run requires.
        let ip_end = if mark == 8 { 14 + 40 } else { 14 + 20 };
        assert_eq!(refused, (14..ip_end).collect::<Vec<_>>(), "refused lengths");
    }
}

/// The same input through the XDP and the TC program (same maps) gives the same verdict and
/// the same bytes: forwarding of every family and protocol, ICMP echo and too-big, passes
/// and drops.
#[test]
fn xdp_and_tc_programs_agree_byte_for_byte() {
    let mut fx = Fixture::standard();
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    for fam in fams() {
        for udp_flow in [false, true] {
            for sport in [1000u16, 2000, 3000] {
                frames.push((
                    format!("{} udp={udp_flow} {sport}", fam.name),
                    frame(udp_flow, &fam, sport, true),
                ));
            }
        }
    }
    frames.push(("echo v4".into(), icmp_echo(client4(), vip4(), 7, 9, 33)));
    frames.push(("echo v6".into(), icmp_echo(client6(), vip6(), 7, 9, 33)));
    frames.push((
        "too big v4".into(),
        tcp_sized(client4(), 1, vip4(), 80, 1481),
    ));
    frames.push((
        "too big v6".into(),
        tcp_sized(client6(), 1, vip6(), 80, 1461),
    ));
    frames.push(("not a VIP".into(), tcp(client4(), 1, other4(), 80, false)));
    frames.push((
        "options".into(),
        with_ipv4_options(&tcp(client4(), 1, vip4(), 80, false), 2),
    ));
    frames.push((
        "empty VIP".into(),
        tcp(client4(), 1, vip4_empty(), 80, true),
    ));
    for (name, f) in &frames {
        let x = fx.dp.test_run(Prog::Balancer, f, None).unwrap();
        let t = fx.dp.test_run_tc(TcProg::Balancer, f, 0).unwrap();
        assert_eq!(
            (action_name(tc_as_xdp(t.action)), hex(&t.frame)),
            (action_name(x.action), hex(&x.frame)),
            "{name}: TC differs from XDP"
        );
    }
}

/// The emulated NIC's TC program sets `skb->mark` for a known flow and hands the packet on
/// (TC_ACT_UNSPEC: the next tcx program is the balancer), leaving it untouched otherwise.
#[test]
fn emulated_nic_tc_sets_skb_mark_for_known_flows() {
    let mut fx = Fixture::standard();
    let mut nic = fx.dp.nic_flow_table().unwrap();
    let known = tcp(client6(), 555, vip6(), 80, false);
    let flow = parse_l3l4(&known).unwrap().flow();
    nic.set(&flow, 4242).unwrap();
    let r = fx.dp.test_run_tc(TcProg::EmulatedNic, &known, 0).unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC);
    assert_eq!(r.mark, 4242);
    assert_eq!(r.frame, known, "the NIC does not touch the packet");
    let before = fx.counters();
    let other = tcp(client6(), 556, vip6(), 80, false);
    let r = fx.dp.test_run_tc(TcProg::EmulatedNic, &other, 0).unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, 0));
    assert_eq!(fx.counters().since(&before).get(Counter::NicUnmarked), 1);
    let hits = nic.rules().unwrap();
    assert_eq!(hits.iter().find(|(k, _)| *k == flow).unwrap().1.hits, 1);
    // The balancer behind it takes the mark: a redirect to the marked real.
    let real = reals6()[2];
    fx.dp
        .set_mark(4242, &fx.mark_entry(&VipId::tcp(vip6(), 80), &real))
        .unwrap();
    let b = fx.dp.test_run_tc(TcProg::Balancer, &known, 4242).unwrap();
    assert_eq!(b.action, TC_ACT_REDIRECT);
    check_encap(&fx.cfg, &known, &b.frame, real, client6(), 555).unwrap();
}

/// Randomly mutated VIP frames (bytes, bits, lengths, truncations, trailing garbage, marks):
/// the TC program gives the XDP program's verdict and bytes for every frame the kernel lets
/// a TC program see (skb test runs refuse frames shorter than their IP header).
#[test]
fn mutated_frames_get_the_same_verdict_and_bytes_from_both_hooks() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    fx.dp
        .set_mark(1, &fx.mark_entry(&VipId::tcp(vip4(), 80), &reals4()[1]))
        .unwrap();
    fx.dp
        .set_mark(2, &fx.mark_entry(&VipId::udp(vip6(), 53), &reals6()[2]))
        .unwrap();
    let bases = [
        tcp(client4(), 1111, vip4(), 80, false),
        tcp(client6(), 1111, vip6(), 80, true),
        udp(client4(), 2222, vip4(), 53),
        udp(client6(), 2222, vip6(), 53),
        udp(client4(), 2222, vip4_v6reals(), 9),
        icmp_echo(client4(), vip4(), 1, 2, 12),
    ];
    let (mut compared, mut refused) = (0, 0);
    for i in 0..3000 {
        let mut f = bases[i % bases.len()].clone();
        for _ in 0..rng.random_range(1..=3) {
            let hot = f.len().min(80);
            match rng.random_range(0..5) {
                0 => {
                    let at = rng.random_range(0..hot);
                    f[at] = rng.random();
                }
                1 => {
                    let at = rng.random_range(0..hot);
                    f[at] ^= 1 << rng.random_range(0..8);
                }
                2 => {
                    let n = rng.random_range(14..=f.len());
                    f.truncate(n);
                }
                3 => f.extend((0..rng.random_range(1..24)).map(|_| rng.random::<u8>())),
                _ => {
                    let off = [16usize, 18][rng.random_range(0..2)];
                    if off + 2 <= f.len() {
                        let v = rng.random_range(0..(f.len() as u16 + 16));
                        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
        let mark = [0u32, 0, 1, 2, 3][rng.random_range(0..5)];
        let meta = (mark != 0).then_some(mark);
        let x = fx.dp.test_run(Prog::Balancer, &f, meta).unwrap();
        let Ok(t) = fx.dp.test_run_tc(TcProg::Balancer, &f, mark) else {
            refused += 1;
            continue;
        };
        compared += 1;
        assert_eq!(
            (action_name(tc_as_xdp(t.action)), hex(&t.frame)),
            (action_name(x.action), hex(&x.frame)),
            "seed {seed}, frame {i} (mark {mark}): TC differs from XDP\n  input {}",
            hex(&f)
        );
    }
    println!("{compared} frames compared, {refused} refused by the kernel's skb test run");
    assert!(compared > 2000, "{compared} compared");
}
