//! The mellanox backend's tc requests against the reference tool, and its capability check.
//!
//! `tests/fixtures/tc/*.strace` are what iproute2's `tc` sent for the same rules (captured
//! with `tests/fixtures/tc/capture.sh`: strace hexdumps of the netlink sendmsg; this
//! kernel has no cls_flower, so the requests fail after being sent, which does not matter
//! for the capture). Each request the backend builds must be the same bytes, compared
//! attribute by attribute; and netlink-packet-route must parse them back to the rule.
//! On this machine no rule can be installed (no cls_flower, no ConnectX): what needs one is
//! listed in the README.

use std::{net::IpAddr, path::PathBuf, time::Instant};

use marklb_agent::tc::devlink::EswitchMode;
use marklb_agent::{
    marks::{
        mellanox,
        nic_probe::{Capability, Eswitch},
    },
    tc::{
        TcSocket,
        flower::{self, Match, RuleError, RuleId},
    },
};
use marklb_common::{FlowKey, addr_words};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcActionAttribute, TcAttribute, TcFilterFlowerOption, TcOption},
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tc")
}

/// The bytes of the (single) sendmsg in an strace `-e write=` hexdump.
fn captured(name: &str) -> Vec<u8> {
    let path = fixtures().join(format!("{name}.strace"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_hexdump(&text)
}

fn parse_hexdump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(" | ")) {
        // " | 00000  bc 00 00 00 2c 00 05 06  69 ff 0f 6b 00 00 00 00  ascii |"
        let hex = &line[10..line.len().min(10 + 49)];
        out.extend(
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte")),
        );
    }
    assert!(!out.is_empty(), "no hexdump in the capture");
    out
}

fn seq_of(m: &[u8]) -> u32 {
    u32::from_ne_bytes(m[8..12].try_into().unwrap())
}

fn ifindex_of(m: &[u8]) -> i32 {
    i32::from_ne_bytes(m[20..24].try_into().unwrap())
}

/// Attributes after the 36 bytes of headers, as (depth, type, payload) lines, nests opened
/// (for a readable diff when bytes differ).
fn attrs(m: &[u8]) -> Vec<String> {
    fn walk(b: &[u8], depth: usize, out: &mut Vec<String>) {
        let mut off = 0;
        while off + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[off + 2], b[off + 3]]);
            if len < 4 || off + len > b.len() {
                out.push(format!("{depth} malformed at {off}"));
                return;
            }
            let payload = &b[off + 4..off + len];
            out.push(format!("{depth} type {kind:#06x} len {len} {payload:02x?}"));
            // Nests of these requests: options (2), flower act (3), action order (1),
            // act options (0x8002).
            if matches!(kind, 2 | 3 | 0x8002) || (kind == 1 && depth == 2) {
                walk(payload, depth + 1, out);
            }
            off += (len + 3) & !3;
        }
    }
    let mut out = vec![format!("headers {:02x?}", &m[..36])];
    walk(&m[36..], 0, &mut out);
    out
}

fn assert_same(name: &str, ours: &[u8], tc: &[u8]) {
    if ours != tc {
        let (a, b) = (attrs(ours), attrs(tc));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{name}: attribute line {i} differs (ours, tc)");
        }
        assert_eq!(a.len(), b.len(), "{name}: attribute count");
        panic!("{name}: bytes differ:\n ours {ours:02x?}\n tc   {tc:02x?}");
    }
}

fn v4_rule() -> (Match, u32) {
    (
        Match {
            src: "192.0.2.10".parse().unwrap(),
            dst: "10.0.0.10".parse().unwrap(),
            proto: flower::IPPROTO_TCP,
            sport: 40000,
            dport: 80,
        },
        0x1234,
    )
}

fn v6_rule() -> (Match, u32) {
    (
        Match {
            src: "2001:db8::10".parse().unwrap(),
            dst: "2001:db8:f::10".parse().unwrap(),
            proto: flower::IPPROTO_UDP,
            sport: 5353,
            dport: 53,
        },
        65535,
    )
}

fn id(ifindex: i32, prio: u16, handle: u32, v6: bool) -> RuleId {
    RuleId {
        ifindex,
        chain: 0,
        prio,
        handle,
        v6,
    }
}

#[test]
fn requests_are_byte_for_byte_what_iproute2_tc_sends() {
    let tc = captured("flower_v4_tcp");
    let (m, mark) = v4_rule();
    let ours = flower::add_rule(seq_of(&tc), &id(ifindex_of(&tc), 1, 1, false), &m, mark).unwrap();
    assert_same("IPv4 TCP rule", &ours, &tc);

    let tc = captured("flower_v6_udp");
    let (m, mark) = v6_rule();
    let ours = flower::add_rule(seq_of(&tc), &id(ifindex_of(&tc), 2, 7, true), &m, mark).unwrap();
    assert_same("IPv6 UDP rule", &ours, &tc);

    let tc = captured("flower_delete");
    let ours = flower::delete_rule(seq_of(&tc), &id(ifindex_of(&tc), 1, 1, false));
    assert_same("delete", &ours, &tc);

    let tc = captured("flower_delete_prio");
    let ours = flower::delete_priority(seq_of(&tc), ifindex_of(&tc), 0, 2, true);
    assert_same("delete a priority", &ours, &tc);

    let tc = captured("flower_dump_prio");
    let ours = flower::dump_priority(seq_of(&tc), ifindex_of(&tc), 0, 1, false);
    assert_same("dump of one priority", &ours, &tc);

    let tc = captured("qdisc_clsact");
    let ours = flower::qdisc_clsact(seq_of(&tc), ifindex_of(&tc));
    assert_same("clsact qdisc", &ours, &tc);
}

/// netlink-packet-route reads our rule back: flower, the exact 5-tuple, skip_sw, one
/// skbedit action.
#[test]
fn rules_parse_back_with_netlink_packet_route() {
    for (v6, (m, mark)) in [(false, v4_rule()), (true, v6_rule())] {
        let bytes = flower::add_rule(9, &id(3, 1 + v6 as u16, 5, v6), &m, mark).unwrap();
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parses");
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(tc)) = msg.payload
        else {
            panic!("not a new filter: {:?}", msg.payload);
        };
        assert_eq!(tc.header.index, 3);
        assert_eq!(u32::from(tc.header.handle), 5);
        assert_eq!(tc.header.info >> 16, 1 + v6 as u32);
        assert!(tc.attributes.contains(&TcAttribute::Kind("flower".into())));
        let opts: Vec<&TcFilterFlowerOption> = tc
            .attributes
            .iter()
            .filter_map(|a| match a {
                TcAttribute::Options(o) => Some(o),
                _ => None,
            })
            .flatten()
            .filter_map(|o| match o {
                TcOption::Flower(f) => Some(f),
                _ => None,
            })
            .collect();
        let has = |want: &TcFilterFlowerOption| opts.contains(&want);
        assert!(has(&TcFilterFlowerOption::IpProto(m.proto)), "{opts:?}");
        assert!(has(&TcFilterFlowerOption::Flags(
            flower::TCA_CLS_FLAGS_SKIP_SW
        )));
        match (m.src, m.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                assert!(has(&TcFilterFlowerOption::Ipv4Src(s)));
                assert!(has(&TcFilterFlowerOption::Ipv4Dst(d)));
                assert!(has(&TcFilterFlowerOption::TcpSrc(m.sport)));
                assert!(has(&TcFilterFlowerOption::TcpDst(m.dport)));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                assert!(has(&TcFilterFlowerOption::Ipv6Src(s)));
                assert!(has(&TcFilterFlowerOption::Ipv6Dst(d)));
                assert!(has(&TcFilterFlowerOption::UdpSrc(m.sport)));
                assert!(has(&TcFilterFlowerOption::UdpDst(m.dport)));
            }
            _ => unreachable!(),
        }
        let actions: Vec<_> = opts
            .iter()
            .filter_map(|o| match o {
                TcFilterFlowerOption::Actions(a) => Some(a),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(
            actions[0]
                .attributes
                .contains(&TcActionAttribute::Kind("skbedit".into()))
        );
        // The owner cookie a restarted agent recognises its rules by.
        assert!(
            actions[0]
                .attributes
                .contains(&TcActionAttribute::Cookie(flower::OWNER_COOKIE.to_vec()))
        );
    }
}

#[test]
fn marks_outside_the_16_bit_flow_tag_and_other_protocols_are_refused() {
    let (m, _) = v4_rule();
    let rid = id(1, 1, 1, false);
    assert_eq!(flower::add_rule(1, &rid, &m, 0), Err(RuleError::Mark(0)));
    assert_eq!(
        flower::add_rule(1, &rid, &m, 65_536),
        Err(RuleError::Mark(65_536))
    );
    assert!(flower::add_rule(1, &rid, &m, 65_535).is_ok());
    let icmp = Match { proto: 1, ..m };
    assert_eq!(
        flower::add_rule(1, &rid, &icmp, 5),
        Err(RuleError::Proto(1))
    );
    let (m6, _) = v6_rule();
    assert_eq!(flower::add_rule(1, &rid, &m6, 5), Err(RuleError::Family));
}

/// The flow keys the mark manager hands over become the rule's match (ports in host order,
/// the family from the key).
#[test]
fn flow_keys_become_the_exact_match() {
    let (m, _) = v6_rule();
    let key = FlowKey {
        src_be: addr_words(m.src),
        dst_be: addr_words(m.dst),
        sport_be: m.sport.to_be(),
        dport_be: m.dport.to_be(),
        proto: m.proto,
        _pad: [0; 3],
    };
    assert_eq!(mellanox::flow_match(&key), m);
    let (m4, _) = v4_rule();
    let key4 = FlowKey {
        src_be: addr_words(m4.src),
        dst_be: addr_words(m4.dst),
        sport_be: m4.sport.to_be(),
        dport_be: m4.dport.to_be(),
        proto: m4.proto,
        _pad: [0; 3],
    };
    assert_eq!(mellanox::flow_match(&key4), m4);
}

/// On veth, the capability check refuses with the reason (driver, then the offload feature),
/// and the backend cannot be opened.
#[test]
fn veth_is_refused_with_the_reason() {
    marklb_tests::netns::require_root("the capability check on veth");
    let ns = format!("marklb-caps-{}", std::process::id());
    marklb_tests::netns::ip(None, &["netns", "add", &ns]).unwrap();
    let _cleanup = scopeguard(ns.clone());
    marklb_tests::netns::ip(
        Some(&ns),
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
    )
    .unwrap();
    let (cap, open, sent) = marklb_tests::netns::in_netns(&ns, || {
        // Our socket against this kernel: the qdisc is created (then exists), the flower
        // rule is refused with the kernel's own message (no cls_flower here).
        let mut sock = TcSocket::open().unwrap();
        let ifindex = v0_index();
        let seq = sock.next_seq();
        let first = sock.request(seq, &flower::qdisc_clsact(seq, ifindex));
        let seq = sock.next_seq();
        let again = sock.request(seq, &flower::qdisc_clsact(seq, ifindex));
        let (m, mark) = v4_rule();
        let seq = sock.next_seq();
        let rule = sock.request(
            seq,
            &flower::add_rule(seq, &id(ifindex, 1, 1, false), &m, mark).unwrap(),
        );
        (
            Capability::probe("v0"),
            mellanox::Mellanox::open("v0", &|_| false).err(),
            (first, again.map_err(|e| e.errno), rule),
        )
    })
    .unwrap();
    let (first, again, rule) = sent;
    assert!(first.is_ok(), "clsact: {first:?}");
    assert_eq!(again, Err(libc::EEXIST));
    let rule = rule.expect_err("this kernel has no cls_flower");
    println!("flower rule on this kernel: {rule}");
    assert!(
        rule.errno == libc::ENOENT || rule.errno == libc::EOPNOTSUPP,
        "{rule}"
    );
    let cap = cap.expect("ethtool answers for veth");
    assert_eq!(cap.driver, "veth");
    println!("veth: {cap:?}: {}", cap.summary());
    // No bus device, so no devlink instance: the eswitch probe says unsupported, and why.
    match &cap.eswitch {
        Eswitch::Unsupported(why) => assert!(why.contains("no bus device"), "{why}"),
        other => panic!("veth eswitch: {other:?}"),
    }
    assert!(
        cap.summary().contains("eswitch unsupported"),
        "{}",
        cap.summary()
    );
    let why = cap.check("v0").unwrap_err();
    assert!(
        why.contains("\"veth\"") && why.contains("mlx5_core"),
        "{why}"
    );
    assert_eq!(open.as_deref(), Some(why.as_str()));
    // A mlx5 device with the feature off is refused with the command that turns it on.
    let legacy = Eswitch::Mode {
        handle: "pci/0000:03:00.0".into(),
        mode: EswitchMode::Legacy,
    };
    let off = Capability {
        driver: "mlx5_core".into(),
        hw_tc_offload: Some(false),
        eswitch: legacy.clone(),
    };
    let why = off.check("eth1").unwrap_err();
    assert!(why.contains("ethtool -K eth1 hw-tc-offload on"), "{why}");
    let on = Capability {
        driver: "mlx5_core".into(),
        hw_tc_offload: Some(true),
        eswitch: legacy,
    };
    assert_eq!(on.check("eth1"), Ok(()));
    assert_eq!(
        on.summary(),
        "driver mlx5_core, hw-tc-offload on, eswitch legacy (pci/0000:03:00.0)"
    );
    // switchdev: the uplink's rules go to the FDB, which has no mark action.
    let switchdev = Capability {
        eswitch: Eswitch::Mode {
            handle: "pci/0000:03:00.0".into(),
            mode: EswitchMode::Switchdev,
        },
        ..on.clone()
    };
    let why = switchdev.check("eth1").unwrap_err();
    assert!(
        why.contains("switchdev")
            && why.contains("devlink dev eswitch set pci/0000:03:00.0 mode legacy"),
        "{why}"
    );
    // devlink silent (old kernel, no permission): legacy is the default, go ahead.
    let unknown = Capability {
        eswitch: Eswitch::Unsupported("the kernel has no devlink netlink family".into()),
        ..on
    };
    assert_eq!(unknown.check("eth1"), Ok(()));
}

/// The real kernel answers a datagram of several requests with one ack per request, each
/// with its own outcome: the batch reads them back in order (here a qdisc that is created,
/// rules this kernel refuses, the qdisc again: EEXIST). Also times one datagram of
/// MAX_BATCH requests against as many single requests (netlink overhead only: the requests
/// are refused before any driver, so this is not a NIC's insert rate).
#[test]
fn one_datagram_of_several_requests_is_acked_per_message() {
    use marklb_agent::tc::MAX_BATCH;
    marklb_tests::netns::require_root("batched netlink requests on veth");
    let ns = format!("marklb-batch-{}", std::process::id());
    marklb_tests::netns::ip(None, &["netns", "add", &ns]).unwrap();
    let _cleanup = scopeguard(ns.clone());
    marklb_tests::netns::ip(
        Some(&ns),
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
    )
    .unwrap();
    let (outcomes, batched, single) = marklb_tests::netns::in_netns(&ns, || {
        let mut sock = TcSocket::open().unwrap();
        let ifindex = v0_index();
        let (m, mark) = v4_rule();
        let mut msgs = Vec::new();
        let s = sock.next_seq();
        msgs.push((s, flower::qdisc_clsact(s, ifindex)));
        let s = sock.next_seq();
        msgs.push((
            s,
            flower::add_rule(s, &id(ifindex, 1, 1, false), &m, mark).unwrap(),
        ));
        let s = sock.next_seq();
        msgs.push((s, flower::qdisc_clsact(s, ifindex)));
        let s = sock.next_seq();
        let m2 = Match { sport: 40001, ..m };
        msgs.push((
            s,
            flower::add_rule(s, &id(ifindex, 1, 2, false), &m2, mark).unwrap(),
        ));
        let outcomes = sock.batch(&msgs).expect("acks");

        let rules = |sock: &mut TcSocket| -> Vec<(u32, Vec<u8>)> {
            (0..MAX_BATCH as u32)
                .map(|i| {
                    let s = sock.next_seq();
                    let mi = Match {
                        sport: 1000 + i as u16,
                        ..m
                    };
                    (
                        s,
                        flower::add_rule(s, &id(ifindex, 1, 10 + i, false), &mi, 1 + i).unwrap(),
                    )
                })
                .collect()
        };
        let rounds = 50;
        let t = Instant::now();
        for _ in 0..rounds {
            let msgs = rules(&mut sock);
            let out = sock.batch(&msgs).expect("acks");
            assert_eq!(out.len(), MAX_BATCH);
        }
        let batched = t.elapsed() / (rounds * MAX_BATCH as u32);
        let t = Instant::now();
        for _ in 0..rounds {
            for (s, msg) in rules(&mut sock) {
                let _ = sock.request(s, &msg);
            }
        }
        let single = t.elapsed() / (rounds * MAX_BATCH as u32);
        (outcomes, batched, single)
    })
    .unwrap();
    println!("outcomes: {outcomes:?}");
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    let refused = |r: &Result<(), marklb_agent::tc::TcError>| {
        r.as_ref()
            .err()
            .map(|e| e.errno)
            .is_some_and(|e| [libc::ENOENT, libc::EOPNOTSUPP, libc::EINVAL].contains(&e))
    };
    assert!(refused(&outcomes[1]), "{:?}", outcomes[1]);
    assert_eq!(
        outcomes[2].as_ref().err().map(|e| e.errno),
        Some(libc::EEXIST)
    );
    assert!(refused(&outcomes[3]), "{:?}", outcomes[3]);
    println!(
        "netlink round trip per refused rule request: {batched:?} in datagrams of {MAX_BATCH}, {single:?} one by one ({:.1}x)",
        single.as_secs_f64() / batched.as_secs_f64()
    );
}

fn v0_index() -> i32 {
    let c = std::ffi::CString::new("v0").unwrap();
    unsafe { libc::if_nametoindex(c.as_ptr()) as i32 }
}

struct NsGuard(String);
impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = marklb_tests::netns::ip(None, &["netns", "del", &self.0]);
    }
}
fn scopeguard(ns: String) -> NsGuard {
    NsGuard(ns)
}

/// A rule as the kernel lists it in a filter dump (built with netlink-packet-route): the
/// backend reads its priority, handle and the action's packet count (what aging uses).
#[test]
fn rule_statistics_are_read_from_a_filter_dump() {
    use netlink_packet_route::tc::{TcAction, TcHandle, TcMessage, TcStats2, TcStatsBasic};
    let mut tc = TcMessage::default();
    tc.header.index = 3;
    tc.header.handle = TcHandle::from(5u32);
    tc.header.info = (2 << 16) | 0x86ddu16.to_be() as u32;
    let mut basic = TcStatsBasic::default();
    basic.bytes = 4200;
    basic.packets = 42;
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("skbedit".into()),
        TcActionAttribute::Stats(vec![TcStats2::Basic(basic)]),
    ];
    tc.attributes = vec![
        TcAttribute::Kind("flower".into()),
        TcAttribute::Options(vec![TcOption::Flower(TcFilterFlowerOption::Actions(vec![
            action,
        ]))]),
    ];
    let mut msg = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(tc));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    assert_eq!(mellanox::rule_stats(&buf), Some((2, 5, 42)));
    // Not a filter: ignored.
    assert_eq!(mellanox::rule_stats(&flower::qdisc_clsact(1, 3)), None);
}
