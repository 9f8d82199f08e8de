//! Malformed and unsupported input: truncations, IPv4 options, fragments, bad versions,
//! IPv6 extension headers, inconsistent lengths, and seeded random / mutated frames checked
//! against the independent model. Nothing malformed may ever be `XDP_TX`'d to a real, and
//! whatever is transmitted must be exactly the right output for the input.

use std::collections::BTreeMap;

use marklb_agent::{
    datapath::testrun::{XDP_DROP, XDP_TX},
    vip::VipId,
};
use marklb_common::{Counter, MarkEntry};
use marklb_tests::datapath_fixture::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Valid frames to a VIP of every kind the datapath handles.
fn vip_frames() -> Vec<(&'static str, Vec<u8>)> {
    let q4 = vip_reply_packet(vip4(), 80, client4(), 50_000, true, 16);
    let q6 = vip_reply_packet(vip6(), 80, client6(), 50_000, true, 16);
    vec![
        ("IPv4 TCP SYN", tcp(client4(), 50_000, vip4(), 80, true)),
        ("IPv4 TCP ACK", tcp(client4(), 50_001, vip4(), 80, false)),
        ("IPv4 UDP", udp(client4(), 50_000, vip4(), 53)),
        ("IPv6 TCP SYN", tcp(client6(), 50_000, vip6(), 80, true)),
        ("IPv6 TCP ACK", tcp(client6(), 50_001, vip6(), 80, false)),
        ("IPv6 UDP", udp(client6(), 50_000, vip6(), 53)),
        (
            "IPv4-in-IPv6 TCP",
            tcp(client4(), 50_002, vip4_v6reals(), 80, true),
        ),
        (
            "IPv4-in-IPv6 UDP",
            udp(client4(), 50_002, vip4_v6reals(), 4000),
        ),
        (
            "all-ports VIP",
            tcp(client4(), 50_003, vip4_allports(), 8080, true),
        ),
        ("ICMP echo", icmp_echo(client4(), vip4(), 7, 1, 24)),
        ("ICMPv6 echo", icmp_echo(client6(), vip6(), 7, 1, 24)),
        (
            "ICMP frag needed",
            icmp_too_big(ip("198.51.100.1"), vip4(), 1400, &q4),
        ),
        (
            "ICMP frag needed, short quote",
            icmp_too_big(ip("198.51.100.1"), vip4(), 1400, &q4[..28]),
        ),
        (
            "ICMPv6 packet too big",
            icmp_too_big(ip("2001:db8:ff::1"), vip6(), 1400, &q6),
        ),
        (
            "ICMPv6 packet too big, short quote",
            icmp_too_big(ip("2001:db8:ff::1"), vip6(), 1400, &q6[..48]),
        ),
    ]
}

/// Runs a frame and checks it against the model: action, output bytes and exit counter.
fn check_against_model(
    fx: &mut Fixture,
    model: &Model,
    frame: &[u8],
    mark: Option<u32>,
) -> Result<(u32, Counter), String> {
    let before = fx.counters();
    let r = match fx.try_run(frame, mark) {
        Ok(r) => r,
        Err(e) if frame.len() < 14 => {
            return Err(format!("kernel refused a {}-byte frame: {e}", frame.len()));
        }
        Err(e) => return Err(format!("test_run failed: {e}")),
    };
    let delta = fx.counters().since(&before);
    let ex = exits(&delta);
    if ex.len() != 1 || ex[0].1 != 1 {
        return Err(format!(
            "exactly one exit counter must move by one, got {ex:?} (action {})",
            action_name(r.action)
        ));
    }
    let v = model.classify(frame);
    check_output(&fx.cfg, &v.expect, frame, r.action, &r.frame).map_err(|e| {
        format!(
            "{e}; model {:?}, got {} via {:?}\n  output {}",
            v.expect,
            action_name(r.action),
            ex[0].0,
            hex(&r.frame)
        )
    })?;
    if !v.counters.contains(&ex[0].0) {
        return Err(format!(
            "exit counter {:?}, model allows {:?}",
            ex[0].0, v.counters
        ));
    }
    Ok((r.action, ex[0].0))
}

#[test]
fn every_truncation_passes_or_drops_never_forwards() {
    let mut fx = Fixture::standard();
    let model = fx.model();
    // A valid mark for the flows: the fast path must refuse truncated frames as well.
    let real = reals4()[0];
    fx.dp
        .set_mark(1, &fx.mark_entry(&VipId::tcp(vip4(), 80), &real))
        .unwrap();
    let real6 = reals6()[0];
    fx.dp
        .set_mark(2, &fx.mark_entry(&VipId::tcp(vip6(), 80), &real6))
        .unwrap();
    let mut runs = 0;
    let mut by_counter: BTreeMap<&str, u32> = BTreeMap::new();
    for (name, full) in vip_frames() {
        // The full frame itself is handled (forwarded or answered).
        let (action, _) = check_against_model(&mut fx, &model, &full, None)
            .unwrap_or_else(|e| panic!("{name} (full): {e}\n  input {}", hex(&full)));
        assert_eq!(
            action, XDP_TX,
            "{name}: the untruncated frame is forwarded or answered"
        );
        let mark = if full[12..14] == [0x86, 0xdd] { 2 } else { 1 };
        for len in 0..full.len() {
            let f = &full[..len];
            for m in [None, Some(mark)] {
                if len < 14 {
                    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header; if a
                    // kernel accepts them, they must pass untouched.
                    if let Ok(r) = fx.try_run(f, m) {
                        assert_eq!(
                            (r.action, r.frame.as_slice()),
                            (2, f),
                            "{name} truncated to {len}"
                        );
                    }
                    continue;
                }
                let res = check_against_model(&mut fx, &model, f, m);
                let (action, counter) = res.unwrap_or_else(|e| {
                    panic!(
                        "{name} truncated to {len} (mark {m:?}): {e}\n  input {}",
                        hex(f)
                    )
                });
                assert_ne!(
                    action, XDP_TX,
                    "{name} truncated to {len} (mark {m:?}) was transmitted"
                );
                *by_counter.entry(counter.label()).or_default() += 1;
                runs += 1;
            }
        }
    }
    println!("{runs} truncated frames: {by_counter:?}");
    assert!(by_counter.contains_key("pass_malformed") && by_counter.contains_key("drop_malformed"));
}

#[test]
fn ipv4_options_are_dropped_for_vips_and_passed_otherwise() {
    let mut fx = Fixture::standard();
    for (name, base) in [
        ("TCP", tcp(client4(), 1, vip4(), 80, true)),
        ("UDP", udp(client4(), 1, vip4(), 53)),
        ("ICMP echo", icmp_echo(client4(), vip4(), 1, 1, 8)),
    ] {
        for words in 1..=10 {
            let f = with_ipv4_options(&base, words);
            assert_eq!(f[14] & 0xf, 5 + words as u8);
            fx.run_case(&Case::drop(
                format!("{name} IHL {}", 5 + words),
                f.clone(),
                Counter::DropIpOptions,
            ));
            fx.run_case(
                &Case::drop(
                    format!("{name} IHL {} marked", 5 + words),
                    f,
                    Counter::DropIpOptions,
                )
                .with_mark(77),
            );
        }
        // IHL below 5 is not a valid header at all.
        for ihl in 0..5u8 {
            let mut f = base.clone();
            f[14] = 0x40 | ihl;
            fx.run_case(&Case::drop(
                format!("{name} IHL {ihl}"),
                f,
                Counter::DropIpOptions,
            ));
        }
    }
    let f = with_ipv4_options(&tcp(client4(), 1, other4(), 80, true), 3);
    fx.run_case(&Case::pass("options, not a VIP", f, Counter::PassNotVip));
}

#[test]
fn ipv4_fragments_are_dropped() {
    let mut fx = Fixture::standard();
    for (name, base) in [
        ("TCP", tcp(client4(), 1, vip4(), 80, true)),
        ("UDP", udp(client4(), 1, vip4(), 53)),
        ("ICMP echo", icmp_echo(client4(), vip4(), 1, 1, 8)),
    ] {
        for (what, word) in [
            ("MF, offset 0", 0x2000u16),
            ("offset 1", 0x0001),
            ("MF + offset 185", 0x20b9),
            ("DF + offset 8191", 0x5fff),
            ("last fragment", 0x0100),
        ] {
            fx.run_case(&Case::drop(
                format!("{name} {what}"),
                with_frag(&base, word),
                Counter::DropFragment,
            ));
        }
        // DF alone is not a fragment; the reserved bit is ignored.
        let df = with_frag(&base, 0x4000);
        let model = fx.model();
        assert!(!matches!(
            model.classify(&df).expect,
            Expect::Drop | Expect::Pass
        ));
        check_against_model(&mut fx, &model, &df, None)
            .unwrap_or_else(|e| panic!("{name} DF: {e}"));
    }
}

#[test]
fn bad_ip_versions_pass_untouched() {
    let mut fx = Fixture::standard();
    let v4 = tcp(client4(), 1, vip4(), 80, true);
    let v6 = tcp(client6(), 1, vip6(), 80, true);
    for ver in [0u8, 1, 5, 6, 7, 15] {
        let mut f = v4.clone();
        f[14] = (ver << 4) | 5;
        fx.run_case(&Case::pass(
            format!("ethertype IPv4, version {ver}"),
            f.clone(),
            Counter::PassMalformed,
        ));
        fx.run_case(
            &Case::pass(
                format!("ethertype IPv4, version {ver}, marked"),
                f,
                Counter::PassMalformed,
            )
            .with_mark(1),
        );
    }
    for ver in [0u8, 4, 5, 7, 15] {
        let mut f = v6.clone();
        f[14] = (ver << 4) | (f[14] & 0xf);
        fx.run_case(&Case::pass(
            format!("ethertype IPv6, version {ver}"),
            f,
            Counter::PassMalformed,
        ));
    }
    // An IPv6 packet behind an IPv4 ethertype and vice versa.
    let mut f = v6.clone();
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    fx.run_case(&Case::pass(
        "IPv6 packet, IPv4 ethertype",
        f,
        Counter::PassMalformed,
    ));
    let mut f = v4.clone();
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0; 40]);
    fx.run_case(&Case::pass(
        "IPv4 packet, IPv6 ethertype",
        f,
        Counter::PassMalformed,
    ));
}

#[test]
fn ipv6_extension_headers_are_dropped() {
    let mut fx = Fixture::standard();
    for (name, base) in [
        ("TCP", tcp(client6(), 1, vip6(), 80, true)),
        ("UDP", udp(client6(), 1, vip6(), 53)),
        ("ICMPv6 echo", icmp_echo(client6(), vip6(), 1, 1, 8)),
    ] {
        for (kind, counter) in [
            (0u8, Counter::DropUnsupported),
            (43, Counter::DropUnsupported),
            (44, Counter::DropFragment),
            (50, Counter::DropUnsupported),
            (51, Counter::DropUnsupported),
            (60, Counter::DropUnsupported),
            (135, Counter::DropUnsupported),
            (59, Counter::DropUnsupported),
        ] {
            let f = with_ipv6_ext(&base, kind);
            fx.run_case(&Case::drop(
                format!("{name} behind extension header {kind}"),
                f,
                counter,
            ));
        }
    }
    let f = with_ipv6_ext(&tcp(client6(), 1, other6(), 80, true), 0);
    fx.run_case(&Case::pass(
        "extension header, not a VIP",
        f,
        Counter::PassNotVip,
    ));
}

fn set_u16(mut f: Vec<u8>, off: usize, v: u16) -> Vec<u8> {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
    if f[12..14] == [0x08, 0x00] {
        fix_ipv4_checksum(&mut f);
    }
    f
}

#[test]
fn inconsistent_lengths_are_dropped() {
    let mut fx = Fixture::standard();
    let t4 = tcp(client4(), 1, vip4(), 80, true);
    let u4 = udp(client4(), 1, vip4(), 53);
    let t6 = tcp(client6(), 1, vip6(), 80, true);
    let u6 = udp(client6(), 1, vip6(), 53);
    let e4 = icmp_echo(client4(), vip4(), 1, 1, 8);
    let tot4 = (t4.len() - 14) as u16;
    let plen6 = (t6.len() - 54) as u16;
    let mut cases = vec![
        Case::drop(
            "IPv4 total length beyond the frame",
            set_u16(t4.clone(), 16, tot4 + 1),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv4 total length 65535",
            set_u16(t4.clone(), 16, 0xffff),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv4 total length 0",
            set_u16(t4.clone(), 16, 0),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv4 total length 20",
            set_u16(u4.clone(), 16, 20),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv4 total length 27",
            set_u16(u4.clone(), 16, 27),
            Counter::DropMalformed,
        ),
        Case::drop(
            "ICMP total length 27",
            set_u16(e4.clone(), 16, 27),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv6 payload length beyond the frame",
            set_u16(t6.clone(), 18, plen6 + 1),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv6 payload length 0",
            set_u16(u6.clone(), 18, 0),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv6 payload length 7",
            set_u16(u6.clone(), 18, 7),
            Counter::DropMalformed,
        ),
    ];
    for tot in 28..40u16 {
        cases.push(Case::drop(
            format!("IPv4 TCP, total length {tot}: no full TCP header"),
            set_u16(t4.clone(), 16, tot),
            Counter::DropMalformed,
        ));
    }
    for plen in 8..20u16 {
        cases.push(Case::drop(
            format!("IPv6 TCP, payload {plen}: no full TCP header"),
            set_u16(t6.clone(), 18, plen),
            Counter::DropMalformed,
        ));
    }
    // Shorter IP lengths than the frame are fine: the rest is Ethernet padding, carried.
    let model = fx.model();
    for (name, f) in [
        (
            "IPv4 UDP, total length 28 (bytes after are padding)",
            set_u16(u4.clone(), 16, 28),
        ),
        ("IPv4 TCP, total length 40", set_u16(t4.clone(), 16, 40)),
        ("IPv6 UDP, payload 8", set_u16(u6.clone(), 18, 8)),
        ("IPv6 TCP, payload 20", set_u16(t6.clone(), 18, 20)),
    ] {
        let v = model.classify(&f);
        let Expect::Forward { real, .. } = v.expect else {
            panic!("{name}: model {:?}", v.expect)
        };
        cases.push(Case::forward(name, f, real, Counter::NewFlow));
    }
    fx.run_table(&cases);
}

// ---------------------------------------------------------------------------------------
// Random and mutated frames
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    runs: u64,
    by_counter: BTreeMap<&'static str, u64>,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, what: &str, frame: &[u8], res: Result<(u32, Counter), String>) {
        self.runs += 1;
        match res {
            Ok((_, c)) => *self.by_counter.entry(c.label()).or_default() += 1,
            Err(e) => {
                if self.failures.len() < 25 {
                    self.failures
                        .push(format!("{what}: {e}\n  input {}", hex(frame)));
                }
            }
        }
    }

    fn finish(&self, seed: u64, name: &str) {
        println!("{name}: {} frames, exits {:?}", self.runs, self.by_counter);
        assert!(
            self.failures.is_empty(),
            "{name}: {} failures (seed {seed}, rerun with DATAPATH_FUZZ_SEED={seed}):\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }

    fn count(&self, c: Counter) -> u64 {
        self.by_counter.get(c.label()).copied().unwrap_or(0)
    }
}

/// Random frame biased toward the interesting parts: IP ethertypes, versions, VIP
/// addresses and ports, consistent lengths (each with some probability).
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(14..=200usize);
    let mut f: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    if rng.random_ratio(1, 5) {
        return f; // raw noise
    }
    let v6 = rng.random_bool(0.5);
    f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let hl = if v6 { 40 } else { 20 };
    if len < 14 + hl {
        return f;
    }
    if rng.random_bool(0.8) {
        f[14] = if v6 {
            0x60 | (f[14] & 0xf)
        } else if rng.random_bool(0.8) {
            0x45
        } else {
            0x40 | (f[14] & 0xf)
        };
    }
    if !v6 && rng.random_bool(0.7) {
        f[20] &= 0x40; // no fragment
    }
    if rng.random_bool(0.7) {
        let vips = if v6 {
            vec![vip6(), vip6_v4real()]
        } else {
            vec![vip4(), vip4_v6reals(), vip4_allports(), vip4_empty()]
        };
        let a = addr_octets(vips[rng.random_range(0..vips.len())]);
        let off = if v6 { 38 } else { 30 };
        f[off..off + a.len()].copy_from_slice(&a);
    }
    if rng.random_bool(0.8) {
        let protos = [6u8, 17, if v6 { 58 } else { 1 }];
        f[if v6 { 20 } else { 23 }] = protos[rng.random_range(0..3)];
    }
    if rng.random_bool(0.7) {
        let ip_len = (len - 14 - rng.random_range(0..4usize).min(len - 14 - hl)) as u16;
        if v6 {
            f[18..20].copy_from_slice(&(ip_len - 40).to_be_bytes());
        } else {
            f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        }
    }
    let l4 = 14 + hl;
    if len >= l4 + 4 && rng.random_bool(0.7) {
        let ports = [80u16, 53, 443, 8080];
        f[l4 + 2..l4 + 4].copy_from_slice(&ports[rng.random_range(0..4)].to_be_bytes());
    }
    if !v6 && rng.random_bool(0.5) {
        fix_ipv4_checksum(&mut f);
    }
    f
}

fn addr_octets(a: std::net::IpAddr) -> Vec<u8> {
    match a {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// 1..=4 random edits of a valid frame, biased toward the headers.
fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let hot = f.len().min(110);
        match rng.random_range(0..10) {
            0..=2 => {
                let i = rng.random_range(0..hot);
                f[i] = rng.random();
            }
            3..=4 => {
                let i = rng.random_range(0..hot);
                f[i] ^= 1 << rng.random_range(0..8);
            }
            5 => {
                let i = rng.random_range(0..f.len());
                f[i] = rng.random();
            }
            6 => {
                // A length field: IPv4 total length / IPv6 payload length, or the quoted ones.
                let off = *[16usize, 18, 42 + 2, 62 + 4]
                    .get(rng.random_range(0..4))
                    .unwrap();
                if off + 2 <= f.len() {
                    let v = rng.random_range(0..(f.len() as u16 + 16));
                    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
            7 => {
                let n = rng.random_range(14..=f.len());
                f.truncate(n);
            }
            8 => {
                let n = rng.random_range(1..24);
                f.extend((0..n).map(|_| rng.random::<u8>()));
            }
            _ => {
                // The fragment word / IHL / next header.
                let (off, v) = match rng.random_range(0..3) {
                    0 => (20, rng.random_range(0..4u8) << 5),
                    1 => (14, 0x40 | rng.random_range(0..16u8)),
                    _ => (20, [0u8, 43, 44, 60, 6, 17, 58][rng.random_range(0..7)]),
                };
                if off < f.len() {
                    f[off] = v;
                }
            }
        }
        if f.len() < 14 {
            f.resize(14, 0);
        }
    }
    if f[12..14] == [0x08, 0x00]
        && f.len() >= 34
        && f[14] & 0xf >= 5
        && 14 + (f[14] as usize & 0xf) * 4 <= f.len()
        && rng.random_bool(0.7)
    {
        fix_ipv4_checksum(&mut f);
    }
    f
}

#[test]
fn random_frames_match_the_model() {
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    let model = fx.model();
    let mut t = Tally::default();
    for i in 0..10_000 {
        let f = random_frame(&mut rng);
        let res = check_against_model(&mut fx, &model, &f, None);
        t.record(&format!("random frame {i}"), &f, res);
    }
    t.finish(seed, "random frames");
    assert!(
        t.count(Counter::PassNotIp) > 0
            && t.count(Counter::PassNotVip) > 0
            && t.count(Counter::DropMalformed) > 0
    );
}

#[test]
fn mutated_vip_frames_match_the_model() {
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    let bases: Vec<Vec<u8>> = vip_frames().into_iter().map(|(_, f)| f).collect();
    let mut t = Tally::default();
    // Two configurations: the usual MTU, and one so small that many frames are too big.
    for (phase, mtu) in [(0, 1500u32), (1, 110)] {
        let mut cfg = test_config();
        cfg.mtu = mtu;
        fx.set_config(cfg);
        let model = fx.model();
        for i in 0..10_000 {
            let base = &bases[rng.random_range(0..bases.len())];
            let f = mutate(&mut rng, base);
            let res = check_against_model(&mut fx, &model, &f, None);
            t.record(&format!("phase {phase} (MTU {mtu}) mutation {i}"), &f, res);
        }
    }
    t.finish(seed, "mutated VIP frames");
    // The mutations reached every kind of exit that matters.
    for c in [
        Counter::NewFlow,
        Counter::ConnHit,
        Counter::IcmpEchoReply,
        Counter::IcmpTooBigForwarded,
        Counter::IcmpTooBigSent,
        Counter::DropMalformed,
        Counter::DropFragment,
        Counter::DropIpOptions,
        Counter::DropUnsupported,
        Counter::PassMalformed,
        Counter::PassNotVip,
    ] {
        assert!(
            t.count(c) > 0,
            "no mutated frame reached {c:?}: {:?}",
            t.by_counter
        );
    }
}

/// Marked frames: when the fast path forwards, it must be exactly the encapsulation toward
/// the mark's real, and only for a frame the normal path would accept as a VIP flow;
/// otherwise the normal path runs and must match the model.
#[test]
fn mutated_marked_frames_never_reach_a_wrong_real() {
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    let model = fx.model();
    let mut bases = Vec::new();
    for (client, vip) in [
        (client4(), vip4()),
        (client6(), vip6()),
        (client4(), vip4_v6reals()),
    ] {
        for (i, syn) in [true, false].into_iter().enumerate() {
            let f = tcp(client, 61_000 + i as u16, vip, 80, syn);
            let pick = fx.model_pick(&parse_l3l4(&f).unwrap().flow()).unwrap();
            let mark = 100 + bases.len() as u32;
            fx.dp
                .set_mark(
                    mark,
                    &MarkEntry {
                        real_id: pick.real_id,
                        real_gen: pick.generation,
                        vip_id: pick.vip_id,
                        _pad: 0,
                    },
                )
                .unwrap();
            bases.push((f, mark, pick.addr));
        }
    }
    let mut t = Tally::default();
    for i in 0..6_000 {
        let (base, mark, real) = &bases[rng.random_range(0..bases.len())];
        let f = mutate(&mut rng, base);
        let before = fx.counters();
        let r = fx.run(&f, Some(*mark));
        let d = fx.counters().since(&before);
        let ex = exits(&d);
        let v = model.classify(&f);
        let res = (|| {
            if ex.len() != 1 || ex[0].1 != 1 {
                return Err(format!("exit counters {ex:?}"));
            }
            if ex[0].0 == Counter::MarkHit {
                // The mark vouches for the 5-tuple (a NIC rule matched it), so a frame whose
                // addresses or ports were changed may still go to the mark's real; but only
                // a well-formed TCP/UDP packet, and exactly encapsulated.
                if !well_formed_flow(&f) {
                    return Err(format!(
                        "fast path forwarded a malformed frame (normal path: {:?} via {:?})\n  output {}",
                        v.expect,
                        v.counters,
                        hex(&r.frame)
                    ));
                }
                let p = parse_l3l4(&f).ok_or("fast path forwarded a non-IP frame")?;
                check_output(
                    &fx.cfg,
                    &Expect::Forward {
                        real: *real,
                        client: p.src,
                        sport: p.sport,
                    },
                    &f,
                    r.action,
                    &r.frame,
                )?;
            } else if ex[0].0 == Counter::DropNoReal
                && r.action == XDP_DROP
                && f[12..14] == [0x86, 0xdd]
                && real.is_ipv4()
            {
                // A frame turned into IPv6 carrying the mark of an IPv4 real: the fast path
                // refuses to build IPv6-in-IPv4 and drops it.
            } else {
                check_output(&fx.cfg, &v.expect, &f, r.action, &r.frame).map_err(|e| {
                    format!(
                        "{e}; model {:?}, got {} via {:?}",
                        v.expect,
                        action_name(r.action),
                        ex[0].0
                    )
                })?;
            }
            Ok((r.action, ex[0].0))
        })();
        t.record(&format!("marked mutation {i} (mark {mark})"), &f, res);
    }
    t.finish(seed, "mutated marked frames");
    assert!(t.count(Counter::MarkHit) > 1000);
}

#[test]
fn non_vip_frames_are_never_touched() {
    // Random mutations of frames to other addresses: whatever the datapath does, it does
    // not transmit them (there is nothing to answer or forward).
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut fx = Fixture::standard();
    let model = fx.model();
    let bases = [
        tcp(client4(), 1, other4(), 80, true),
        udp(client6(), 1, other6(), 53),
        icmp_echo(client4(), other4(), 1, 1, 16),
        icmp_echo(client6(), other6(), 1, 1, 16),
    ];
    let mut t = Tally::default();
    for i in 0..3_000 {
        let f = mutate(&mut rng, &bases[i % bases.len()]);
        let res = check_against_model(&mut fx, &model, &f, None);
        t.record(&format!("non-VIP mutation {i}"), &f, res);
    }
    t.finish(seed, "non-VIP mutations");
}
