//! The node side of a Service of type LoadBalancer, through real kernels' stacks without
//! Kubernetes: client -> router -> XDP balancer (the Service's LoadBalancer, whose reals are
//! the nodes' addresses) -> node, where the decapsulator runs as the `marklb-decap` DaemonSet
//! runs it (`marklb-agent decap --mode=tc --interface-of=<node address>`) and an iptables DNAT
//! rule plays kube-proxy (ingress address and port -> a "pod" address on the node) -> the
//! reply leaves the node straight to the client, un-NATed to the Service's address.
//!
//! Checked: TC decapsulation hands the inner packet to netfilter, whose DNAT and conntrack
//! work on it as on any packet (the client talks to the Service's address, the server listens
//! on the pod's); connections spread over both nodes; established connections keep their
//! node; the balancer never sees a reply (direct server return); each node's decapsulator
//! counted what the balancer sent it.
//!
//! Needs root and iptables; fails loudly otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use aya::programs::XdpMode;
use marklb_agent::datapath::{Datapath, LoadOptions, Prog};
use marklb_agent::decap::{DecapArgs, DecapMode, run_until};
use marklb_agent::maglev::Backend;
use marklb_agent::model::DatapathModel;
use marklb_agent::vip::VipId;
use marklb_common::{Counter, DecapCounter};
use marklb_tests::netns::{
    IdServer, Tcp, Topology, TopologyOptions, in_netns, ip, netns_exec, require_root,
    spawn_in_netns, tally, tcp_connect_many,
};

/// The Service's ingress address and port.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const PORT: u16 = 80;
/// The port the "pods" listen on (the Service's targetPort).
const POD_PORT: u16 = 8080;
const TABLE_SIZE: u32 = 4099;
const T: Duration = Duration::from_secs(5);

/// The "pod" address on node `n` (1-based).
fn pod_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, n as u8, 1)
}

#[test]
fn decapsulated_traffic_goes_through_kube_proxy_nat_and_replies_skip_the_balancer() {
    require_root("the Services node-path test");
    let topo = Topology::build(TopologyOptions {
        reals: 2,
        vips_v4: vec![VIP],
        vips_v6: vec![],
        client_mtu: 1400,
        ..Default::default()
    })
    .expect("building the topology");
    eprintln!("{}", topo.describe());

    // The balancer: the Service's VIP, the nodes' addresses as reals.
    let mut dp = Datapath::load(&LoadOptions {
        ring_capacity: 2 * TABLE_SIZE + 2,
        conn_table_size: 4096,
        nic_flows: 16,
        pin_dir: None,
    })
    .expect("loading the balancer");
    let mut balancer = DatapathModel::new(&dp);
    let nodes: Vec<Backend> = topo
        .reals
        .iter()
        .map(|r| Backend {
            addr: r.addr(false),
            weight: 1,
        })
        .collect();
    balancer
        .set_vip(
            &mut dp,
            VipId::tcp(IpAddr::V4(VIP), PORT),
            &nodes,
            TABLE_SIZE,
        )
        .expect("set_vip");
    dp.set_config(&topo.balancer_config()).expect("config");
    let lb_iface = topo.lb.port.iface.clone();
    in_netns(&topo.lb.ns, || {
        dp.program(Prog::Balancer)
            .expect("balancer program")
            .attach(&lb_iface, XdpMode::Driver)
            .expect("attach lb0")
    })
    .unwrap();

    // Each node: no Service address of its own (the topology put the VIP on every real's
    // loopback, as DSR reals without kube-proxy need: removed), a pod address, kube-proxy's
    // DNAT, the decapsulator as the DaemonSet runs it.
    let mut stops = Vec::new();
    let mut runners = Vec::new();
    let mut servers: Vec<IdServer<Tcp>> = Vec::new();
    for (i, node) in topo.reals.iter().enumerate() {
        let n = i + 1;
        let pod = pod_addr(n);
        ip(
            Some(&node.ns),
            &["addr", "del", &format!("{VIP}/32"), "dev", "lo"],
        )
        .expect("VIP off lo");
        ip(
            Some(&node.ns),
            &["addr", "add", &format!("{pod}/32"), "dev", "lo"],
        )
        .expect("pod address");
        netns_exec(
            &node.ns,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &format!("{VIP}/32"),
                "-p",
                "tcp",
                "--dport",
                &PORT.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{pod}:{POD_PORT}"),
            ],
        )
        .expect("iptables DNAT (kube-proxy's rule)");
        servers.push(
            IdServer::<Tcp>::start_on(
                &topo,
                &node.ns,
                &node.name,
                &[SocketAddr::new(IpAddr::V4(pod), POD_PORT)],
            )
            .expect("pod server"),
        );
        let args = DecapArgs {
            interface: String::new(),
            interface_of: Some(node.addr(false)),
            addresses: vec![],
            no_interface_addresses: false,
            mode: DecapMode::Tc,
            drop_foreign: false,
            stats_interval: 1,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        runners.push(
            spawn_in_netns(&node.ns, "decap", move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(run_until(args, async move {
                        let _ = stop_rx.await;
                    }))
            })
            .expect("decap thread"),
        );
    }
    // Attached within a moment (the node's address picked its interface).
    std::thread::sleep(Duration::from_millis(500));

    // Connections to the Service's address spread over both nodes' pods.
    let service = SocketAddr::new(IpAddr::V4(VIP), PORT);
    let mut conns = tcp_connect_many(&topo.client.ns, service, 40, T).expect("connections");
    let per_node = tally(conns.iter().map(|c| c.real.as_str()));
    eprintln!("connections per node: {per_node:?}");
    assert_eq!(
        per_node.len(),
        2,
        "both nodes took connections: {per_node:?}"
    );
    // Established connections keep their node.
    for round in 0..3 {
        for c in &mut conns {
            let answered = c.request(&format!("round {round}")).expect("request");
            assert_eq!(answered, c.real, "{} moved", c.local);
        }
    }
    let forwarded = {
        let c = dp.counters().expect("counters");
        c.get(Counter::MarkHit) + c.get(Counter::ConnHit) + c.get(Counter::NewFlow)
    };
    for c in conns {
        c.close();
    }
    std::thread::sleep(Duration::from_millis(300));

    // The decapsulators stop; each counted what the balancer sent its node.
    for s in stops {
        let _ = s.send(());
    }
    let mut decapsulated = 0;
    for (runner, node) in runners.into_iter().zip(&topo.reals) {
        let counters = runner.join().expect("decap thread").expect("decap run");
        let n = counters.get(DecapCounter::DecapIpip);
        eprintln!(
            "{} decapsulated {n} IPIP packets: {}",
            node.name,
            counters.summary()
        );
        assert!(n > 0, "{} decapsulated nothing", node.name);
        decapsulated += n;
    }
    // Every packet the balancer forwarded (until the closes) was decapsulated on a node.
    assert!(
        decapsulated >= forwarded,
        "decapsulated {decapsulated} < forwarded {forwarded}"
    );

    // Direct server return: the balancer saw client packets only.
    let lb = dp.counters().expect("counters");
    let seen: u64 = lb.0.values().sum::<u64>()
        - lb.get(Counter::EventSent)
        - lb.get(Counter::EventLost)
        - lb.get(Counter::EventRateLimited);
    let fwd = lb.get(Counter::MarkHit) + lb.get(Counter::ConnHit) + lb.get(Counter::NewFlow);
    let other = seen - fwd;
    eprintln!("lb0 saw {seen} packets: {fwd} forwarded, {other} other");
    assert!(
        other < 32,
        "lb0 saw {other} packets besides Service traffic: replies went through it?"
    );
    drop(servers);
    drop(dp);
    drop(topo);
}
