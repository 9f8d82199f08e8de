//! ICMP for VIPs: echo replies, "fragmentation needed" / "packet too big" forwarded to the
//! real that owns the quoted flow, and too-big errors for packets that would not fit
//! after encapsulation.

use std::net::IpAddr;

use marklb_agent::{packet::FrameSpec, vip::VipId};
use marklb_common::{CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG, Counter};
use marklb_tests::datapath_fixture::*;

fn router4() -> IpAddr {
    ip("198.51.100.1")
}
fn router6() -> IpAddr {
    ip("2001:db8:ff::1")
}

/// Asserts, beyond "validity preserved", that the reply's checksums are valid.
fn assert_reply_checksums_valid(out: &[u8]) {
    if let Err(e) = reply_checksums_valid(out) {
        panic!("{e}: {}", hex(out));
    }
}

#[test]
fn echo_requests_to_a_vip_are_answered_in_place() {
    let mut fx = Fixture::standard();
    for (client, vip) in [
        (client4(), vip4()),
        (client6(), vip6()),
        (client4(), vip4_allports()),
        (client4(), vip4_empty()),
    ] {
        for len in [0usize, 1, 7, 56, 1001] {
            let f = icmp_echo(client, vip, 0x1234, len as u16, len);
            let r = fx.run_case(&Case::new(
                format!("echo {client} -> {vip}, {len} bytes"),
                f.clone(),
                Expect::EchoReply,
                Counter::IcmpEchoReply,
            ));
            assert_reply_checksums_valid(&r.frame);
            let l4 = if client.is_ipv6() { 54 } else { 34 };
            assert_eq!(r.frame[l4], if client.is_ipv6() { 129 } else { 0 });
            assert_eq!(
                &r.frame[l4 + 4..],
                &f[l4 + 4..],
                "identifier, sequence and data"
            );
        }
    }
    // Ethernet padding behind the request is left in place and out of the checksum.
    let mut f = icmp_echo(client4(), vip4(), 1, 2, 3);
    f.extend_from_slice(&[0xaa; 11]);
    let r = fx.run_case(&Case::new(
        "echo with padding",
        f,
        Expect::EchoReply,
        Counter::IcmpEchoReply,
    ));
    assert_reply_checksums_valid(&r.frame);
}

#[test]
fn echo_is_passed_when_disabled_and_other_icmp_is_passed() {
    let mut fx = Fixture::standard();
    let mut cfg = test_config();
    cfg.flags &= !CFG_F_ICMP_ECHO;
    fx.set_config(cfg);
    fx.run_table(&[
        Case::pass(
            "echo v4, replies off",
            icmp_echo(client4(), vip4(), 1, 1, 8),
            Counter::PassNotVip,
        ),
        Case::pass(
            "echo v6, replies off",
            icmp_echo(client6(), vip6(), 1, 1, 8),
            Counter::PassNotVip,
        ),
    ]);
    fx.set_config(test_config());
    fx.run_table(&[
        Case::pass(
            "echo reply to a VIP",
            icmp_raw(client4(), vip4(), 0, 0, [0, 1, 0, 1], &[1, 2, 3]),
            Counter::PassNotVip,
        ),
        Case::pass(
            "ICMPv6 echo reply to a VIP",
            icmp_raw(client6(), vip6(), 129, 0, [0, 1, 0, 1], &[1, 2]),
            Counter::PassNotVip,
        ),
        Case::pass(
            "port unreachable to a VIP",
            icmp_raw(router4(), vip4(), 3, 3, [0; 4], &[0x45; 28]),
            Counter::PassNotVip,
        ),
        Case::pass(
            "time exceeded to a VIP",
            icmp_raw(router6(), vip6(), 3, 0, [0; 4], &[0x60; 48]),
            Counter::PassNotVip,
        ),
    ]);
}

/// A too-big error about the VIP's reply on `client:cport <-> vip:vport`.
fn too_big_about(
    router: IpAddr,
    vip: IpAddr,
    vport: u16,
    client: IpAddr,
    cport: u16,
    tcp_flow: bool,
    quote: Option<usize>,
) -> Vec<u8> {
    let mut q = vip_reply_packet(vip, vport, client, cport, tcp_flow, 64);
    if let Some(n) = quote {
        q.truncate(n);
    }
    icmp_too_big(router, vip, 1400, &q)
}

#[test]
fn too_big_errors_are_forwarded_to_the_real_of_the_quoted_flow() {
    let mut fx = Fixture::standard();
    let rows: [(IpAddr, IpAddr, IpAddr, usize); 3] = [
        (router4(), client4(), vip4(), 28),
        (router6(), client6(), vip6(), 48),
        (router4(), client4(), vip4_v6reals(), 28),
    ];
    for (router, client, vip, min_quote) in rows {
        for i in 0..8u16 {
            let cport = 60_000 + i;
            // Established: the flow's real (learned by its SYN).
            let syn = tcp(client, cport, vip, 80, true);
            let flow = parse_l3l4(&syn).unwrap().flow();
            let real = fx.model_real(&flow);
            fx.run_case(&Case::forward("SYN", syn, real, Counter::NewFlow));
            for quote in [Some(min_quote), None] {
                let f = too_big_about(router, vip, 80, client, cport, true, quote);
                let expect = Expect::Forward {
                    real,
                    client,
                    sport: cport,
                };
                fx.run_case(&Case::new(
                    format!("too big about {client}:{cport} -> {vip}:80 quote {quote:?}"),
                    f,
                    expect,
                    Counter::IcmpTooBigForwarded,
                ));
            }
            // Not established (UDP, never seen): the ring decides, and nothing is learned.
            let uflow = udp_flow(
                client,
                cport,
                vip,
                if vip == vip4_v6reals() { 999 } else { 53 },
            );
            let ureal = fx.model_real(&uflow);
            let f = too_big_about(
                router,
                vip,
                u16::from_be(uflow.dport_be),
                client,
                cport,
                false,
                Some(min_quote),
            );
            let expect = Expect::Forward {
                real: ureal,
                client,
                sport: cport,
            };
            fx.run_case(&Case::new(
                "too big about an unknown UDP flow",
                f,
                expect,
                Counter::IcmpTooBigForwarded,
            ));
            assert!(
                fx.dp.conn(&uflow).is_none(),
                "forwarding an ICMP error must not learn the flow"
            );
        }
    }
}

#[test]
fn too_big_errors_follow_the_connection_table_after_backends_change() {
    let mut fx = Fixture::standard();
    let vid = VipId::tcp(vip4(), 80);
    let mut learned = Vec::new();
    for i in 0..100u16 {
        let syn = tcp(client4(), 1000 + i, vip4(), 80, true);
        let real = fx.model_real(&parse_l3l4(&syn).unwrap().flow());
        fx.run_case(&Case::forward("SYN", syn, real, Counter::NewFlow));
        learned.push((1000 + i, real));
    }
    fx.update_vip(vid, &backends(&reals4()[0..5]));
    let mut moved = 0;
    for (cport, real) in learned {
        let flow = tcp_flow(client4(), cport, vip4(), 80);
        if fx.model_real(&flow) != real {
            moved += 1;
        }
        let f = too_big_about(router4(), vip4(), 80, client4(), cport, true, None);
        fx.run_case(&Case::new(
            "too big, established",
            f,
            Expect::Forward {
                real,
                client: client4(),
                sport: cport,
            },
            Counter::IcmpTooBigForwarded,
        ));
    }
    assert!(moved > 5, "only {moved} flows would have moved");
}

#[test]
fn too_big_errors_that_cannot_be_attributed() {
    let mut fx = Fixture::standard();
    let quoted_icmp = {
        let mut q = vip_reply_packet(vip4(), 80, client4(), 5, true, 0);
        q[9] = 1; // protocol ICMP
        q
    };
    let quoted_opts = {
        let q = vip_reply_packet(vip4(), 80, client4(), 5, true, 8);
        let mut fr = vec![0u8; 14];
        fr[12] = 0x08;
        fr.extend_from_slice(&q);
        with_ipv4_options(&fr, 1)[14..].to_vec()
    };
    let quoted6_icmp = {
        let mut q = vip_reply_packet(vip6(), 80, client6(), 5, true, 0);
        q[6] = 58;
        q
    };
    let big_quote = vip_reply_packet(vip4(), 80, client4(), 5, true, 1500);
    fx.run_table(&[
        Case::pass(
            "quoted flow is not a VIP's",
            too_big_about(router4(), vip4(), 81, client4(), 5, true, None),
            Counter::PassNotVip,
        ),
        Case::pass(
            "IPv6: quoted flow is not a VIP's",
            too_big_about(router6(), vip6(), 81, client6(), 5, true, None),
            Counter::PassNotVip,
        ),
        Case::drop(
            "quoted protocol ICMP",
            icmp_too_big(router4(), vip4(), 1400, &quoted_icmp),
            Counter::DropUnsupported,
        ),
        Case::drop(
            "IPv6: quoted protocol ICMPv6",
            icmp_too_big(router6(), vip6(), 1400, &quoted6_icmp),
            Counter::DropUnsupported,
        ),
        Case::drop(
            "quoted IPv4 header with options",
            icmp_too_big(router4(), vip4(), 1400, &quoted_opts),
            Counter::DropUnsupported,
        ),
        Case::drop(
            "quote without ports",
            too_big_about(router4(), vip4(), 80, client4(), 5, true, Some(20)),
            Counter::DropMalformed,
        ),
        Case::drop(
            "quote shorter than an IPv4 header",
            too_big_about(router4(), vip4(), 80, client4(), 5, true, Some(12)),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv6: quote without ports",
            too_big_about(router6(), vip6(), 80, client6(), 5, true, Some(40)),
            Counter::DropMalformed,
        ),
        Case::drop(
            "IPv6: quote shorter than the header",
            too_big_about(router6(), vip6(), 80, client6(), 5, true, Some(30)),
            Counter::DropMalformed,
        ),
        Case::drop(
            "quoted flow's VIP has no reals",
            too_big_about(router4(), vip4_empty(), 80, client4(), 5, true, None),
            Counter::DropNoReal,
        ),
        Case::drop(
            "error too big to forward",
            icmp_too_big(router4(), vip4(), 1400, &big_quote),
            Counter::DropMtu,
        ),
    ]);
}

#[test]
fn oversized_packets_get_too_big_errors_with_the_right_mtu() {
    let mut fx = Fixture::standard();
    let v4 = |n| tcp_sized(client4(), 3000, vip4(), 80, n);
    let v46 = |n| tcp_sized(client4(), 3001, vip4_v6reals(), 80, n);
    let v6 = |n| tcp_sized(client6(), 3002, vip6(), 80, n);
    // The oversized packets above were assigned a real (and the connection table learned
    // it) before the size check: the same flows now fit and are established.
    let fwd = |fx: &Fixture, d: &str, f: Vec<u8>| {
        let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
        Case::forward(d, f, real, Counter::ConnHit)
    };
    let mut cases = vec![
        Case::new(
            "IPv4, 1 byte over (real IPv4)",
            v4(1481),
            Expect::TooBigSent { mtu: 1480 },
            Counter::IcmpTooBigSent,
        ),
        Case::new(
            "IPv4, far over",
            v4(2900),
            Expect::TooBigSent { mtu: 1480 },
            Counter::IcmpTooBigSent,
        ),
        Case::new(
            "IPv4 to IPv6 real, 1 byte over",
            v46(1461),
            Expect::TooBigSent { mtu: 1460 },
            Counter::IcmpTooBigSent,
        ),
        Case::new(
            "IPv6, 1 byte over",
            v6(1461),
            Expect::TooBigSent { mtu: 1460 },
            Counter::IcmpTooBigSent,
        ),
        Case::new(
            "IPv6, far over",
            v6(3000),
            Expect::TooBigSent { mtu: 1460 },
            Counter::IcmpTooBigSent,
        ),
    ];
    cases.push(fwd(&fx, "IPv4 exactly fits", v4(1480)));
    cases.push(fwd(&fx, "IPv4 to IPv6 real exactly fits", v46(1460)));
    cases.push(fwd(&fx, "IPv6 exactly fits", v6(1460)));
    // UDP, with traffic class and padding: the quote is the header + 8 bytes, unchanged.
    let mut u = set_tos(
        FrameSpec::udp(client6(), 3003, vip6(), 53)
            .with_payload(1500)
            .build(),
        0xb8,
    );
    u.extend_from_slice(&[0; 4]);
    cases.push(Case::new(
        "IPv6 UDP over, padded",
        u,
        Expect::TooBigSent { mtu: 1460 },
        Counter::IcmpTooBigSent,
    ));
    fx.run_table(&cases);

    // The MTU comes from the configuration.
    let mut cfg = test_config();
    cfg.mtu = 1280;
    fx.set_config(cfg);
    fx.run_table(&[
        Case::new(
            "IPv4 over 1280",
            v4(1261),
            Expect::TooBigSent { mtu: 1260 },
            Counter::IcmpTooBigSent,
        ),
        Case::new(
            "IPv6 over 1280",
            v6(1241),
            Expect::TooBigSent { mtu: 1240 },
            Counter::IcmpTooBigSent,
        ),
    ]);
    cases_fit_after(&mut fx);

    // Without the flag: dropped and counted.
    let mut cfg = test_config();
    cfg.flags &= !CFG_F_ICMP_TOO_BIG;
    fx.set_config(cfg);
    fx.run_table(&[
        Case::drop("IPv4 over, replies off", v4(1481), Counter::DropMtu),
        Case::drop(
            "IPv4 to IPv6 real over, replies off",
            v46(1461),
            Counter::DropMtu,
        ),
        Case::drop("IPv6 over, replies off", v6(1461), Counter::DropMtu),
    ]);
}

fn cases_fit_after(fx: &mut Fixture) {
    let f = tcp_sized(client4(), 3000, vip4(), 80, 1260);
    let real = fx.model_real(&parse_l3l4(&f).unwrap().flow());
    fx.run_case(&Case::forward("IPv4 fits 1280", f, real, Counter::ConnHit));
}

#[test]
fn too_big_error_bytes_field_by_field() {
    // Explicit offsets, on top of the fixture's checks.
    let mut fx = Fixture::standard();
    let f = set_tos(tcp_sized(client4(), 3000, vip4(), 80, 1600), 0x10);
    let r = fx.run(&f, None);
    assert_eq!(r.action, 3);
    let o = &r.frame;
    assert_eq!(o.len(), 70);
    assert_eq!(&o[0..6], &f[6..12]);
    assert_eq!(&o[6..12], &f[0..6]);
    assert_eq!(o[23], 1, "protocol ICMP");
    assert_eq!(&o[26..30], &f[30..34], "from the VIP");
    assert_eq!(&o[30..34], &f[26..30], "to the client");
    assert_eq!((o[34], o[35]), (3, 4), "fragmentation needed");
    assert_eq!(be16(o, 40), 1480, "next-hop MTU");
    assert_eq!(&o[42..70], &f[14..42], "quote: IP header + 8 bytes");
    let (h, _) = etherparse::Ipv4Header::from_slice(&o[14..34]).unwrap();
    assert_eq!(h.calc_header_checksum(), be16(o, 24));
    assert!(etherparse_icmpv4_ok(&o[34..]));

    let f = tcp_sized(client6(), 3000, vip6(), 80, 1600);
    let r = fx.run(&f, None);
    assert_eq!(r.action, 3);
    let o = &r.frame;
    assert_eq!(o.len(), 110);
    assert_eq!(o[20], 58);
    assert_eq!(&o[22..38], &f[38..54]);
    assert_eq!(&o[38..54], &f[22..38]);
    assert_eq!((o[54], o[55]), (2, 0), "packet too big");
    assert_eq!(u32::from_be_bytes(o[58..62].try_into().unwrap()), 1460);
    assert_eq!(&o[62..110], &f[14..62]);
    assert!(etherparse_icmpv6_ok(&o[14..]));
}

/// Regression: the quoted packet of a too-big error was read from the frame, not from the
/// ICMP packet, so bytes behind the IP length (Ethernet padding, garbage) chose a flow and
/// the truncated error was forwarded to a real. Found by the mutation fuzzer; the inputs
/// below were forwarded (`XDP_TX`) or passed before `forward_too_big` bounded the quote by
/// the IP length.
#[test]
fn too_big_quote_must_lie_inside_the_ip_packet() {
    let mut fx = Fixture::standard();
    let found = [
        // IPv4 total length 32: 4 bytes of quote, the rest of the quote is behind the packet.
        "020000000002020000000001080045000020000040004001069fc63364010a00000a0304c7c200000578450000380000400040066eac0a00000ac000020a0050c350",
        // IPv4 total length 29: the quoted header starts inside, ends outside (was passed).
        "02000000000202000000000108004500001d00004000400106a2c63364010a00000a03042ffb00000578450000380000400040066eac0a00000ac000020a0051c350000003e8",
        // IPv6 payload length 24: ICMPv6 header + 16 bytes, quote behind (was forwarded).
        "02000000000202000000000186dd6000000000183a4020010db800ff0000000000000000000120010db8000f00000000000000000010020011f600000578600000000024064020010db8000f0000000000000000001020010db80000000000000000000000100050c350000003e8",
    ];
    for (i, h) in found.iter().enumerate() {
        fx.run_case(&Case::drop(
            format!("fuzzer input {i}"),
            unhex(h),
            Counter::DropMalformed,
        ));
    }
    // Constructed: a valid error whose IP length is cut to end before the ports.
    let q = vip_reply_packet(vip4(), 80, client4(), 5, true, 8);
    for cut in [20usize, 8 + 20 + 2, 8 + 20 + 3] {
        let mut f = icmp_too_big(router4(), vip4(), 1400, &q);
        let tot = (20 + cut) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        fix_ipv4_checksum(&mut f);
        fx.run_case(&Case::drop(
            format!("IPv4 error cut to {cut} bytes of ICMP"),
            f,
            Counter::DropMalformed,
        ));
    }
    let q6 = vip_reply_packet(vip6(), 80, client6(), 5, true, 8);
    for cut in [8usize, 8 + 40, 8 + 40 + 3] {
        let mut f = icmp_too_big(router6(), vip6(), 1400, &q6);
        f[18..20].copy_from_slice(&(cut as u16).to_be_bytes());
        fx.run_case(&Case::drop(
            format!("IPv6 error cut to {cut} bytes of ICMPv6"),
            f,
            Counter::DropMalformed,
        ));
    }
    // The boundary: exactly header + ports inside is enough.
    let mut f = icmp_too_big(router4(), vip4(), 1400, &q);
    f[16..18].copy_from_slice(&((20 + 8 + 20 + 4) as u16).to_be_bytes());
    fix_ipv4_checksum(&mut f);
    let real = fx.model_real(&tcp_flow(client4(), 5, vip4(), 80));
    fx.run_case(&Case::new(
        "IPv4 error with exactly header + ports",
        f,
        Expect::Forward {
            real,
            client: client4(),
            sport: 5,
        },
        Counter::IcmpTooBigForwarded,
    ));
}
