//! Property test: every frame the balancer builds itself carries valid checksums. Echo
//! replies (IPv4, IPv6: rewritten in place with incremental updates), ICMP "fragmentation
//! needed" / ICMPv6 "packet too big" errors (built from scratch) and outer IPv4 headers
//! (computed arithmetically) are run through `BPF_PROG_TEST_RUN` over seeded random inputs
//! and the edge cases that break one's complement code: all-zero identifier, sequence and
//! data (the message sums to +0, whose only valid checksum is 0xffff), messages and
//! headers that sum to -0 (0x0000 and 0xffff both valid), odd lengths, and the largest
//! frame the kernel's test run takes. Every output is verified by the fixture's own
//! RFC 1071 code and by etherparse, never by the datapath's checksum code, and must carry
//! exactly the checksum a full computation gives (0x0000 for data summing to -0, 0xffff
//! only for all-zero data), so replies are byte for byte what a host would send.

use std::net::IpAddr;

use marklb_common::Counter;
use marklb_tests::datapath_fixture::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Random cases per family and kind (a few seconds in all).
const CASES: usize = 400;

/// An ICMP / ICMPv6 echo request with every field chosen by the caller.
#[derive(Clone, Debug)]
struct Echo {
    client: IpAddr,
    vip: IpAddr,
    ttl: u8,
    tos: u8,
    ip_id: u16,
    id: u16,
    seq: u16,
    data: Vec<u8>,
}

impl Echo {
    fn new(client: IpAddr, vip: IpAddr, id: u16, seq: u16, data: Vec<u8>) -> Self {
        Self {
            client,
            vip,
            ttl: 64,
            tos: 0,
            ip_id: 0,
            id,
            seq,
            data,
        }
    }

    /// The frame, checksums computed here (RFC 1071 code of the fixture).
    fn frame(&self) -> Vec<u8> {
        let v6 = self.client.is_ipv6();
        let mut icmp = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
        icmp.extend_from_slice(&self.id.to_be_bytes());
        icmp.extend_from_slice(&self.seq.to_be_bytes());
        icmp.extend_from_slice(&self.data);
        let mut f = CLIENT_AND_LB_MACS.to_vec();
        let (src, dst) = (octets(self.client), octets(self.vip));
        if v6 {
            f.extend_from_slice(&[0x86, 0xdd]);
            let vtc = (6u32 << 28) | ((self.tos as u32) << 20);
            f.extend_from_slice(&vtc.to_be_bytes());
            f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[58, self.ttl]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&dst);
            let c = !fold(ones_sum(
                &icmp,
                ipv6_pseudo(&src, &dst, icmp.len() as u32, 58),
            ));
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x45, self.tos]);
            f.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
            f.extend_from_slice(&self.ip_id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, self.ttl, 1, 0, 0]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&dst);
            fix_ipv4_checksum(&mut f);
            let c = checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&icmp);
        f
    }
}

const CLIENT_AND_LB_MACS: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The checksums a full computation gives for a frame's IPv4 header (if any) and ICMP /
/// ICMPv6 message, next to the ones it carries: (what, carried, full computation).
fn checksums(f: &[u8]) -> Vec<(&'static str, u16, u16)> {
    let mut out = Vec::new();
    if be16(f, 12) == 0x86dd {
        let plen = be16(f, 18) as usize;
        let mut msg = f[54..54 + plen].to_vec();
        let carried = be16(&msg, 2);
        msg[2..4].fill(0);
        let full = !fold(ones_sum(
            &msg,
            ipv6_pseudo(&f[22..38], &f[38..54], plen as u32, 58),
        ));
        out.push(("ICMPv6", carried, full));
    } else {
        let mut hdr = f[14..34].to_vec();
        let carried = be16(&hdr, 10);
        hdr[10..12].fill(0);
        out.push(("IPv4 header", carried, checksum(&hdr)));
        let tot = be16(f, 16) as usize;
        let mut msg = f[34..14 + tot].to_vec();
        let carried = be16(&msg, 2);
        msg[2..4].fill(0);
        out.push(("ICMP", carried, checksum(&msg)));
    }
    out
}

/// Strictly valid (two independent verifiers) and exactly the full computation's value.
fn assert_checksums(desc: &str, input: &[u8], out: &[u8]) {
    let canonical = checksums(out).into_iter().all(|(_, c, f)| c == f);
    if let Err(err) = reply_checksums_valid(out).and_then(|()| {
        canonical.then_some(()).ok_or_else(|| {
            format!(
                "not the full computation's checksums: {:x?}",
                checksums(out)
            )
        })
    }) {
        panic!(
            "[{desc}] {err}\n  input  {}\n  output {}",
            hex(input),
            hex(out)
        );
    }
}

/// Runs an echo request and asserts the reply: fields as `check_echo_reply` wants them,
/// both checksums strictly valid and canonical.
fn assert_echo(fx: &mut Fixture, desc: &str, e: &Echo) {
    let frame = e.frame();
    let r = fx.run_case(&Case::new(
        desc,
        frame.clone(),
        Expect::EchoReply,
        Counter::IcmpEchoReply,
    ));
    assert_checksums(&format!("{desc}: {e:?}"), &frame, &r.frame);
}

/// The largest frame `BPF_PROG_TEST_RUN` hands an XDP program whole (a page minus the XDP
/// headroom and the shared info: 3,520 bytes with 4 KiB pages), found by answering echo
/// requests of growing size: beyond it the program sees a truncated frame and drops.
fn largest_frame(fx: &mut Fixture) -> usize {
    let answered = |fx: &mut Fixture, len: usize| {
        let e = Echo::new(client4(), vip4(), 1, 1, vec![9; len - 14 - 20 - 8]);
        fx.try_run(&e.frame(), None)
            .is_ok_and(|r| r.action == marklb_agent::datapath::testrun::XDP_TX)
    };
    let (mut lo, mut hi) = (1514usize, 16_384usize);
    assert!(answered(fx, lo), "a 1514-byte frame must be answered");
    assert!(!answered(fx, hi), "a {hi}-byte frame was answered whole");
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if answered(fx, mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    lo
}

fn max_echo_data(max_frame: usize, v6: bool) -> usize {
    max_frame - 14 - if v6 { 40 } else { 20 } - 8
}

fn families() -> [(IpAddr, IpAddr); 2] {
    [(client4(), vip4()), (client6(), vip6())]
}

#[test]
fn echo_replies_to_all_zero_requests_verify() {
    // Identifier 0, sequence 0, no data: the IPv4 reply message is all zero and must carry
    // 0xffff (it carried 0x0000, which Linux counts as a checksum error and drops).
    let mut fx = Fixture::standard();
    let max = largest_frame(&mut fx);
    for (client, vip) in families() {
        let biggest = max_echo_data(max, client.is_ipv6());
        for len in [0usize, 1, 2, 3, 8, 63, 64, 1001, biggest - 1, biggest] {
            let e = Echo::new(client, vip, 0, 0, vec![0; len]);
            assert_echo(
                &mut fx,
                &format!("{client}: zero id/seq, {len} zero bytes"),
                &e,
            );
        }
    }
    let e = Echo::new(client4(), vip4(), 0, 0, Vec::new());
    let r = fx.run(&e.frame(), None);
    assert_eq!(&r.frame[34..42], &[0, 0, 0xff, 0xff, 0, 0, 0, 0]);
}

#[test]
fn echo_replies_summing_to_minus_zero_verify() {
    // Messages and headers whose data sums to 0xffff (one's complement -0): the checksum
    // may be 0x0000 or 0xffff, both must verify.
    let mut fx = Fixture::standard();
    for (client, vip) in families() {
        // Reply type 0 / 129: identifier 0xffff (or the complement of the rest) makes the
        // IPv4 message sum to -0.
        for seq in [0u16, 1, 0x8000, 0xfffe] {
            let e = Echo::new(client, vip, 0xffff - seq, seq, Vec::new());
            assert_echo(
                &mut fx,
                &format!("{client}: message sums to -0 (seq {seq})"),
                &e,
            );
        }
    }
    // An IPv4 reply header (TTL 64, addresses swapped: same sum) that sums to -0.
    for tos in [0u8, 0x10, 0xb8] {
        let mut e = Echo::new(client4(), vip4(), 3, 4, vec![1, 2, 3]);
        e.tos = tos;
        e.ttl = 64;
        let mut hdr = e.frame()[14..34].to_vec();
        hdr[10] = 0;
        hdr[11] = 0;
        hdr[4] = 0;
        hdr[5] = 0;
        e.ip_id = 0xffff - fold(ones_sum(&hdr, 0));
        let mut check = e.frame()[14..34].to_vec();
        check[10] = 0;
        check[11] = 0;
        assert_eq!(fold(ones_sum(&check, 0)), 0xffff, "constructed header");
        assert_echo(
            &mut fx,
            &format!("IPv4 header sums to -0 (TOS {tos:#x})"),
            &e,
        );
    }
}

#[test]
fn echo_replies_to_random_requests_verify() {
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    let max = largest_frame(&mut fx);
    for (client, vip) in families() {
        let biggest = max_echo_data(max, client.is_ipv6());
        for i in 0..CASES {
            let len = match rng.random_range(0..10) {
                0..=4 => rng.random_range(0..=64usize),
                5..=6 => biggest - rng.random_range(0..=16usize),
                _ => rng.random_range(0..=biggest),
            };
            let zero = rng.random_bool(0.2);
            let data: Vec<u8> = (0..len)
                .map(|_| if zero { 0 } else { rng.random() })
                .collect();
            let pick = |rng: &mut StdRng| match rng.random_range(0..4) {
                0 => 0,
                1 => 0xffff,
                _ => rng.random(),
            };
            let mut e = Echo::new(client, vip, pick(&mut rng), pick(&mut rng), data);
            e.ttl = rng.random_range(1..=255);
            e.tos = rng.random();
            e.ip_id = rng.random();
            assert_echo(
                &mut fx,
                &format!("random echo {i} ({client}, {len} bytes, seed {seed})"),
                &e,
            );
        }
    }
}

/// A TCP or UDP packet from a random client to a VIP, `ip_len` bytes of IP packet.
fn random_flow_frame(rng: &mut StdRng, vip: IpAddr, tcp: bool, ip_len: usize) -> Vec<u8> {
    let client = if vip.is_ipv6() {
        IpAddr::from(rng.random::<[u8; 16]>())
    } else {
        IpAddr::from(rng.random::<[u8; 4]>())
    };
    let sport = rng.random_range(1..=u16::MAX);
    let hdr = if vip.is_ipv6() { 40 } else { 20 } + if tcp { 20 } else { 8 };
    let spec = if tcp {
        marklb_agent::packet::FrameSpec::tcp(client, sport, vip, 80, rng.random_bool(0.5))
    } else {
        marklb_agent::packet::FrameSpec::udp(client, sport, vip, 53)
    };
    let mut spec = spec.with_payload(ip_len - hdr);
    spec.payload.iter_mut().for_each(|b| *b = rng.random());
    set_tos(spec.build(), rng.random())
}

#[test]
fn too_big_errors_for_random_packets_verify() {
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    let max = largest_frame(&mut fx);
    // (VIP, outer header of its reals): IPv4 reals, IPv6 reals for an IPv4 VIP, IPv6.
    let vips = [(vip4(), 20u32), (vip4_v6reals(), 40), (vip6(), 40)];
    for i in 0..CASES * 2 {
        let (vip, overhead) = vips[i % vips.len()];
        let mut cfg = test_config();
        cfg.mtu = match rng.random_range(0..4) {
            0 => 1280,
            1 => 1500,
            _ => rng.random_range(576..=3000),
        };
        fx.set_config(cfg);
        let l3 = if vip.is_ipv6() { 40 } else { 20 };
        let smallest = (cfg.mtu - overhead + 1) as usize;
        let largest = max - 14;
        let ip_len = match rng.random_range(0..4) {
            0 => smallest,
            1 => largest,
            _ => rng.random_range(smallest.max(l3 + 20)..=largest),
        };
        let tcp = rng.random_bool(0.5);
        let frame = random_flow_frame(&mut rng, vip, tcp, ip_len);
        let r = fx.run_case(&Case::new(
            format!(
                "too big {i}: {vip}, IP length {ip_len}, MTU {} (seed {seed})",
                cfg.mtu
            ),
            frame.clone(),
            Expect::TooBigSent {
                mtu: cfg.mtu - overhead,
            },
            Counter::IcmpTooBigSent,
        ));
        assert_checksums(&format!("too big {i} (seed {seed})"), &frame, &r.frame);
    }
}

#[test]
fn outer_ipv4_headers_of_random_flows_verify() {
    // `check_encap` verifies the outer IPv4 checksum with the fixture's own code; random
    // clients, ports, TOS and lengths (odd ones too) cover the sums the arithmetic sees.
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::standard();
    for i in 0..CASES * 2 {
        let tcp = rng.random_bool(0.5);
        let l4 = if tcp { 20 } else { 8 };
        let ip_len = match rng.random_range(0..3) {
            0 => 20 + l4,
            1 => 1480,
            _ => rng.random_range(20 + l4..=1480),
        };
        let frame = random_flow_frame(&mut rng, vip4(), tcp, ip_len);
        let real = fx.model_real(&parse_l3l4(&frame).expect("parses").flow());
        let mut case = Case::forward(
            format!("encap {i}, IP length {ip_len} (seed {seed})"),
            frame,
            real,
            Counter::NewFlow,
        );
        // A TCP packet without SYN may find its flow already learned (random ports repeat).
        case.counter = None;
        fx.run_case(&case);
    }
}
