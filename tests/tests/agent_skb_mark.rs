//! End to end with `--mark-delivery skb-mark`: the agent attaches the TC balancer on a tcx
//! link with the emulated NIC's TC program in front of it (it sets `skb->mark` for the flows
//! the agent installed, as mlx5 does with a flower rule's flow tag), on the load balancer
//! namespace's veth; reals decapsulate and answer directly; real TCP and UDP traffic over
//! IPv4 and IPv6. The whole loop runs: new flow -> event -> mark -> rule -> fast path read
//! from `skb->mark`.
//!
//! Needs root and the agent binary of the same profile (`cargo build -p marklb-agent`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use marklb_agent::decap::Decap;
use marklb_tests::{
    agent_proc::{
        Agent, AgentOptions, Manifest, Scrape, Workdir, agent_binary, attach_decaps,
        run_agent_command, write_atomic, xdp_prog_id,
    },
    netns::{
        Servers, TcpConn, Topology, TopologyOptions, UdpFlow, require_root, tcp_connect_many,
        udp_flows_earning_marks,
    },
};

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const T: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    agent: Option<Agent>,
    _decaps: Vec<Decap>,
    _servers: Servers,
    work: Workdir,
    topo: Topology,
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(a) = &self.agent
        {
            eprintln!(
                "---- marklb-agent log, last lines ----\n{}\n----",
                a.log_tail(60)
            );
        }
    }
}

impl Env {
    fn prepare(reals: usize) -> Self {
        require_root("the skb-mark end-to-end tests");
        let topo = Topology::build(TopologyOptions {
            reals,
            vips_v4: vec![VIP4],
            vips_v6: vec![VIP6],
            client_mtu: 1400,
            ..Default::default()
        })
        .expect("building the topology");
        let decaps = attach_decaps(&topo).expect("decapsulation on the reals");
        let servers = Servers::start(&topo, TCP_PORT, UDP_PORT).expect("servers on the reals");
        let work = Workdir::new("marklb-skbmark-").expect("working directory");
        let manifest = Manifest::for_topology(&topo, TCP_PORT, UDP_PORT);
        write_atomic(&work.config(), &manifest.to_yaml()).expect("writing the manifest");
        Env {
            agent: None,
            _decaps: decaps,
            _servers: servers,
            work,
            topo,
        }
    }

    fn start(&mut self, delivery: &str) {
        let mut opts = AgentOptions::for_topology(&self.topo, &self.work);
        opts.extra_args = vec!["--mark-delivery".into(), delivery.into()];
        let mut a = Agent::spawn(opts).expect("starting marklb-agent");
        a.wait_ready(WAIT);
        self.agent = Some(a);
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    fn wait_scrape(&mut self, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.agent().scrape();
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The links the agent pinned for the load balancer's interface.
    fn pinned_links(&self) -> Vec<String> {
        let dir = self
            .work
            .bpffs()
            .join("marklb")
            .join(&self.topo.lb.port.iface);
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with("link"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn path(s: &Scrape, p: &str) -> f64 {
    s.get("marklb_datapath_packets_total", &[("path", p)])
}

fn drops(s: &Scrape) -> f64 {
    s.samples
        .iter()
        .filter(|x| {
            x.name == "marklb_datapath_packets_total"
                && x.labels.get("path").is_some_and(|p| p.starts_with("drop_"))
        })
        .map(|x| x.value)
        .sum()
}

fn keep_real(conns: &mut [TcpConn], flows: &mut [UdpFlow], tag: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let real = c
            .request(&format!("{tag} {i}"))
            .unwrap_or_else(|e| panic!("{tag}: connection {} -> {}: {e}", c.local, c.peer));
        assert_eq!(real, c.real, "{tag}: connection {} moved", c.local);
    }
    for (i, f) in flows.iter_mut().enumerate() {
        let real = f
            .ask(&format!("{tag} {i}"))
            .unwrap_or_else(|e| panic!("{tag}: flow {} -> {}: {e}", f.local, f.vip));
        assert_eq!(real, f.real, "{tag}: flow {} moved", f.local);
    }
}

/// TCP and UDP over IPv4 and IPv6 through the TC balancer: every flow gets a mark, the
/// emulated NIC sets it as `skb->mark`, and established traffic takes the mark fast path
/// (at least 95% of the forwarded packets). No XDP program is on the interface; the two
/// tcx links are pinned. A restarted agent adopts them, and the flows keep their reals.
#[test]
fn skb_mark_delivery_runs_the_whole_mark_loop_on_tcx() {
    let mut env = Env::prepare(2);
    env.start("skb-mark");
    let lb_ns = env.topo.lb.ns.clone();
    let iface = env.topo.lb.port.iface.clone();
    assert_eq!(
        xdp_prog_id(&lb_ns, &iface).unwrap(),
        None,
        "no XDP program with skb-mark delivery"
    );
    assert_eq!(env.pinned_links(), ["tc_link", "tc_nic_link"]);
    let attached = env.agent().log_lines("datapath attached");
    assert!(
        attached[0].contains("mode=\"tcx\"") || attached[0].contains("mode=tcx"),
        "{attached:?}"
    );

    let ns = env.topo.client.ns.clone();
    let v4 = SocketAddr::new(IpAddr::V4(VIP4), TCP_PORT);
    let v6 = SocketAddr::new(IpAddr::V6(VIP6), TCP_PORT);
    let u4 = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
    let u6 = SocketAddr::new(IpAddr::V6(VIP6), UDP_PORT);
    let mut conns = tcp_connect_many(&ns, v4, 30, T).expect("TCP v4");
    conns.extend(tcp_connect_many(&ns, v6, 30, T).expect("TCP v6"));
    let mut flows = udp_flows_earning_marks(&ns, u4, 20, T).expect("UDP v4");
    flows.extend(udp_flows_earning_marks(&ns, u6, 20, T).expect("UDP v6"));
    let reals: std::collections::BTreeSet<_> = conns.iter().map(|c| c.real.clone()).collect();
    assert_eq!(reals.len(), 2, "both reals serve: {reals:?}");

    let before = env.wait_scrape("a mark for every flow", |s| {
        s.get("marklb_mark_installs_total", &[("result", "ok")]) >= 100.0
    });
    for round in 0..5 {
        keep_real(&mut conns, &mut flows, &format!("round {round}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = env.agent().scrape();
    let d = |p: &str| path(&after, p) - path(&before, p);
    let (hit, est, new) = (d("mark_hit"), d("established"), d("new_flow"));
    eprintln!("skb-mark: mark_hit +{hit}, established +{est}, new_flow +{new}");
    assert!(hit >= 500.0, "mark hits +{hit}");
    assert!(
        hit >= 0.95 * (hit + est + new),
        "fast path share {hit} of {}",
        hit + est + new
    );
    let marked = after.get("marklb_emulated_nic_packets_total", &[("result", "marked")])
        - before.get("marklb_emulated_nic_packets_total", &[("result", "marked")]);
    assert!(
        marked >= hit,
        "the emulated NIC marked {marked}, {hit} hits"
    );
    assert_eq!(drops(&after), 0.0);
    // Bulk: 256 KB requests, IPv4 and IPv6. The client's TSO hands the balancer GSO skbs:
    // they are encapsulated with their MSS shrunk, never answered with ICMP too big.
    for vip in [v4, v6] {
        let mut bulk = tcp_connect_many(&ns, vip, 1, T).expect("bulk connection");
        let big = "x".repeat(256 * 1024);
        for _ in 0..3 {
            let real = bulk[0].request(&big).expect("256 KB echoed");
            assert_eq!(real, bulk[0].real);
        }
    }
    let bulk = env.agent().scrape();
    assert_eq!(drops(&bulk), 0.0);
    assert_eq!(path(&bulk, "icmp_too_big_sent"), 0.0);
    let status: serde_json::Value =
        serde_json::from_str(&env.agent().get("/status").unwrap().body).unwrap();
    assert_eq!(status["markDelivery"], "skb-mark", "{status}");

    // kill -9 and restart: the pinned tcx links get the new programs, flows keep going.
    env.agent().kill9();
    keep_real(&mut conns, &mut flows, "agent dead");
    // `status` from the pins, the agent dead: the tcx hook with the emulated NIC's program
    // in front, the flows' marks, at least the hits the last scrape saw.
    let bpffs = env.work.bpffs().display().to_string();
    let args = ["status", "--interface", &iface, "--bpffs", &bpffs, "--json"];
    let (code, out) = run_agent_command(&agent_binary(), &lb_ns, &args, T).unwrap();
    assert!(code.success(), "status: {code}: {out}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let a = &st["attach"];
    assert_eq!(
        (a["hook"].as_str(), a["mode"].as_str()),
        (Some("tcx"), Some("ingress")),
        "{st}"
    );
    assert!(a["prog_id"].as_u64().unwrap() > 0, "{st}");
    assert!(
        a["nic_prog_id"].as_u64().is_some_and(|n| n != a["prog_id"]),
        "{st}"
    );
    assert!(st["marks"]["in_use"].as_u64().unwrap() >= 100, "{st}");
    assert!(
        st["counters"]["mark_hit"].as_f64().unwrap() >= path(&bulk, "mark_hit"),
        "{st}"
    );
    assert_eq!(st["vips"].as_array().unwrap().len(), 4, "{st}");
    env.start("skb-mark");
    let attached = env.agent().log_lines("datapath attached");
    assert!(attached[0].contains("adopted=true"), "{attached:?}");
    keep_real(&mut conns, &mut flows, "after restart");
    assert_eq!(env.pinned_links(), ["tc_link", "tc_nic_link"]);

    // Switching back to XDP delivery removes the tcx links and attaches XDP.
    env.agent().kill9();
    env.start("xdp-metadata");
    assert!(xdp_prog_id(&lb_ns, &iface).unwrap().is_some());
    assert_eq!(env.pinned_links(), ["xdp_link"]);
    keep_real(&mut conns, &mut flows, "after switching to XDP");
}

/// `--hw-backend mellanox` on veth: the capability check refuses the device, the agent says
/// why in its status (`hwBackend: none`, `hwBackendReason` naming the driver) and serves on
/// the software paths; with XDP metadata delivery it also says that mlx5 needs skb-mark.
#[test]
fn mellanox_on_veth_falls_back_to_software_with_the_reason() {
    for (delivery, want) in [
        ("skb-mark", "\"veth\", not mlx5_core"),
        (
            "xdp-metadata",
            "\"veth\", not mlx5_core (a Mellanox/NVIDIA ConnectX NIC); upstream mlx5 delivers the flow tag in skb->mark, not in XDP metadata: use --mark-delivery skb-mark",
        ),
    ] {
        let mut env = Env::prepare(1);
        let mut opts = AgentOptions::for_topology(&env.topo, &env.work);
        opts.hw_backend = "mellanox".into();
        opts.extra_args = vec!["--mark-delivery".into(), delivery.into()];
        let mut a = Agent::spawn(opts).expect("starting marklb-agent");
        a.wait_ready(WAIT);
        env.agent = Some(a);
        let status: serde_json::Value =
            serde_json::from_str(&env.agent().get("/status").unwrap().body).unwrap();
        eprintln!("{delivery}: {}", status["hwBackendReason"]);
        assert_eq!(status["hwBackend"], "none", "{status}");
        assert_eq!(status["offloaded"], false, "{status}");
        let reason = status["hwBackendReason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("mellanox") && reason.contains(want),
            "{delivery}: {reason}"
        );
        let ns = env.topo.client.ns.clone();
        let v4 = SocketAddr::new(IpAddr::V4(VIP4), TCP_PORT);
        let mut conns = tcp_connect_many(&ns, v4, 10, T).expect("TCP v4");
        keep_real(&mut conns, &mut [], "software paths");
        let s = env.agent().scrape();
        assert_eq!(path(&s, "mark_hit"), 0.0);
    }
}
