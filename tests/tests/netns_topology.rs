//! The network-namespace toolkit on its own: the topology routes both families end to
//! end, topologies built side by side do not collide, and teardown leaves nothing behind
//! (no namespace handle or mount, no task inside a namespace), also when a test panics
//! and when helper threads outlive the topology's handle.
//!
//! Needs root; fails loudly otherwise.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use marklb_tests::netns::{
    TcpConn, TcpIdServer, Topology, TopologyOptions, UdpFlow, UdpIdServer, in_netns, ip, leftovers,
    named_netns_inode, require_root,
};

const T: Duration = Duration::from_secs(5);

fn record(topo: &Topology) -> (Vec<String>, Vec<u64>) {
    let names = topo.namespaces();
    let inodes = names
        .iter()
        .map(|n| named_netns_inode(n).expect("namespace exists"))
        .collect();
    (names, inodes)
}

fn assert_gone(names: &[String], inodes: &[u64]) {
    let left = leftovers(names, inodes);
    assert!(left.is_empty(), "teardown left: {left:#?}");
    let listed = ip(None, &["netns", "list"]).expect("ip netns list");
    for n in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "{n} still listed"
        );
    }
}

/// Client -> router -> real for IPv4 and IPv6 with the TCP and UDP tools (servers on the
/// real's own address: no balancer involved), then a full teardown.
#[test]
fn routes_both_families_and_tears_down_completely() {
    require_root("netns toolkit test");
    let topo = Topology::build(TopologyOptions {
        reals: 2,
        ..Default::default()
    })
    .expect("build");
    eprintln!("{}", topo.describe());
    let (names, inodes) = record(&topo);
    assert_eq!(names.len(), 5, "router, client, lb, 2 reals");
    {
        let real = topo.real(2);
        let addrs = [
            SocketAddr::new(real.addr(false), 7000),
            SocketAddr::new(real.addr(true), 7000),
        ];
        let tcp = TcpIdServer::start_on(&topo, &real.ns, &real.name, &addrs).expect("tcp server");
        let udp = UdpIdServer::start_on(&topo, &real.ns, &real.name, &addrs).expect("udp server");
        for a in addrs {
            let mut conns: Vec<TcpConn> = in_netns(&topo.client.ns, || {
                (0..3)
                    .map(|_| TcpConn::connect(a, T).expect("connect"))
                    .collect()
            })
            .unwrap();
            let ports: std::collections::BTreeSet<u16> =
                conns.iter().map(|c| c.local.port()).collect();
            assert_eq!(ports.len(), 3, "distinct source ports");
            for c in &mut conns {
                assert_eq!(c.real, "real2");
                assert_eq!(c.local.ip(), topo.client.addr(a.is_ipv6()));
                assert_eq!(c.request("again").unwrap(), "real2");
            }
            let mut f = in_netns(&topo.client.ns, || UdpFlow::open(a, T))
                .unwrap()
                .expect("udp");
            assert_eq!(f.real, "real2");
            assert_eq!(f.ask("more").unwrap(), "real2");
            for c in conns {
                c.close();
            }
        }
        assert_eq!(tcp.accepted(), 6);
        assert!(udp.answered() >= 4);
        // The trivial XDP program is on the router's side of the load balancer's link.
        let shown = ip(
            Some(&topo.router_ns),
            &["link", "show", "dev", &topo.lb.gateway.iface],
        )
        .unwrap();
        assert!(shown.contains("xdp"), "no XDP on r-lb: {shown}");
        let off =
            marklb_tests::netns::netns_exec(&topo.client.ns, &["ethtool", "-k", "c0"]).unwrap();
        assert!(
            off.contains("tx-checksumming: off"),
            "tx checksum offload still on: {off}"
        );
    }
    drop(topo);
    assert_gone(&names, &inodes);
}

/// A panic inside a test still tears everything down (Drop runs while unwinding).
#[test]
fn teardown_on_panic() {
    require_root("netns toolkit test");
    let recorded: Mutex<Option<(Vec<String>, Vec<u64>)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(TopologyOptions {
            reals: 1,
            ..Default::default()
        })
        .expect("build");
        *recorded.lock().unwrap() = Some(record(&topo));
        let real = topo.real(1);
        let _server = TcpIdServer::start_on(
            &topo,
            &real.ns,
            &real.name,
            &[SocketAddr::new(real.addr(false), 7001)],
        )
        .unwrap();
        panic!("deliberate panic with a topology and a server alive");
    }));
    assert!(result.is_err());
    let (names, inodes) = recorded.into_inner().unwrap().expect("recorded");
    assert_gone(&names, &inodes);
}

/// Helper threads whose handles outlive the topology are stopped by its teardown.
#[test]
fn teardown_stops_helpers_that_outlive_the_handle() {
    require_root("netns toolkit test");
    let topo = Topology::build(TopologyOptions {
        reals: 1,
        ..Default::default()
    })
    .expect("build");
    let (names, inodes) = record(&topo);
    let real = topo.real(1);
    let addr = SocketAddr::new(real.addr(true), 7002);
    let server = TcpIdServer::start_on(&topo, &real.ns, &real.name, &[addr]).unwrap();
    let udp = UdpIdServer::start_on(&topo, &real.ns, &real.name, &[addr]).unwrap();
    let life = topo.lifeline();
    assert!(life.running() >= 2);
    drop(topo);
    assert_eq!(
        life.running(),
        0,
        "helper threads still running after teardown"
    );
    assert_gone(&names, &inodes);
    drop(server);
    drop(udp);
}

/// Two topologies at once: distinct namespaces, same interface names, both working.
#[test]
fn topologies_side_by_side() {
    require_root("netns toolkit test");
    let a = Topology::build(TopologyOptions {
        reals: 1,
        ..Default::default()
    })
    .expect("build a");
    let b = Topology::build(TopologyOptions {
        reals: 1,
        ..Default::default()
    })
    .expect("build b");
    assert_ne!(a.id, b.id);
    for n in a.namespaces() {
        assert!(!b.namespaces().contains(&n));
    }
    assert_eq!(a.real(1).port.iface, b.real(1).port.iface);
    for t in [&a, &b] {
        let real = t.real(1);
        let addr = SocketAddr::new(IpAddr::V4(real.port.v4), 7003);
        let _s = TcpIdServer::start_on(t, &real.ns, &real.name, &[addr]).unwrap();
        let c = in_netns(&t.client.ns, || TcpConn::connect(addr, T))
            .unwrap()
            .expect("connect");
        assert_eq!(c.real, "real1");
    }
    let (na, ia) = record(&a);
    let (nb, ib) = record(&b);
    drop(a);
    assert_gone(&na, &ia);
    assert!(
        b.namespaces()
            .iter()
            .all(|n| named_netns_inode(n).is_some()),
        "b survives a's teardown"
    );
    drop(b);
    assert_gone(&nb, &ib);
}
