//! The decapsulator (`marklb-decap`, XDP and TC variants) under `BPF_PROG_TEST_RUN`.
//!
//! Expectations come from [`oracle`], an independent user-space statement of the rules
//! (which packets are ours, which are malformed, what the output must be byte for byte),
//! never from the program itself. Both variants must agree with it on crafted frames,
//! on every truncation of valid frames and on thousands of seeded random mutations.
//!
//! Needs root (bpf()); fails loudly otherwise, never skips.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use marklb_agent::decap::{Decap, DecapRun, TC_ACT_SHOT, TC_ACT_UNSPEC};
use marklb_common::DecapCounter as C;
use rand::{Rng, SeedableRng, rngs::StdRng};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 2);
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
const OTHER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 2);
const ENCAP_SRC_V4: Ipv4Addr = Ipv4Addr::new(10, 202, 0x12, 0x34);
const ENCAP_SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0x12, 0x34);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

fn require_root() {
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "\n\n*** THE DECAP TESTS NEED ROOT (bpf(), BPF_PROG_TEST_RUN) ***\nrunning as uid {euid}: run \
         `cargo test -p marklb-tests --test decap` as root. They are never skipped.\n"
    );
}

fn loaded() -> Decap {
    require_root();
    let mut d = Decap::load().expect("loading marklb-decap");
    d.set_local_addrs(&[IpAddr::V4(LOCAL_V4), IpAddr::V6(LOCAL_V6)])
        .expect("local addresses");
    d
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encap {
    /// IPv4 in IPv4 (protocol 4).
    Ipip,
    /// IPv6 in IPv6 (next header 41).
    Ip6ip6,
    /// IPv4 in IPv6 (next header 4).
    Ip4ip6,
}

const ALL_ENCAPS: [Encap; 3] = [Encap::Ipip, Encap::Ip6ip6, Encap::Ip4ip6];

/// An inner packet from the client to the VIP: TCP with some payload, or UDP.
fn inner_packet(v6: bool, tcp: bool, payload_len: usize, seed: u16) -> Vec<u8> {
    let b = if v6 {
        PacketBuilder::ipv6(CLIENT_V6.octets(), VIP_V6.octets(), 63)
    } else {
        PacketBuilder::ipv4(CLIENT_V4.octets(), VIP_V4.octets(), 63)
    };
    let payload: Vec<u8> = (0..payload_len)
        .map(|i| (i as u16).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect();
    let mut out = Vec::new();
    if tcp {
        b.tcp(40000 + seed, 80, 1234, 64000)
            .ack(99)
            .write(&mut out, &payload)
            .expect("tcp");
    } else {
        b.udp(40000 + seed, 53)
            .write(&mut out, &payload)
            .expect("udp");
    }
    out
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn outer_v4(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let tot = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0x10];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn outer_v6(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[nexthdr, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut e = DST_MAC.to_vec();
    e.extend_from_slice(&SRC_MAC);
    e.extend_from_slice(&ethertype.to_be_bytes());
    e
}

/// An encapsulated frame as the balancer sends it to `dst`, and the inner packet.
fn encapsulated(
    encap: Encap,
    dst: IpAddr,
    tcp: bool,
    payload_len: usize,
    seed: u16,
) -> (Vec<u8>, Vec<u8>) {
    let inner = inner_packet(encap == Encap::Ip6ip6, tcp, payload_len, seed);
    let mut f = match (encap, dst) {
        (Encap::Ipip, IpAddr::V4(d)) => {
            [eth(0x0800), outer_v4(ENCAP_SRC_V4, d, inner.len())].concat()
        }
        (Encap::Ip6ip6, IpAddr::V6(d)) => {
            [eth(0x86dd), outer_v6(ENCAP_SRC_V6, d, 41, inner.len())].concat()
        }
        (Encap::Ip4ip6, IpAddr::V6(d)) => {
            [eth(0x86dd), outer_v6(ENCAP_SRC_V6, d, 4, inner.len())].concat()
        }
        _ => panic!("{encap:?} to {dst}"),
    };
    f.extend_from_slice(&inner);
    (f, inner)
}

fn local_for(encap: Encap) -> IpAddr {
    if encap == Encap::Ipip {
        IpAddr::V4(LOCAL_V4)
    } else {
        IpAddr::V6(LOCAL_V6)
    }
}

fn other_for(encap: Encap) -> IpAddr {
    if encap == Encap::Ipip {
        IpAddr::V4(OTHER_V4)
    } else {
        IpAddr::V6(OTHER_V6)
    }
}

fn decap_counter(encap: Encap) -> C {
    match encap {
        Encap::Ipip => C::DecapIpip,
        Encap::Ip6ip6 => C::DecapIp6ip6,
        Encap::Ip4ip6 => C::DecapIp4ip6,
    }
}

// ---------------------------------------------------------------------------------------
// The oracle: the rules, stated on bytes
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// Passed, frame untouched.
    Pass(C),
    /// Dropped.
    Drop(C),
    /// Decapsulated into exactly this frame.
    Decap(C, Vec<u8>),
}

struct Rules {
    local: Vec<IpAddr>,
    drop_foreign: bool,
}

impl Rules {
    fn standard() -> Self {
        Self {
            local: vec![IpAddr::V4(LOCAL_V4), IpAddr::V6(LOCAL_V6)],
            drop_foreign: false,
        }
    }

    fn foreign(&self) -> Expect {
        if self.drop_foreign {
            Expect::Drop(C::DropNotForUs)
        } else {
            Expect::Pass(C::PassNotForUs)
        }
    }
}

fn be16(f: &[u8], off: usize) -> usize {
    usize::from(u16::from_be_bytes([f[off], f[off + 1]]))
}

/// Adds `n` to the big-endian 16-bit field at `off`.
fn add16(f: &mut [u8], off: usize, n: usize) {
    let v = (be16(f, off) + n) as u16;
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// An inner IPv4 header at `off` claiming exactly `len` bytes.
fn inner_v4_ok(f: &[u8], off: usize, len: usize) -> bool {
    if f.len() < off + 20 {
        return false;
    }
    let ihl = usize::from(f[off] & 0x0f) * 4;
    f[off] >> 4 == 4 && ihl >= 20 && ihl <= len && be16(f, off + 2) == len
}

fn decapsulated(f: &[u8], outer_len: usize, inner_ethertype: u16) -> Vec<u8> {
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&inner_ethertype.to_be_bytes());
    out.extend_from_slice(&f[14 + outer_len..]);
    out
}

fn oracle(f: &[u8], rules: &Rules) -> Expect {
    if f.len() < 14 {
        return Expect::Pass(C::PassNotIp);
    }
    match be16(f, 12) {
        0x0800 => {
            if f.len() < 34 || f[14] >> 4 != 4 || f[23] != 4 {
                return Expect::Pass(C::PassNotEncapsulated);
            }
            let dst = IpAddr::from(<[u8; 4]>::try_from(&f[30..34]).unwrap());
            if !rules.local.contains(&dst) {
                return rules.foreign();
            }
            if f[14] != 0x45 {
                return Expect::Drop(if f[14] & 0x0f < 5 {
                    C::DropMalformed
                } else {
                    C::DropIpOptions
                });
            }
            if be16(f, 20) & 0x3fff != 0 {
                return Expect::Drop(C::DropFragment);
            }
            if ipv4_checksum(&f[14..34]) != 0 {
                return Expect::Drop(C::DropBadChecksum);
            }
            let tot = be16(f, 16);
            if tot < 40 || 14 + tot > f.len() || !inner_v4_ok(f, 34, tot - 20) {
                return Expect::Drop(C::DropMalformed);
            }
            Expect::Decap(C::DecapIpip, decapsulated(f, 20, 0x0800))
        }
        0x86dd => {
            if f.len() < 54 || f[14] >> 4 != 6 {
                return Expect::Pass(C::PassNotEncapsulated);
            }
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap()));
            let nh = f[20];
            if nh == 44 {
                if f.len() < 55 || (f[54] != 4 && f[54] != 41) {
                    return Expect::Pass(C::PassNotEncapsulated);
                }
                if !rules.local.contains(&dst) {
                    return rules.foreign();
                }
                return Expect::Drop(C::DropFragment);
            }
            if nh != 4 && nh != 41 {
                return Expect::Pass(C::PassNotEncapsulated);
            }
            if !rules.local.contains(&dst) {
                return rules.foreign();
            }
            let pl = be16(f, 18);
            if 54 + pl > f.len() {
                return Expect::Drop(C::DropMalformed);
            }
            if nh == 41 {
                if pl < 40 || f[54] >> 4 != 6 || 40 + be16(f, 58) != pl {
                    return Expect::Drop(C::DropMalformed);
                }
                Expect::Decap(C::DecapIp6ip6, decapsulated(f, 40, 0x86dd))
            } else {
                if pl < 20 || !inner_v4_ok(f, 54, pl) {
                    return Expect::Drop(C::DropMalformed);
                }
                Expect::Decap(C::DecapIp4ip6, decapsulated(f, 40, 0x0800))
            }
        }
        _ => Expect::Pass(C::PassNotIp),
    }
}

// ---------------------------------------------------------------------------------------
// Running both variants against the oracle
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Xdp,
    Tc,
}

fn run(d: &mut Decap, v: Variant, f: &[u8]) -> DecapRun {
    match v {
        Variant::Xdp => d.test_run(f),
        Variant::Tc => d.test_run_tc(f),
    }
    .unwrap_or_else(|e| panic!("{v:?} test run of a {}-byte frame: {e}", f.len()))
}

/// The kernel's skb test run refuses IP frames shorter than their network header
/// (`EINVAL`); the XDP run covers those lengths.
fn tc_refuses(f: &[u8]) -> bool {
    f.len() < 14
        || (f[12..14] == [0x08, 0x00] && f.len() < 34)
        || (f[12..14] == [0x86, 0xdd] && f.len() < 54)
}

/// Runs `f` and checks outcome, output bytes and the one counter bumped.
fn check(d: &mut Decap, v: Variant, f: &[u8], want: &Expect, what: &str) {
    if v == Variant::Tc && tc_refuses(f) {
        assert!(
            d.test_run_tc(f).is_err(),
            "{what}: the kernel ran a frame it used to refuse"
        );
        assert!(
            matches!(want, Expect::Pass(_)),
            "{what}: short frames are never ours"
        );
        return;
    }
    let before = d.counters().expect("counters");
    let got = run(d, v, f);
    let bumped = d.counters().expect("counters").since(&before);
    let (pass, drop) = match v {
        Variant::Xdp => (XDP_PASS, XDP_DROP),
        Variant::Tc => (TC_ACT_UNSPEC as u32, TC_ACT_SHOT as u32),
    };
    let counter = match want {
        Expect::Pass(c) => {
            assert_eq!(
                got.action, pass,
                "{v:?} {what}: expected pass ({c:?}), frame {f:02x?}"
            );
            assert_eq!(got.frame, f, "{v:?} {what}: passed frame must be untouched");
            *c
        }
        Expect::Drop(c) => {
            assert_eq!(
                got.action, drop,
                "{v:?} {what}: expected drop ({c:?}), got {}, frame {f:02x?}",
                got.action
            );
            *c
        }
        Expect::Decap(c, out) => {
            assert_eq!(
                got.action, pass,
                "{v:?} {what}: expected decapsulation ({c:?}), frame {f:02x?}"
            );
            assert_eq!(&got.frame, out, "{v:?} {what}: decapsulated frame");
            *c
        }
    };
    assert_eq!(
        bumped.total(),
        1,
        "{v:?} {what}: exactly one counter per packet: {}",
        bumped.summary()
    );
    assert_eq!(
        bumped.get(counter),
        1,
        "{v:?} {what}: counter {counter:?}, got {}",
        bumped.summary()
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// All three encapsulations, TCP and UDP, small and large: the output is the inner packet
/// exactly, behind the same MACs and the inner ethertype; XDP_PASS / TC "go on".
#[test]
fn decapsulates_every_encapsulation_exactly() {
    let mut d = loaded();
    for v in [Variant::Xdp, Variant::Tc] {
        for encap in ALL_ENCAPS {
            for (tcp, len) in [(true, 0), (true, 1200), (false, 1), (false, 512)] {
                let (f, inner) = encapsulated(encap, local_for(encap), tcp, len, 7);
                let ethertype: u16 = if encap == Encap::Ip6ip6 {
                    0x86dd
                } else {
                    0x0800
                };
                let mut want = DST_MAC.to_vec();
                want.extend_from_slice(&SRC_MAC);
                want.extend_from_slice(&ethertype.to_be_bytes());
                want.extend_from_slice(&inner);
                // The oracle agrees with the hand-made expectation.
                assert_eq!(
                    oracle(&f, &Rules::standard()),
                    Expect::Decap(decap_counter(encap), want.clone())
                );
                check(
                    &mut d,
                    v,
                    &f,
                    &Expect::Decap(decap_counter(encap), want),
                    &format!("{encap:?} tcp={tcp} len={len}"),
                );
            }
        }
    }
}

/// Ethernet padding after the outer packet (short frames) stays behind the inner packet,
/// where the stack trims it as it would have trimmed the outer packet's.
#[test]
fn keeps_trailing_padding() {
    let mut d = loaded();
    for v in [Variant::Xdp, Variant::Tc] {
        let (mut f, inner) = encapsulated(Encap::Ipip, local_for(Encap::Ipip), false, 0, 1);
        f.extend_from_slice(&[0u8; 6]);
        let mut want = [&DST_MAC[..], &SRC_MAC[..], &[0x08, 0x00]].concat();
        want.extend_from_slice(&inner);
        want.extend_from_slice(&[0u8; 6]);
        check(&mut d, v, &f, &Expect::Decap(C::DecapIpip, want), "padded");
    }
}

/// Encapsulated packets for another address pass untouched, or are dropped when asked.
#[test]
fn not_for_us() {
    let mut d = loaded();
    for v in [Variant::Xdp, Variant::Tc] {
        for encap in ALL_ENCAPS {
            let (f, _) = encapsulated(encap, other_for(encap), true, 10, 3);
            d.set_drop_foreign(false).unwrap();
            check(
                &mut d,
                v,
                &f,
                &Expect::Pass(C::PassNotForUs),
                &format!("{encap:?} foreign"),
            );
            d.set_drop_foreign(true).unwrap();
            check(
                &mut d,
                v,
                &f,
                &Expect::Drop(C::DropNotForUs),
                &format!("{encap:?} foreign, strict"),
            );
            d.set_drop_foreign(false).unwrap();
        }
    }
    // An IPv6 address whose first word equals a local IPv4 address is not local, and the
    // other way round: the family bit keeps them apart.
    let v4_as_v6 = Ipv6Addr::from(u128::from(u32::from(LOCAL_V4)) << 96);
    let (f, _) = encapsulated(Encap::Ip6ip6, IpAddr::V6(v4_as_v6), true, 10, 3);
    check(
        &mut d,
        Variant::Xdp,
        &f,
        &Expect::Pass(C::PassNotForUs),
        "v4 address as v6 words",
    );
}

/// Local addresses can be replaced; the program follows.
#[test]
fn local_addresses_follow_the_map() {
    let mut d = loaded();
    let (f, inner) = encapsulated(Encap::Ipip, IpAddr::V4(OTHER_V4), false, 20, 5);
    check(
        &mut d,
        Variant::Xdp,
        &f,
        &Expect::Pass(C::PassNotForUs),
        "before",
    );
    d.set_local_addrs(&[IpAddr::V4(OTHER_V4), IpAddr::V6(LOCAL_V6)])
        .unwrap();
    let listed = d.local_addrs().unwrap();
    assert_eq!(
        listed.into_iter().collect::<Vec<_>>(),
        vec![IpAddr::V4(OTHER_V4), IpAddr::V6(LOCAL_V6)]
    );
    let want = [&DST_MAC[..], &SRC_MAC[..], &[0x08, 0x00], &inner].concat();
    check(
        &mut d,
        Variant::Xdp,
        &f,
        &Expect::Decap(C::DecapIpip, want),
        "after",
    );
    let (g, _) = encapsulated(Encap::Ipip, IpAddr::V4(LOCAL_V4), false, 20, 5);
    check(
        &mut d,
        Variant::Xdp,
        &g,
        &Expect::Pass(C::PassNotForUs),
        "old address removed",
    );
}

/// Traffic that is not encapsulated passes untouched, even to a local address.
#[test]
fn not_encapsulated_passes_untouched() {
    let mut d = loaded();
    let mut frames: Vec<(Vec<u8>, C, &str)> = Vec::new();
    for (v6, tcp) in [(false, true), (false, false), (true, true), (true, false)] {
        let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
        let b = if v6 {
            b.ipv6(CLIENT_V6.octets(), LOCAL_V6.octets(), 64)
        } else {
            b.ipv4(CLIENT_V4.octets(), LOCAL_V4.octets(), 64)
        };
        let mut out = Vec::new();
        if tcp {
            b.tcp(1, 2, 3, 4).syn().write(&mut out, b"hi").unwrap();
        } else {
            b.udp(1, 2).write(&mut out, b"hi").unwrap();
        }
        frames.push((out, C::PassNotEncapsulated, "plain IP to a local address"));
    }
    // ARP request.
    let mut arp = [&[0xff; 6][..], &SRC_MAC[..], &[0x08, 0x06]].concat();
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&SRC_MAC);
    arp.extend_from_slice(&CLIENT_V4.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&LOCAL_V4.octets());
    frames.push((arp, C::PassNotIp, "ARP"));
    // VLAN-tagged encapsulated packet: not parsed (VLAN is the driver's business).
    let (tagged, _) = encapsulated(Encap::Ipip, local_for(Encap::Ipip), true, 4, 2);
    let mut vlan = tagged[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&tagged[12..]);
    frames.push((vlan, C::PassNotIp, "VLAN"));
    // IPv6 with a hop-by-hop header before the tunnel: never sent by the balancer.
    let (f, _) = encapsulated(Encap::Ip6ip6, local_for(Encap::Ip6ip6), true, 4, 2);
    let mut hbh = f.clone();
    hbh[20] = 0;
    frames.push((hbh, C::PassNotEncapsulated, "hop-by-hop"));
    // An IPv6 fragment of something else (UDP) to us.
    let mut frag = f.clone();
    frag[20] = 44;
    frag[54] = 17;
    frames.push((frag, C::PassNotEncapsulated, "fragment of UDP"));
    // GRE to us (protocol 47).
    let (g, _) = encapsulated(Encap::Ipip, local_for(Encap::Ipip), true, 4, 2);
    let mut gre = g.clone();
    gre[23] = 47;
    gre[24..26].copy_from_slice(&[0, 0]);
    let c = ipv4_checksum(&gre[14..34]);
    gre[24..26].copy_from_slice(&c.to_be_bytes());
    frames.push((gre, C::PassNotEncapsulated, "GRE"));

    for v in [Variant::Xdp, Variant::Tc] {
        for (f, c, what) in &frames {
            assert_eq!(
                oracle(f, &Rules::standard()),
                Expect::Pass(*c),
                "oracle on {what}"
            );
            check(&mut d, v, f, &Expect::Pass(*c), what);
        }
    }
}

/// Encapsulated packets for us that are not right are dropped, each under its reason.
#[test]
fn malformed_encapsulated_packets_are_dropped() {
    let mut d = loaded();
    let fix_v4 = |f: &mut Vec<u8>| {
        f[24..26].copy_from_slice(&[0, 0]);
        let c = ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    };
    let (v4, _) = encapsulated(Encap::Ipip, local_for(Encap::Ipip), true, 40, 9);
    let (v6, _) = encapsulated(Encap::Ip6ip6, local_for(Encap::Ip6ip6), true, 40, 9);
    let (v46, _) = encapsulated(Encap::Ip4ip6, local_for(Encap::Ip4ip6), true, 40, 9);
    let mut cases: Vec<(Vec<u8>, C, &str)> = Vec::new();

    // IPv4 outer.
    let mut f = v4.clone();
    f[14] = 0x46;
    f.splice(34..34, [1, 1, 1, 0]);
    let tot = (be16(&f, 16) + 4) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_v4(&mut f);
    cases.push((f, C::DropIpOptions, "outer IPv4 options"));
    let mut f = v4.clone();
    f[14] = 0x44;
    fix_v4(&mut f);
    cases.push((f, C::DropMalformed, "outer IHL 4"));
    let mut f = v4.clone();
    f[20] |= 0x20;
    fix_v4(&mut f);
    cases.push((f, C::DropFragment, "outer MF"));
    let mut f = v4.clone();
    f[20..22].copy_from_slice(&[0, 0x10]);
    fix_v4(&mut f);
    cases.push((f, C::DropFragment, "outer fragment offset"));
    let mut f = v4.clone();
    f[24] ^= 0x01;
    cases.push((f, C::DropBadChecksum, "outer checksum"));
    let mut f = v4.clone();
    let tot = (be16(&f, 16) + 1) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_v4(&mut f);
    cases.push((f, C::DropMalformed, "outer length beyond the frame"));
    let mut f = v4.clone();
    f.push(0);
    let tot = (be16(&f, 16) + 1) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_v4(&mut f);
    cases.push((f, C::DropMalformed, "outer longer than inner"));
    let mut f = v4.clone();
    let tot = (be16(&f, 16) - 1) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_v4(&mut f);
    cases.push((f, C::DropMalformed, "outer shorter than inner"));
    let mut f = v4.clone();
    f[34] = 0x65;
    cases.push((f, C::DropMalformed, "inner version 6 in protocol 4"));
    let mut f = v4[..34].to_vec();
    f[16..18].copy_from_slice(&20u16.to_be_bytes());
    fix_v4(&mut f);
    cases.push((f, C::DropMalformed, "empty tunnel"));

    // IPv6 outer.
    let mut f = v6.clone();
    add16(&mut f, 18, 1);
    cases.push((f, C::DropMalformed, "outer payload beyond the frame"));
    let mut f = v6.clone();
    f.push(0);
    add16(&mut f, 18, 1);
    cases.push((f, C::DropMalformed, "outer payload longer than inner"));
    let mut f = v6.clone();
    f[18..20].copy_from_slice(&0u16.to_be_bytes());
    cases.push((f, C::DropMalformed, "jumbogram"));
    let mut f = v6.clone();
    f[54] = 0x45;
    cases.push((f, C::DropMalformed, "inner version 4 in next header 41"));
    let mut f = v46.clone();
    f[54] = 0x60;
    cases.push((f, C::DropMalformed, "inner version 6 in next header 4"));
    let mut f = v46.clone();
    add16(&mut f, 56, 2);
    cases.push((f, C::DropMalformed, "inner IPv4 length mismatch"));
    let mut f = v6.clone();
    f[20] = 44;
    f.splice(54..54, [41, 0, 0, 1, 0, 0, 0, 7]);
    add16(&mut f, 18, 8);
    cases.push((f, C::DropFragment, "IPv6 fragment of a tunnel packet"));

    for v in [Variant::Xdp, Variant::Tc] {
        for (f, c, what) in &cases {
            assert_eq!(
                oracle(f, &Rules::standard()),
                Expect::Drop(*c),
                "oracle on {what}"
            );
            check(&mut d, v, f, &Expect::Drop(*c), what);
        }
    }
}

/// Every truncation of valid frames: never decapsulated, never read out of bounds (the
/// verifier guarantees the latter; the outcome is checked against the oracle).
#[test]
fn every_truncation() {
    let mut d = loaded();
    for v in [Variant::Xdp, Variant::Tc] {
        for encap in ALL_ENCAPS {
            for tcp in [true, false] {
                let (f, _) = encapsulated(encap, local_for(encap), tcp, 24, 11);
                // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
                for len in 0..14 {
                    let r = match v {
                        Variant::Xdp => d.test_run(&f[..len]),
                        Variant::Tc => d.test_run_tc(&f[..len]),
                    };
                    assert!(
                        r.is_err() || r.unwrap().frame == f[..len],
                        "{v:?} {len}-byte frame"
                    );
                }
                for len in 14..f.len() {
                    let t = &f[..len];
                    let want = oracle(t, &Rules::standard());
                    assert!(
                        !matches!(want, Expect::Decap(..)),
                        "oracle decapsulates a truncated frame"
                    );
                    check(
                        &mut d,
                        v,
                        t,
                        &want,
                        &format!("{encap:?} tcp={tcp} truncated to {len}"),
                    );
                }
            }
        }
    }
}

/// Seeded random mutations of valid frames (bytes flipped, sometimes with the outer IPv4
/// checksum fixed up so the deeper checks are reached, sometimes truncated or extended):
/// both variants agree with the oracle on every one.
#[test]
fn random_mutations_agree_with_the_oracle() {
    let mut d = loaded();
    let mut rng = StdRng::seed_from_u64(0x6d61_726b_6c62);
    let rules = Rules::standard();
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    const N: usize = 6000;
    for i in 0..N {
        let encap = ALL_ENCAPS[rng.random_range(0..3)];
        let dst = if rng.random_ratio(1, 10) {
            other_for(encap)
        } else {
            local_for(encap)
        };
        let (mut f, _) = encapsulated(
            encap,
            dst,
            rng.random_bool(0.5),
            rng.random_range(0..64),
            rng.random_range(0..20000),
        );
        let headers = (14 + if encap == Encap::Ipip { 40 } else { 80 }).min(f.len());
        for _ in 0..rng.random_range(1..=4) {
            let pos = if rng.random_ratio(4, 5) {
                rng.random_range(0..headers)
            } else {
                rng.random_range(0..f.len())
            };
            f[pos] = match rng.random_range(0..4) {
                0 => rng.random(),
                1 => f[pos] ^ (1 << rng.random_range(0..8)),
                2 => f[pos].wrapping_add(1),
                _ => f[pos].wrapping_sub(1),
            };
        }
        match rng.random_range(0..10) {
            0 => f.truncate(rng.random_range(14..=f.len())),
            1 => f.extend((0..rng.random_range(1..8)).map(|_| rng.random::<u8>())),
            _ => {}
        }
        if rng.random_bool(0.5) && f.len() >= 34 && f[12..14] == [0x08, 0x00] {
            f[24..26].copy_from_slice(&[0, 0]);
            let c = ipv4_checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let want = oracle(&f, &rules);
        let key = match &want {
            Expect::Pass(c) | Expect::Drop(c) | Expect::Decap(c, _) => c.label().to_string(),
        };
        *outcomes.entry(key).or_default() += 1;
        let v = if i % 2 == 0 {
            Variant::Xdp
        } else {
            Variant::Tc
        };
        check(&mut d, v, &f, &want, &format!("mutation {i}"));
    }
    eprintln!("mutation outcomes: {outcomes:?}");
    // The mutations reach every decision, not just the first check.
    for c in [
        C::DecapIpip,
        C::DecapIp6ip6,
        C::DecapIp4ip6,
        C::PassNotIp,
        C::PassNotEncapsulated,
        C::PassNotForUs,
    ] {
        assert!(
            outcomes.get(c.label()).copied().unwrap_or(0) > 0,
            "no mutation ended in {c:?}: {outcomes:?}"
        );
    }
    for c in [
        C::DropMalformed,
        C::DropBadChecksum,
        C::DropFragment,
        C::DropIpOptions,
    ] {
        assert!(
            outcomes.get(c.label()).copied().unwrap_or(0) > 0,
            "no mutation ended in {c:?}: {outcomes:?}"
        );
    }
}

/// The counters start at zero and sum to the packets run.
#[test]
fn counters_account_for_every_packet() {
    let mut d = loaded();
    assert_eq!(d.counters().unwrap().total(), 0);
    let (f, _) = encapsulated(Encap::Ip4ip6, local_for(Encap::Ip4ip6), true, 5, 1);
    for _ in 0..5 {
        run(&mut d, Variant::Xdp, &f);
    }
    for _ in 0..3 {
        run(&mut d, Variant::Tc, &f[..60]);
    }
    let c = d.counters().unwrap();
    assert_eq!(c.get(C::DecapIp4ip6), 5);
    assert_eq!(c.decapsulated(), 5);
    // Truncated inside the inner packet: the outer length points past the frame.
    assert_eq!(c.get(C::DropMalformed), 3);
    assert_eq!(c.total(), 8);
    assert_eq!(c.dropped(), 3);
}
