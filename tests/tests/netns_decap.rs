//! End to end through real kernels' stacks: client -> router -> XDP balancer (lb0,
//! `XDP_TX`) -> router -> real (decapsulated by `marklb-decap`) -> reply straight from the
//! real to the client through the router (direct server return).
//!
//! Three VIPs cover the three encapsulations: 10.99.0.1 with IPv4 reals (IPv4-in-IPv4),
//! 10.99.0.2 with the reals' IPv6 addresses (IPv4-in-IPv6) and fd00:99::1 (IPv6-in-IPv6).
//! The reals decapsulate in every mode: real1 XDP (native), real2 TC through tcx, real3 TC
//! through a cls_bpf filter, real4 generic XDP.
//!
//! Checked: real TCP connections and UDP flows reach every real through the balancer; the
//! real each connection landed on is the one in the balancer's connection table; the
//! connections stay on their real and keep working after more traffic; the balancer's
//! per-real packet counts equal what each real decapsulated, per encapsulation; and the
//! load balancer never sees the replies (DSR).
//!
//! Needs root; fails loudly otherwise.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use marklb_agent::{
    datapath::{Datapath, LoadOptions, Prog},
    decap::{Attached, Decap, DecapArgs, DecapMode, TcApi, interface_addrs, run_until},
    maglev::Backend,
    model::DatapathModel,
    vip::VipId,
};
use marklb_common::{Counter, DecapCounter, FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use marklb_tests::netns::{
    Servers, TcpConn, Topology, TopologyOptions, UdpFlow, in_netns, ip, require_root,
    spawn_in_netns, tally, tcp_connect_many, udp_flows,
};

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const FLOWS: usize = 60;
const TABLE_SIZE: u32 = 4099;
const T: Duration = Duration::from_secs(5);

const VIP_4IN4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP_4IN6: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VIP_6IN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

/// Which address family of the reals a VIP is balanced to.
fn reals_v6_for(vip: IpAddr) -> bool {
    vip != IpAddr::V4(VIP_4IN4)
}

struct Setup {
    // Field order is drop order: decapsulators and balancer before the topology.
    decaps: Vec<Decap>,
    dp: Datapath,
    balancer: DatapathModel,
    topo: Topology,
}

fn setup(reals: usize, attach_decaps: bool) -> Setup {
    require_root("the end-to-end netns decap test");
    let topo = Topology::build(TopologyOptions {
        reals,
        vips_v4: vec![VIP_4IN4, VIP_4IN6],
        vips_v6: vec![VIP_6IN6],
        // Room for the outer header: full-sized client segments still fit the real links.
        client_mtu: 1400,
        ..Default::default()
    })
    .expect("building the topology");
    eprintln!("{}", topo.describe());

    // The balancer, programmed with the library, attached natively to lb0.
    let mut dp = Datapath::load(&LoadOptions {
        ring_capacity: 8 * TABLE_SIZE + 2,
        conn_table_size: 4096,
        nic_flows: 16,
        pin_dir: None,
    })
    .expect("loading the balancer");
    let mut balancer = DatapathModel::new(&dp);
    for vip in topo.vips() {
        let backends: Vec<Backend> = topo
            .reals
            .iter()
            .map(|r| Backend {
                addr: r.addr(reals_v6_for(vip)),
                weight: 1,
            })
            .collect();
        for id in [VipId::tcp(vip, TCP_PORT), VipId::udp(vip, UDP_PORT)] {
            balancer
                .set_vip(&mut dp, id, &backends, TABLE_SIZE)
                .expect("set_vip");
        }
    }
    dp.set_config(&topo.balancer_config()).expect("config");
    let lb_iface = topo.lb.port.iface.clone();
    in_netns(&topo.lb.ns, || {
        dp.program(Prog::Balancer)
            .expect("balancer program")
            .attach(&lb_iface, XdpMode::Driver)
            .expect("attach lb0")
    })
    .unwrap();

    // A decapsulator per real, its addresses read from its interface.
    let mut decaps = Vec::new();
    for (i, real) in topo.reals.iter().enumerate().filter(|_| attach_decaps) {
        let mut d = Decap::load().expect("loading marklb-decap");
        let iface = real.port.iface.clone();
        let how = in_netns(&real.ns, || {
            let addrs = interface_addrs(&iface).expect("interface addresses");
            assert_eq!(
                addrs,
                vec![real.addr(false), real.addr(true)],
                "addresses of {iface}"
            );
            d.set_local_addrs(&addrs).unwrap();
            match i % 4 {
                0 => d.attach_xdp(&iface),
                1 => d.attach_tc_with(&iface, TcApi::Tcx),
                2 => d.attach_tc_with(&iface, TcApi::ClsBpf),
                _ => d.attach_xdp_mode(&iface, XdpMode::Skb),
            }
            .expect("attach decap")
        })
        .unwrap();
        let want = [
            Attached::XdpNative,
            Attached::Tcx,
            Attached::ClsBpf,
            Attached::XdpGeneric,
        ][i % 4];
        assert_eq!(how, want, "{} attached as {how:?}", real.name);
        decaps.push(d);
    }
    Setup {
        decaps,
        dp,
        balancer,
        topo,
    }
}

fn flow_key(local: SocketAddr, vip: SocketAddr, proto: u8) -> FlowKey {
    FlowKey::new(local.ip(), local.port(), vip.ip(), vip.port(), proto)
}

/// The balancer sent this flow to the real named `real`.
fn assert_conn_table(s: &Setup, local: SocketAddr, vip: SocketAddr, proto: u8, real: &str) {
    let host = s
        .topo
        .real_by_name(real)
        .unwrap_or_else(|| panic!("unknown real {real}"));
    let want = s
        .balancer
        .real_id(&host.addr(reals_v6_for(vip.ip())))
        .expect("programmed real");
    let entry =
        s.dp.conn(&flow_key(local, vip, proto))
            .unwrap_or_else(|| panic!("no conn entry for {local} -> {vip}"));
    assert_eq!(
        entry.real_id, want,
        "{local} -> {vip} answered by {real}, balancer chose real id {}",
        entry.real_id
    );
}

/// Waits until `read` stops changing (packets in flight have landed), bounded.
fn settle(mut read: impl FnMut() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        if now == last || Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

fn forwarded(dp: &Datapath) -> u64 {
    let c = dp.counters().expect("counters");
    c.get(Counter::MarkHit) + c.get(Counter::ConnHit) + c.get(Counter::NewFlow)
}

#[test]
fn tcp_and_udp_through_balancer_and_decap_with_direct_return() {
    let s = setup(4, true);
    let names: BTreeSet<String> = s.topo.reals.iter().map(|r| r.name.clone()).collect();
    let servers = Servers::start(&s.topo, TCP_PORT, UDP_PORT).expect("servers");
    let mut replies = 0u64;

    let mut all_conns: Vec<(SocketAddr, TcpConn)> = Vec::new();
    let mut all_flows: Vec<(SocketAddr, UdpFlow)> = Vec::new();
    for vip in s.topo.vips() {
        // TCP: FLOWS connections, each greeted by the real that got it.
        let addr = SocketAddr::new(vip, TCP_PORT);
        let conns = tcp_connect_many(&s.topo.client.ns, addr, FLOWS, T)
            .unwrap_or_else(|e| panic!("TCP to {addr}: {e}"));
        let ports: BTreeSet<u16> = conns.iter().map(|c| c.local.port()).collect();
        assert_eq!(ports.len(), FLOWS, "distinct source ports");
        let t = tally(conns.iter().map(|c| c.real.as_str()));
        eprintln!("TCP {addr}: {t:?}");
        assert_eq!(
            t.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "every real gets connections to {addr}"
        );
        for c in &conns {
            assert_eq!(c.local.ip(), s.topo.client.addr(vip.is_ipv6()));
            assert_conn_table(&s, c.local, addr, IPPROTO_TCP, &c.real);
        }
        replies += FLOWS as u64;
        all_conns.extend(conns.into_iter().map(|c| (addr, c)));

        // UDP likewise; the reply comes from the VIP (the sockets are connected to it).
        let addr = SocketAddr::new(vip, UDP_PORT);
        let flows = udp_flows(&s.topo.client.ns, addr, FLOWS, T)
            .unwrap_or_else(|e| panic!("UDP to {addr}: {e}"));
        let t = tally(flows.iter().map(|f| f.real.as_str()));
        eprintln!("UDP {addr}: {t:?}");
        assert_eq!(
            t.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "every real gets flows to {addr}"
        );
        for f in &flows {
            assert_conn_table(&s, f.local, addr, IPPROTO_UDP, &f.real);
        }
        replies += FLOWS as u64;
        all_flows.extend(flows.into_iter().map(|f| (addr, f)));
    }

    // Later traffic on the same connections and flows stays on the same real.
    for (i, (addr, c)) in all_conns.iter_mut().enumerate() {
        for round in 0..3 {
            let real = c
                .request(&format!("conn {i} round {round}"))
                .unwrap_or_else(|e| panic!("{addr} from {}: {e}", c.local));
            assert_eq!(real, c.real, "connection {} -> {addr} moved", c.local);
            replies += 1;
        }
    }
    // Bulk both ways on one connection per (VIP, real): full-sized segments (GRO/GSO on
    // the way, segmentation offload on the reals) through every decap mode.
    let mut bulk_done = BTreeSet::new();
    let big = "x".repeat(200_000);
    for (addr, c) in all_conns.iter_mut() {
        if bulk_done.insert((*addr, c.real.clone())) {
            let real = c
                .request(&big)
                .unwrap_or_else(|e| panic!("bulk {addr} from {}: {e}", c.local));
            assert_eq!(real, c.real);
            replies += 1;
        }
    }
    assert_eq!(bulk_done.len(), 3 * s.topo.reals.len());
    for (i, (addr, f)) in all_flows.iter_mut().enumerate() {
        let real = f
            .ask(&format!("flow {i} again"))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(real, f.real, "UDP flow {} -> {addr} moved", f.local);
        replies += 1;
    }
    let per_real = tally(all_conns.iter().map(|(_, c)| c.real.as_str()));
    for (name, n) in servers.tcp_accepted() {
        assert_eq!(
            per_real.get(&name).copied().unwrap_or(0) as u64,
            n,
            "connections accepted by {name}"
        );
    }
    for (_, c) in all_conns {
        c.close();
    }
    drop(all_flows);

    // Counters: what the balancer forwarded to each real is what that real decapsulated.
    settle(|| forwarded(&s.dp));
    let lb = s.dp.counters().unwrap();
    let fwd = forwarded(&s.dp);
    let decapsulated: u64 = s
        .decaps
        .iter()
        .map(|d| d.counters().unwrap().decapsulated())
        .sum();
    eprintln!(
        "balancer: {:?}",
        lb.0.iter().filter(|(_, v)| **v != 0).collect::<Vec<_>>()
    );
    for (r, d) in s.topo.reals.iter().zip(&s.decaps) {
        let c = d.counters().unwrap();
        eprintln!("{} ({:?}): {}", r.name, d.attachments(), c.summary());
        let v4 =
            s.dp.real_stats(s.balancer.real_id(&r.addr(false)).unwrap())
                .unwrap()
                .packets;
        let v6 =
            s.dp.real_stats(s.balancer.real_id(&r.addr(true)).unwrap())
                .unwrap()
                .packets;
        assert_eq!(
            c.get(DecapCounter::DecapIpip),
            v4,
            "{}: IPv4-in-IPv4 decapsulated vs forwarded",
            r.name
        );
        assert_eq!(
            c.get(DecapCounter::DecapIp6ip6) + c.get(DecapCounter::DecapIp4ip6),
            v6,
            "{}: IPv6-outer decapsulated vs forwarded",
            r.name
        );
        assert!(
            c.get(DecapCounter::DecapIpip) > 0
                && c.get(DecapCounter::DecapIp6ip6) > 0
                && c.get(DecapCounter::DecapIp4ip6) > 0
        );
        assert_eq!(c.dropped(), 0, "{}: decap drops: {}", r.name, c.summary());
    }
    assert_eq!(
        decapsulated, fwd,
        "balancer forwarded {fwd}, reals decapsulated {decapsulated}"
    );
    assert_eq!(
        lb.get(Counter::DropMalformed)
            + lb.get(Counter::DropNoReal)
            + lb.get(Counter::DropEncap)
            + lb.get(Counter::DropMtu)
            + lb.get(Counter::IcmpTooBigSent),
        0,
        "balancer drops"
    );

    // Direct server return: the load balancer's XDP program saw every client packet but
    // none of the replies (at least one per request above); what it saw besides the VIP
    // traffic is neighbour discovery and ARP.
    let seen: u64 = lb.0.values().sum::<u64>()
        - lb.get(Counter::EventSent)
        - lb.get(Counter::EventLost)
        - lb.get(Counter::EventRateLimited);
    let other = seen - fwd;
    eprintln!(
        "lb0 saw {seen} packets: {fwd} forwarded, {other} other; clients got {replies}+ replies"
    );
    assert!(
        other < 32,
        "lb0 saw {other} packets besides VIP traffic: replies went through it?"
    );
    assert!(replies > 4 * other);
    drop(servers);
}

/// The daemon entry point (`marklb-agent decap`): `run_until` in the real's namespace picks
/// the interface's addresses, attaches, decapsulates live traffic, and detaches when told
/// to stop (after which the real is unreachable through the balancer again).
#[test]
fn decap_run_until_attaches_serves_and_detaches() {
    let s = setup(1, false);
    let _servers = Servers::start(&s.topo, TCP_PORT, UDP_PORT).expect("servers");
    let real = s.topo.real(1).clone();
    let vip = SocketAddr::new(IpAddr::V4(VIP_4IN4), TCP_PORT);

    // Not decapsulated yet: the real's stack drops IP-in-IP (no tunnel devices).
    assert!(
        in_netns(&s.topo.client.ns, || TcpConn::connect(
            vip,
            Duration::from_millis(800)
        ))
        .unwrap()
        .is_err()
    );

    settle(|| forwarded(&s.dp));
    let before = forwarded(&s.dp);

    let args = DecapArgs {
        interface: real.port.iface.clone(),
        interface_of: None,
        addresses: vec![],
        no_interface_addresses: false,
        mode: DecapMode::Xdp,
        drop_foreign: false,
        stats_interval: 1,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = spawn_in_netns(&real.ns, "decap-run", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_until(args, async move {
            let _ = stop_rx.await;
        }))
    })
    .unwrap();
    let attached = || {
        ip(Some(&real.ns), &["link", "show", "dev", &real.port.iface])
            .unwrap()
            .contains("xdp")
    };
    let deadline = Instant::now() + T;
    while !attached() {
        assert!(
            Instant::now() < deadline,
            "run_until did not attach within {T:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut conns =
        tcp_connect_many(&s.topo.client.ns, vip, 10, T).expect("connections through the balancer");
    for c in &mut conns {
        assert_eq!(c.real, "real1");
        assert_eq!(c.request("hello").unwrap(), "real1");
    }
    // Let the stats tick and the address refresh run at least once.
    std::thread::sleep(Duration::from_millis(1500));
    for c in conns {
        c.close();
    }
    settle(|| forwarded(&s.dp));

    stop_tx.send(()).unwrap();
    let total = runner.join().expect("runner thread").expect("run_until");
    eprintln!("run_until counters: {}", total.summary());
    assert_eq!(
        total.get(DecapCounter::DecapIpip),
        forwarded(&s.dp) - before,
        "decapsulated what the balancer forwarded"
    );
    assert_eq!(total.dropped(), 0);
    assert!(!attached(), "still attached after stop");
    assert!(
        in_netns(&s.topo.client.ns, || TcpConn::connect(
            vip,
            Duration::from_millis(800)
        ))
        .unwrap()
        .is_err()
    );
}
