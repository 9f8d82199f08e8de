//! A SYN flood must not take the flow marks. The agent runs as a real process with the
//! emulated NIC (topology in `marklb_tests::netns`); 50 held connections carry requests all
//! along, while the client namespace writes spoofed TCP SYNs from a few hundred thousand
//! distinct (address, port) pairs with a raw `AF_PACKET` socket, through the router, to the
//! balancer. Asserted during and after: legitimate connections opened meanwhile get their
//! marks and NIC rules, marks in use stay near the number of legitimate flows (the SYNs
//! raise no new-flow event at all), no request fails, and the agent's memory stays put.
//!
//! Needs root and the agent binary of the same profile (`cargo build -p marklb-agent`).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use marklb_agent::{datapath::PinnedMaps, decap::Decap};
use marklb_common::{FlowKey, IPPROTO_TCP};
use marklb_tests::{
    agent_proc::{Agent, AgentOptions, Manifest, Scrape, Workdir, attach_decaps, write_atomic},
    netns::{Servers, TcpConn, Topology, TopologyOptions, in_netns, require_root, spawn_in_netns},
};

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Timeout of one connection attempt or request.
const T: Duration = Duration::from_secs(5);
/// How long the agent may take to start or to update a counter.
const WAIT: Duration = Duration::from_secs(30);
/// Connections held open, carrying requests through the whole test.
const HELD: usize = 50;
/// Distinct spoofed flows in the flood (one SYN each).
const FLOOD_FLOWS: u32 = 300_000;
/// The flood stops here even if not every SYN went out (a loaded machine).
const FLOOD_MAX: Duration = Duration::from_secs(20);
/// Spoofed sources: 198.18.0.0/15 (benchmarking, routed nowhere here): 131,072 addresses,
/// then the next source port.
const SPOOF_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const SPOOF_ADDRS: u32 = 1 << 17;
/// Growth of the agent's resident memory the test accepts over the flood.
const RSS_SLACK_KIB: u64 = 10 * 1024;

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), TCP_PORT)
}

/// Field order is drop order: the agent first, then the decapsulators, servers, work
/// directory and namespaces.
struct Env {
    agent: Agent,
    _decaps: Vec<Decap>,
    _servers: Servers,
    work: Workdir,
    topo: Topology,
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- marklb-agent log ({}), last lines ----\n{}\n----",
                self.agent.opts.log.display(),
                self.agent.log_tail(60)
            );
        }
    }
}

impl Env {
    fn up() -> Self {
        require_root("the SYN flood test");
        let topo = Topology::build(TopologyOptions {
            reals: 2,
            vips_v4: vec![VIP4],
            client_mtu: 1400,
            ..Default::default()
        })
        .expect("building the topology");
        let decaps = attach_decaps(&topo).expect("decapsulation on the reals");
        let servers = Servers::start(&topo, TCP_PORT, UDP_PORT).expect("servers on the reals");
        let work = Workdir::new("marklb-flood-").expect("working directory");
        let manifest = Manifest::for_topology(&topo, TCP_PORT, UDP_PORT);
        write_atomic(&work.config(), &manifest.to_yaml()).expect("writing the manifest");
        let mut agent =
            Agent::spawn(AgentOptions::for_topology(&topo, &work)).expect("starting the agent");
        agent.wait_ready(WAIT);
        Env {
            agent,
            _decaps: decaps,
            _servers: servers,
            work,
            topo,
        }
    }

    fn connect(&self, n: usize) -> Vec<TcpConn> {
        in_netns(&self.topo.client.ns, || {
            (0..n)
                .map(|_| TcpConn::connect(vip(), T).unwrap_or_else(|e| panic!("connect: {e}")))
                .collect()
        })
        .unwrap()
    }

    fn wait_scrape(&self, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.agent.scrape();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "waited {WAIT:?} for {what}; last scrape:\n{}",
                marks_summary(&s)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The NIC rules (5-tuples) the emulated NIC holds now, read from the agent's pins.
    fn nic_rules(&self) -> BTreeSet<FlowKey> {
        // The agent's pins: `<bpffs>/marklb/<interface>/maps`.
        let dir = self
            .work
            .bpffs()
            .join("marklb")
            .join(&self.topo.lb.port.iface)
            .join("maps");
        let maps = PinnedMaps::open(&dir).expect("pinned maps");
        maps.nic_flows()
            .expect("NIC rules")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

fn installs(s: &Scrape, result: &str) -> f64 {
    s.get("marklb_mark_installs_total", &[("result", result)])
}

fn path(s: &Scrape, p: &str) -> f64 {
    s.get("marklb_datapath_packets_total", &[("path", p)])
}

fn marks_summary(s: &Scrape) -> String {
    s.text
        .lines()
        .filter(|l| {
            (l.starts_with("marklb_mark")
                || l.starts_with("marklb_flow_events")
                || l.starts_with("marklb_nic_rules")
                || l.starts_with("marklb_datapath_packets"))
                && !l.contains("_bucket")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn flow_of(c: &TcpConn) -> FlowKey {
    FlowKey::new(
        c.local.ip(),
        c.local.port(),
        c.peer.ip(),
        c.peer.port(),
        IPPROTO_TCP,
    )
}

/// A raw `AF_PACKET` socket that sends whole frames out of `iface` (and receives nothing:
/// protocol 0).
fn raw_sender(iface: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(iface).expect("interface name");
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// What the flood sent.
#[derive(Debug, Default)]
struct FloodReport {
    sent: u64,
    /// Frames the socket refused for want of buffer space (resent once, then skipped).
    refused: u64,
    took: Duration,
}

/// Writes one spoofed SYN per flow (distinct source address and port) from `src_mac` to
/// `dst_mac` (the router), stopping early when `stop` is set or after [`FLOOD_MAX`].
fn flood(
    iface: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    stop: &AtomicBool,
) -> io::Result<FloodReport> {
    let fd = raw_sender(iface)?;
    let started = Instant::now();
    let mut report = FloodReport::default();
    let mut frame = Vec::with_capacity(64);
    for i in 0..FLOOD_FLOWS {
        if i % 4096 == 0 && (stop.load(Ordering::Relaxed) || started.elapsed() > FLOOD_MAX) {
            break;
        }
        let src = (SPOOF_BASE + i % SPOOF_ADDRS).to_be_bytes();
        let sport = 1024 + (i / SPOOF_ADDRS) as u16;
        frame.clear();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, VIP4.octets(), 64)
            .tcp(sport, TCP_PORT, i.wrapping_mul(2_654_435_761), 64_240)
            .syn()
            .write(&mut frame, &[])
            .expect("SYN frame");
        for attempt in 0..2 {
            let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == frame.len() as isize {
                report.sent += 1;
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
            if attempt == 1 {
                report.refused += 1;
            }
            std::thread::yield_now();
        }
    }
    report.took = started.elapsed();
    Ok(report)
}

/// Requests on the held connections, round after round, until told to stop.
#[derive(Debug, Default)]
struct Requests {
    ok: u64,
    failed: u64,
    first_failure: Option<String>,
}

fn keep_requesting(mut conns: Vec<TcpConn>, stop: Arc<AtomicBool>) -> Requests {
    let mut r = Requests::default();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for c in conns.iter_mut() {
            match c.request(&format!("round {round}")) {
                Ok(real) if real == c.real => r.ok += 1,
                Ok(real) => {
                    r.failed += 1;
                    r.first_failure
                        .get_or_insert(format!("{} moved from {} to {real}", c.local, c.real));
                }
                Err(e) => {
                    r.failed += 1;
                    r.first_failure.get_or_insert(format!("{}: {e}", c.local));
                }
            }
        }
        round += 1;
    }
    r
}

#[test]
fn a_syn_flood_takes_no_marks_and_legitimate_flows_keep_getting_theirs() {
    let env = Env::up();
    let held = env.connect(HELD);
    let mut legit: Vec<TcpConn> = Vec::new();
    let s0 = env.wait_scrape("marks for the held connections", |s| {
        installs(s, "ok") >= HELD as f64
    });
    let rules = env.nic_rules();
    let unmarked: Vec<_> = held
        .iter()
        .filter(|c| !rules.contains(&flow_of(c)))
        .collect();
    assert!(
        unmarked.is_empty(),
        "held connections without a NIC rule: {unmarked:?}"
    );
    let rss0 = rss_kib(env.agent.pid);
    let marks0 = s0.get("marklb_marks_in_use", &[]);
    eprintln!(
        "before the flood: {HELD} held connections, marks in use {marks0}, agent RSS {:.1} MiB",
        rss0 as f64 / 1024.0
    );

    // Requests on the held connections from now until the end.
    let stop_requests = Arc::new(AtomicBool::new(false));
    let requester = {
        let stop = stop_requests.clone();
        std::thread::spawn(move || keep_requesting(held, stop))
    };

    // The flood, from the client namespace.
    let stop_flood = Arc::new(AtomicBool::new(false));
    let flooder = {
        let client = env.topo.client.clone();
        let stop = stop_flood.clone();
        spawn_in_netns(&client.ns, "syn-flood", move || {
            flood(
                &client.port.iface,
                client.port.mac,
                client.gateway.mac,
                &stop,
            )
        })
        .expect("flood thread")
    };

    // Meanwhile: new legitimate connections, a request each, marks and memory sampled.
    let mut max_marks = marks0;
    let mut max_rss = rss0;
    let mut during = 0usize;
    let mut samples = 0;
    let flood_started = Instant::now();
    while !flooder.is_finished() {
        let mut fresh = env.connect(2);
        for c in &mut fresh {
            let real = c
                .request("during the flood")
                .expect("request on a new connection");
            assert_eq!(real, c.real);
        }
        during += fresh.len();
        legit.extend(fresh);
        let s = env.agent.scrape();
        max_marks = max_marks.max(s.get("marklb_marks_in_use", &[]));
        max_rss = max_rss.max(rss_kib(env.agent.pid));
        samples += 1;
        // Far more marks than legitimate flows: the flood is taking them; stop it now so
        // the figures below say how far it got.
        if max_marks > (HELD + legit.len()) as f64 + 64.0 {
            stop_flood.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = flooder.join().expect("flood thread").expect("flood");
    let s_flood = env.agent.scrape();
    eprintln!(
        "flood: {} spoofed SYNs (as many distinct flows) in {:.2} s ({:.0}/s), {} refused by the socket; {during} new connections meanwhile, {samples} samples",
        report.sent,
        report.took.as_secs_f64(),
        report.sent as f64 / report.took.as_secs_f64().max(1e-3),
        report.refused
    );

    // After it: more new connections.
    let mut after = env.connect(20);
    for c in &mut after {
        let real = c
            .request("after the flood")
            .expect("request after the flood");
        assert_eq!(real, c.real);
    }
    legit.extend(after);
    let legit_total = HELD + legit.len();
    let s1 = env.wait_scrape("a mark for every legitimate connection", |s| {
        installs(s, "ok") >= legit_total as f64
    });
    // Every legitimate connection has its NIC rule, the held ones included.
    let rules = env.nic_rules();
    let unmarked: Vec<_> = legit
        .iter()
        .filter(|c| !rules.contains(&flow_of(c)))
        .map(|c| c.local)
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    stop_requests.store(true, Ordering::Relaxed);
    let requests = requester.join().expect("request thread");
    let s2 = env.agent.scrape();
    let rss1 = rss_kib(env.agent.pid);
    max_rss = max_rss.max(rss1);
    max_marks = max_marks.max(s2.get("marklb_marks_in_use", &[]));

    let d = |s: &Scrape, p: &str| path(s, p) - path(&s0, p);
    let ev = |s: &Scrape, r: &str| {
        s.get("marklb_flow_events_total", &[("result", r)])
            - s0.get("marklb_flow_events_total", &[("result", r)])
    };
    let new_flows = d(&s_flood, "new_flow");
    eprintln!(
        "balancer during the flood: new_flow +{new_flows}, established +{}, mark_hit +{}; events sent +{}, rate-limited +{}, lost +{}; connection-table evictions +{}",
        d(&s_flood, "established"),
        d(&s_flood, "mark_hit"),
        ev(&s_flood, "sent"),
        ev(&s_flood, "rate_limited"),
        ev(&s_flood, "lost"),
        s_flood.get("marklb_conn_table_evictions_total", &[])
            - s0.get("marklb_conn_table_evictions_total", &[]),
    );
    eprintln!(
        "legitimate connections: {legit_total} ({HELD} held, {during} during, 20 after); marks in use: before {marks0}, max {max_marks}, after {}; installs ok +{}, no_free_mark +{}, evicted {}",
        s2.get("marklb_marks_in_use", &[]),
        installs(&s1, "ok") - installs(&s0, "ok"),
        installs(&s2, "no_free_mark") - installs(&s0, "no_free_mark"),
        s2.get("marklb_marks_removed_total", &[("reason", "evicted")]),
    );
    eprintln!(
        "agent RSS: before {:.1} MiB, max {:.1} MiB, after {:.1} MiB",
        rss0 as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    eprintln!(
        "requests on the held connections: {} ok, {} failed",
        requests.ok, requests.failed
    );

    // It took no marks and raised no events; legitimate flows got theirs.
    assert!(
        max_marks <= legit_total as f64 + 8.0,
        "marks in use reached {max_marks} with {legit_total} legitimate flows\n{}",
        marks_summary(&s2)
    );
    assert!(
        ev(&s2, "sent") + ev(&s2, "rate_limited") <= 2.0 * (legit_total - HELD) as f64 + 8.0,
        "the flood raised events\n{}",
        marks_summary(&s2)
    );
    // The flood happened: most of its SYNs reached the balancer as new flows.
    assert!(
        report.sent >= 100_000 && new_flows >= 0.5 * report.sent as f64,
        "the flood did not get through: {} sent, new_flow +{new_flows}",
        report.sent
    );
    assert!(
        flood_started.elapsed() > Duration::from_millis(200) && samples >= 1,
        "nothing sampled during the flood"
    );
    assert!(
        unmarked.is_empty(),
        "legitimate connections without a NIC rule after the flood: {unmarked:?}"
    );
    assert_eq!(installs(&s2, "no_free_mark"), installs(&s0, "no_free_mark"));
    assert_eq!(
        requests.failed, 0,
        "failed requests: first {:?}",
        requests.first_failure
    );
    assert!(
        requests.ok >= HELD as u64,
        "requests answered: {}",
        requests.ok
    );
    assert!(
        max_rss <= rss0 + RSS_SLACK_KIB,
        "agent RSS grew from {rss0} KiB to {max_rss} KiB"
    );
}
