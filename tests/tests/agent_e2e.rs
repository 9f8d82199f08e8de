//! End to end with the agent as a real process: `marklb-agent run` (emulated NIC unless
//! stated) on the load balancer namespace's interface, reals decapsulating with
//! `marklb-decap` and answering the client directly (DSR), real TCP and UDP traffic from the
//! client namespace (topology in `marklb_tests::netns`).
//!
//! Each test builds its own topology (unique namespace names), working directory (config,
//! log, bpffs mount point under /run) and agent, so the tests run in parallel; everything is
//! torn down on drop, also when a test panics (the agent's log tail is printed then).
//!
//! Needs root, and the agent binary of the same profile (`cargo build -p marklb-agent`);
//! fails loudly otherwise.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use marklb_agent::{datapath::pin_compat::MapDef, decap::Decap};
use marklb_tests::install::{README_TROUBLESHOOTING, readme_form};
use marklb_tests::{
    agent_proc::{
        Agent, AgentOptions, Manifest, Scrape, Workdir, agent_binary, attach_decaps, http_get_in,
        is_mounted, manifest::multi_document, promtool_check, run_agent_command, write_atomic,
        xdp_prog_id,
    },
    netns::{
        Servers, TcpConn, Topology, TopologyOptions, UdpFlow, in_netns, ip, require_root, tally,
        tcp_connect_many, udp_flows, udp_flows_earning_marks,
    },
    pins,
};

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
/// Timeout of one connection attempt or request.
const T: Duration = Duration::from_secs(5);
/// How long the agent may take to start, reload, or update a counter.
const WAIT: Duration = Duration::from_secs(30);

fn tcp4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), TCP_PORT)
}
fn udp4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT)
}
fn tcp6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), TCP_PORT)
}
fn udp6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), UDP_PORT)
}

/// One test's world. Field order is drop order: the agent is killed first, then the
/// decapsulators detach, the servers stop, the bpffs is unmounted and the namespaces go.
struct Env {
    agent: Option<Agent>,
    decaps: Vec<Decap>,
    servers: Servers,
    work: Workdir,
    topo: Topology,
    manifest: Manifest,
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(a) = &self.agent
        {
            eprintln!(
                "---- marklb-agent log ({}), last lines ----\n{}\n----",
                a.opts.log.display(),
                a.log_tail(60)
            );
        }
    }
}

impl Env {
    /// Topology with `reals` reals, decapsulators, servers and a manifest for every VIP
    /// (TCP and UDP, weight 1); the agent is not started.
    fn prepare(reals: usize) -> Self {
        require_root("the agent end-to-end tests");
        let topo = Topology::build(TopologyOptions {
            reals,
            vips_v4: vec![VIP4],
            vips_v6: vec![VIP6],
            // Room for the outer header: full-sized client segments still fit the real links.
            client_mtu: 1400,
            ..Default::default()
        })
        .expect("building the topology");
        let decaps = attach_decaps(&topo).expect("decapsulation on the reals");
        let servers = Servers::start(&topo, TCP_PORT, UDP_PORT).expect("servers on the reals");
        let work = Workdir::new("marklb-e2e-").expect("working directory");
        let manifest = Manifest::for_topology(&topo, TCP_PORT, UDP_PORT);
        write_atomic(&work.config(), &manifest.to_yaml()).expect("writing the manifest");
        Env {
            agent: None,
            decaps,
            servers,
            work,
            topo,
            manifest,
        }
    }

    fn options(&self) -> AgentOptions {
        AgentOptions::for_topology(&self.topo, &self.work)
    }

    /// Starts the agent and waits for `/readyz`.
    fn start(&mut self, opts: AgentOptions) {
        let mut a = Agent::spawn(opts).expect("starting marklb-agent");
        a.wait_ready(WAIT);
        self.agent = Some(a);
    }

    /// [`Env::prepare`] and [`Env::start`] with the default options.
    fn up(reals: usize) -> Self {
        let mut e = Self::prepare(reals);
        let opts = e.options();
        e.start(opts);
        e
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    fn write_manifest(&mut self, m: Manifest) {
        write_atomic(&self.work.config(), &m.to_yaml()).expect("writing the manifest");
        self.manifest = m;
    }

    fn write_text(&self, text: &str) {
        write_atomic(&self.work.config(), text).expect("writing the manifest");
    }

    fn scrape(&mut self) -> Scrape {
        self.agent().scrape()
    }

    /// Scrapes until `cond` holds.
    fn wait_scrape(&mut self, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.scrape();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "waited {WAIT:?} for {what}; last scrape:\n{}",
                interesting(&s)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self, vip: SocketAddr, n: usize) -> Vec<TcpConn> {
        tcp_connect_many(&self.topo.client.ns, vip, n, T)
            .unwrap_or_else(|e| panic!("TCP to {vip}: {e}"))
    }

    fn udp(&self, vip: SocketAddr, n: usize) -> Vec<UdpFlow> {
        udp_flows(&self.topo.client.ns, vip, n, T).unwrap_or_else(|e| panic!("UDP to {vip}: {e}"))
    }

    /// UDP flows that send enough to earn their marks (a UDP flow's event comes after a
    /// few datagrams, not on its first).
    fn udp_marked(&self, vip: SocketAddr, n: usize) -> Vec<UdpFlow> {
        udp_flows_earning_marks(&self.topo.client.ns, vip, n, T)
            .unwrap_or_else(|e| panic!("UDP to {vip}: {e}"))
    }

    /// Whether a new TCP connection to `vip` gets through within `timeout`.
    fn reachable(&self, vip: SocketAddr, timeout: Duration) -> bool {
        in_netns(&self.topo.client.ns, || TcpConn::connect(vip, timeout))
            .unwrap()
            .is_ok()
    }

    fn real_names(&self) -> BTreeSet<String> {
        self.topo.reals.iter().map(|r| r.name.clone()).collect()
    }
}

/// The marklb lines of a scrape, without histogram buckets (for failure messages).
fn interesting(s: &Scrape) -> String {
    s.text
        .lines()
        .filter(|l| l.starts_with("marklb_") && !l.contains("_bucket"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every connection still answers, from the real that greeted it.
fn assert_keep_real(conns: &mut [TcpConn], tag: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let real = c
            .request(&format!("{tag} {i}"))
            .unwrap_or_else(|e| panic!("{tag}: connection {} -> {}: {e}", c.local, c.peer));
        assert_eq!(real, c.real, "{tag}: connection {} moved", c.local);
    }
}

/// Every UDP flow is still answered by the same real.
fn assert_flows_keep_real(flows: &mut [UdpFlow], tag: &str) {
    for (i, f) in flows.iter_mut().enumerate() {
        let real = f
            .ask(&format!("{tag} {i}"))
            .unwrap_or_else(|e| panic!("{tag}: flow {} -> {}: {e}", f.local, f.vip));
        assert_eq!(real, f.real, "{tag}: flow {} moved", f.local);
    }
}

fn names_of(t: &BTreeMap<String, usize>) -> BTreeSet<String> {
    t.keys().cloned().collect()
}

fn reloads(s: &Scrape, result: &str) -> f64 {
    s.get("marklb_config_reloads_total", &[("result", result)])
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

// ---------------------------------------------------------------------------------------
// 1. Traffic through the agent
// ---------------------------------------------------------------------------------------

/// TCP and UDP to an IPv4 and an IPv6 VIP through the agent reach every real, which answer
/// directly; connections keep their real; the per-VIP and per-real counters saw it all.
/// The next hop is left to the agent to resolve (the lb namespace's default gateway).
#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_reach_every_real() {
    let mut env = Env::prepare(3);
    let mut m = env.manifest.clone();
    m.next_hop_mac = None;
    env.write_manifest(m);
    let opts = env.options();
    env.start(opts);
    let names = env.real_names();

    let mut conns = Vec::new();
    let mut flows = Vec::new();
    for vip in [tcp4(), tcp6()] {
        let c = env.connect(vip, 45);
        let t = tally(c.iter().map(|c| c.real.as_str()));
        eprintln!("TCP {vip}: {t:?}");
        assert_eq!(names_of(&t), names, "every real gets connections to {vip}");
        conns.extend(c);
    }
    for vip in [udp4(), udp6()] {
        let f = env.udp(vip, 45);
        let t = tally(f.iter().map(|f| f.real.as_str()));
        eprintln!("UDP {vip}: {t:?}");
        assert_eq!(names_of(&t), names, "every real gets flows to {vip}");
        flows.extend(f);
    }
    assert_keep_real(&mut conns, "again");
    assert_flows_keep_real(&mut flows, "again");
    let per_real = tally(conns.iter().map(|c| c.real.as_str()));
    for (name, n) in env.servers.tcp_accepted() {
        assert_eq!(
            per_real.get(&name).copied().unwrap_or(0) as u64,
            n,
            "connections accepted by {name}"
        );
    }

    let s = env.scrape();
    for vip in ["tcp-v4-0", "udp-v4-0", "tcp-v6-1", "udp-v6-1"] {
        let n = s.get("marklb_vip_packets_total", &[("vip", vip)]);
        assert!(n >= 90.0, "marklb_vip_packets_total{{vip={vip:?}}} = {n}");
    }
    for r in &env.topo.reals {
        for v6 in [false, true] {
            let a = r.addr(v6).to_string();
            let n = s.get("marklb_real_packets_total", &[("real", a.as_str())]);
            assert!(n > 0.0, "marklb_real_packets_total{{real={a:?}}} = {n}");
        }
    }
    assert_eq!(drops(&s), 0.0, "drops:\n{}", interesting(&s));
    assert_eq!(s.get("marklb_vips", &[]), 4.0);
    assert_eq!(s.get("marklb_reals", &[]), 6.0);
    // Every real decapsulated, without drops, exactly what the balancer forwarded.
    for c in conns {
        c.close();
    }
    let decapsulated = |env: &Env| -> f64 {
        env.decaps
            .iter()
            .map(|d| d.counters().expect("decap counters").decapsulated() as f64)
            .sum()
    };
    for (r, d) in env.topo.reals.iter().zip(&env.decaps) {
        let c = d.counters().unwrap();
        assert!(c.decapsulated() > 0, "{} decapsulated nothing", r.name);
        assert_eq!(c.dropped(), 0, "{}: {}", r.name, c.summary());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let s = env.scrape();
        let fwd = path(&s, "mark_hit") + path(&s, "established") + path(&s, "new_flow");
        let dec = decapsulated(&env);
        if fwd == dec {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the balancer forwarded {fwd}, the reals decapsulated {dec}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// 2. Weights
// ---------------------------------------------------------------------------------------

/// Weights 1:3 give real2 three quarters of new TCP connections and UDP flows. With 400
/// connections the share's standard deviation is ~2.2 points, so the band 0.75 +- 0.08 is
/// +-3.7 sigma; equal weights (0.5) would be 11 sigma away.
#[test]
fn distribution_follows_weights() {
    let mut env = Env::prepare(2);
    let mut m = env.manifest.clone();
    m.table_size = Some(65537);
    let (r1, r2) = (env.topo.real(1).addr(false), env.topo.real(2).addr(false));
    for name in ["tcp-v4-0", "udp-v4-0"] {
        m.vip_mut(name).backends = vec![(r1, 1), (r2, 3)];
    }
    env.write_manifest(m);
    let opts = env.options();
    env.start(opts);

    let conns = env.connect(tcp4(), 400);
    let t = tally(conns.iter().map(|c| c.real.as_str()));
    let share = *t.get("real2").unwrap_or(&0) as f64 / conns.len() as f64;
    eprintln!("TCP 1:3 -> {t:?}, real2 share {share:.3}");
    assert!(
        (0.67..=0.83).contains(&share),
        "real2 (weight 3 of 4) got {share:.3} of TCP connections: {t:?}"
    );
    drop(conns);

    let flows = env.udp(udp4(), 300);
    let t = tally(flows.iter().map(|f| f.real.as_str()));
    let share = *t.get("real2").unwrap_or(&0) as f64 / flows.len() as f64;
    eprintln!("UDP 1:3 -> {t:?}, real2 share {share:.3}");
    // 300 flows: sigma 2.5 points, band +-3.6 sigma.
    assert!(
        (0.66..=0.84).contains(&share),
        "real2 (weight 3 of 4) got {share:.3} of UDP flows: {t:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Reloads that remove a real
// ---------------------------------------------------------------------------------------

/// How a reload is triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// The agent notices the rewritten file (polling every 200 ms).
    Rewrite,
    /// The agent polls rarely; SIGHUP makes it read the file now.
    Sighup,
}

fn removed_real_keeps_the_others(trigger: Trigger) {
    let mut env = Env::prepare(3);
    let mut opts = env.options();
    if trigger == Trigger::Sighup {
        // The first poll happens at start; the next one not within this test.
        opts.reload_interval = "60m".into();
    }
    env.start(opts);

    let mut conns = in_netns(&env.topo.client.ns, || {
        (0..60)
            .map(|_| TcpConn::connect(tcp4(), Duration::from_secs(2)).expect("connect"))
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut flows = env.udp_marked(udp4(), 60);
    let t_tcp = tally(conns.iter().map(|c| c.real.as_str()));
    let t_udp = tally(flows.iter().map(|f| f.real.as_str()));
    eprintln!("before: TCP {t_tcp:?} UDP {t_udp:?}");
    assert_eq!(names_of(&t_tcp), env.real_names());
    assert_eq!(names_of(&t_udp), env.real_names());
    // Every flow has its mark before the real goes, so invalidation is exercised too.
    let before = env.wait_scrape("a mark for every flow", |s| {
        s.get("marklb_mark_installs_total", &[("result", "ok")]) >= 120.0
    });
    let ok0 = reloads(&before, "success");
    assert_eq!(reloads(&before, "failure"), 0.0);

    let real3 = env.topo.real(3).clone();
    let m = env
        .manifest
        .clone()
        .without_backend(real3.addr(false))
        .without_backend(real3.addr(true));
    env.write_manifest(m);
    if trigger == Trigger::Sighup {
        // Not polled: nothing changes until the signal.
        std::thread::sleep(Duration::from_millis(600));
        let s = env.scrape();
        assert_eq!(reloads(&s, "success"), ok0, "reloaded without SIGHUP");
        assert_eq!(s.get("marklb_reals", &[]), 6.0);
        env.agent().signal(libc::SIGHUP);
        env.agent().wait_log("SIGHUP: reloading", 1, WAIT);
    }
    let after = env.wait_scrape("the reload", |s| reloads(s, "success") >= ok0 + 1.0);
    assert_eq!(reloads(&after, "success"), ok0 + 1.0);
    assert_eq!(reloads(&after, "failure"), 0.0);
    assert_eq!(after.get("marklb_config_valid", &[]), 1.0);
    assert_eq!(
        after.get("marklb_reals", &[]),
        4.0,
        "real3's two addresses left"
    );
    let invalidated = after.get("marklb_marks_removed_total", &[("reason", "real_removed")]);
    let on_real3 = t_tcp["real3"] + t_udp["real3"];
    assert!(
        invalidated >= on_real3 as f64,
        "{invalidated} marks invalidated, {on_real3} flows were on real3"
    );
    let applied = env.agent().log_lines("configuration applied");
    assert!(
        applied
            .last()
            .is_some_and(|l| l.contains("4 changed") && l.contains("2 reals retired")),
        "{applied:#?}"
    );

    // Connections on real1 and real2 keep their real; real3's cannot continue (their
    // packets now go to a real that does not know them).
    let (mut kept, lost): (Vec<TcpConn>, Vec<TcpConn>) =
        conns.drain(..).partition(|c| c.real != real3.name);
    assert_keep_real(&mut kept, "after reload");
    for mut c in lost {
        if let Ok(r) = c.request("still there?") {
            panic!("connection {} answered by {r} after real3 left", c.local);
        }
    }
    // UDP flows of real3 move to the others; the rest stay.
    let (mut kept, mut moved): (Vec<UdpFlow>, Vec<UdpFlow>) =
        flows.drain(..).partition(|f| f.real != real3.name);
    assert_flows_keep_real(&mut kept, "after reload");
    for f in &mut moved {
        let r = f.ask("moved?").expect("a moved flow is answered");
        assert_ne!(r, real3.name, "flow {} still on real3", f.local);
    }
    // New connections avoid real3.
    let fresh = env.connect(tcp4(), 40);
    let t = tally(fresh.iter().map(|c| c.real.as_str()));
    eprintln!("after: new TCP {t:?}, {} UDP flows moved", moved.len());
    assert!(!t.contains_key(&real3.name), "{t:?}");
}

/// Rewriting the manifest without real3: its flows move, the others keep their real.
#[test]
fn reload_by_rewrite_removes_a_real_and_keeps_the_other_flows() {
    removed_real_keeps_the_others(Trigger::Rewrite);
}

/// The same change applied by SIGHUP (the agent is not polling the file).
#[test]
fn reload_by_sighup_removes_a_real_and_keeps_the_other_flows() {
    removed_real_keeps_the_others(Trigger::Sighup);
}

// ---------------------------------------------------------------------------------------
// 4. Bad configurations
// ---------------------------------------------------------------------------------------

/// Five kinds of bad file are each rejected (failure counter +1, `marklb_config_valid 0`,
/// a log line naming the problem) while the previous state keeps serving: open
/// connections keep their real, new ones still spread over both reals, nothing in the
/// datapath changed. A good file is then accepted again (as a no-op diff).
#[test]
fn bad_configurations_are_rejected_while_the_last_good_state_serves() {
    let mut env = Env::up(2);
    let good = env.manifest.to_yaml();
    let names = env.real_names();
    let mut conns = env.connect(tcp4(), 30);
    let mut flows = env.udp(udp4(), 20);
    assert_eq!(
        names_of(&tally(conns.iter().map(|c| c.real.as_str()))),
        names
    );

    let real2_v4 = env.topo.real(2).addr(false).to_string();
    let mut dup = env.manifest.clone();
    let mut copy = dup.vip_mut("tcp-v4-0").clone();
    copy.name = Some("tcp-v4-again".into());
    dup.vips.push(copy);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "bad YAML",
            good.replace("      port: 80\n", "     port: 80\n"),
            vec!["invalid LoadBalancer manifest", "at line"],
        ),
        (
            "unknown field",
            good.replacen("weight: 1", "wieght: 1", 1),
            vec!["spec.vips[0].backends[0]", "unknown field `wieght`"],
        ),
        (
            "bad address",
            good.replace(&format!("\"{real2_v4}\""), "\"10.201.2.300\""),
            vec!["spec.vips[0].backends[1].address", "10.201.2.300"],
        ),
        (
            "duplicate VIP",
            dup.to_yaml(),
            vec!["spec.vips[4]", "duplicate VIP 10.99.0.1:80/TCP"],
        ),
        (
            "non-prime table size",
            good.replace("maglevTableSize: 4099", "maglevTableSize: 4096"),
            vec!["spec.hashing.maglevTableSize", "not a prime"],
        ),
        (
            // What a file caught half-written looks like; applying it would remove every VIP.
            "empty spec",
            good[..good.find("spec:").expect("spec") + "spec:\n".len()].to_string(),
            vec!["spec: empty"],
        ),
    ];
    let mut failures = 0.0;
    for (what, text, expect) in &cases {
        assert_ne!(*text, good, "{what}: the case changes the file");
        let s0 = env.scrape();
        env.write_text(text);
        failures += 1.0;
        let s = env.wait_scrape(&format!("{what} rejected"), |s| {
            reloads(s, "failure") >= failures
        });
        assert_eq!(reloads(&s, "failure"), failures, "{what}");
        assert_eq!(reloads(&s, "success"), reloads(&s0, "success"), "{what}");
        assert_eq!(s.get("marklb_config_valid", &[]), 0.0, "{what}");
        assert_eq!(s.get("marklb_vips", &[]), 4.0, "{what}: VIPs changed");
        assert_eq!(s.get("marklb_reals", &[]), 4.0, "{what}: reals changed");
        let rejected = env
            .agent()
            .wait_log("configuration rejected", failures as usize, WAIT);
        let line = rejected.last().expect("a rejection line");
        eprintln!("{what}: {line}");
        for e in expect {
            assert!(
                line.contains(e),
                "{what}: the log line does not name {e:?}: {line}"
            );
        }
        // The previous state serves.
        assert_keep_real(&mut conns, what);
        assert_flows_keep_real(&mut flows, what);
        let fresh = env.connect(tcp4(), 12);
        assert!(
            fresh.iter().all(|c| names.contains(&c.real)),
            "{what}: {fresh:?}"
        );
        conns.extend(fresh);
    }
    assert_eq!(
        names_of(&tally(conns.iter().map(|c| c.real.as_str()))),
        names
    );

    // A missing file is one failure, not one per poll, and the state keeps serving.
    std::fs::remove_file(env.work.config()).expect("removing the manifest");
    failures += 1.0;
    env.wait_scrape("missing file reported", |s| {
        reloads(s, "failure") >= failures
    });
    std::thread::sleep(Duration::from_secs(1)); // five more polls at 200 ms
    assert_eq!(reloads(&env.scrape(), "failure"), failures, "reported once");
    assert_keep_real(&mut conns, "missing file");

    // Good again: accepted, and nothing changes in the datapath.
    let ok0 = reloads(&env.scrape(), "success");
    env.write_text(&good);
    let s = env.wait_scrape("the good file accepted", |s| reloads(s, "success") > ok0);
    assert_eq!(s.get("marklb_config_valid", &[]), 1.0);
    assert_eq!(reloads(&s, "failure"), failures);
    let applied = env.agent().log_lines("configuration applied");
    let last = applied.last().expect("applied line");
    assert!(
        last.contains("0 changed") && last.contains("4 unchanged"),
        "{last}"
    );
    assert_keep_real(&mut conns, "good again");
    assert_flows_keep_real(&mut flows, "good again");
    assert_eq!(drops(&s), 0.0, "{}", interesting(&s));
}

// ---------------------------------------------------------------------------------------
// 5. kill -9 and restart
// ---------------------------------------------------------------------------------------

/// `kill -9` with connections open: the pinned datapath keeps serving while no agent runs,
/// and an agent restarted on the same pin directory adopts it: every connection and flow
/// keeps working on its real, no mark is lost, the counters continue, marks keep hitting.
#[test]
fn kill_9_and_restart_adopts_the_pinned_datapath_without_losing_flows() {
    let mut env = Env::up(3);
    let names = env.real_names();
    let mut conns = env.connect(tcp4(), 60);
    conns.extend(env.connect(tcp6(), 30));
    let mut flows = env.udp_marked(udp4(), 30);
    assert_eq!(
        names_of(&tally(conns.iter().map(|c| c.real.as_str()))),
        names
    );
    let before = env.wait_scrape("a mark for every flow", |s| {
        s.get("marklb_mark_installs_total", &[("result", "ok")]) >= 120.0
            && s.get("marklb_nic_rules", &[]) >= 120.0
    });
    let rules0 = before.get("marklb_nic_rules", &[]);
    let marks0 = before.get("marklb_marks_in_use", &[]);
    let first_pid = env.agent().pid;

    let st = env.agent().kill9();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    // Nobody runs the agent: the datapath keeps forwarding, marks included.
    assert_keep_real(&mut conns, "agent dead");
    assert_flows_keep_real(&mut flows, "agent dead");
    let orphan = env.connect(tcp4(), 6);
    assert!(orphan.iter().all(|c| names.contains(&c.real)));
    conns.extend(orphan);

    let opts = env.options();
    env.start(opts);
    assert_ne!(env.agent().pid, first_pid);
    let adopted = env.agent().log_lines("adopted the pinned datapath");
    assert_eq!(adopted.len(), 1, "log:\n{}", env.agent().log());
    eprintln!("{}", adopted[0]);
    let attached = env.agent().log_lines("datapath attached");
    assert!(
        attached.len() == 1 && attached[0].contains("adopted=true"),
        "{attached:?}"
    );
    let after = env.scrape();
    let (rules1, marks1) = (
        after.get("marklb_nic_rules", &[]),
        after.get("marklb_marks_in_use", &[]),
    );
    eprintln!("NIC rules {rules0} -> {rules1}, marks in use {marks0} -> {marks1}");
    assert!(rules1 >= rules0, "NIC rules {rules0} -> {rules1}");
    assert!(marks1 >= marks0, "marks in use {marks0} -> {marks1}");
    // The restarted agent's first apply re-claims the adopted VIPs (identical rings stay
    // in place) and adds, changes, removes or retires nothing.
    let applied = env.agent().log_lines("configuration applied");
    assert!(
        applied.len() == 1
            && applied[0].contains("0 VIPs added")
            && applied[0].contains("0 changed")
            && applied[0].contains("4 adopted")
            && applied[0].contains("0 removed")
            && applied[0].contains("0 reals retired"),
        "{applied:?}"
    );
    // Counters continue from the pinned maps.
    for p in ["new_flow", "mark_hit", "established"] {
        assert!(
            path(&after, p) >= path(&before, p),
            "{p}: {} -> {}",
            path(&before, p),
            path(&after, p)
        );
    }

    assert_keep_real(&mut conns, "after restart");
    assert_flows_keep_real(&mut flows, "after restart");
    let hits0 = path(&after, "mark_hit");
    for round in 0..3 {
        assert_keep_real(&mut conns, &format!("round {round}"));
    }
    let s = env.scrape();
    assert!(
        path(&s, "mark_hit") >= hits0 + 270.0,
        "mark hits {} -> {} after 270 requests",
        hits0,
        path(&s, "mark_hit")
    );
    assert_eq!(drops(&s), 0.0, "{}", interesting(&s));
}

/// An agent of the previous version left `COUNTERS` with one entry fewer (a counter was
/// added since): the restarted agent replaces that pin (a warning names it and what
/// differed), adopts every other pinned map and serves on: connections keep their real (the
/// connection table is adopted) and the fresh counters count.
#[test]
fn a_restart_over_a_pin_of_another_definition_replaces_it_and_keeps_connections() {
    let mut env = Env::up(2);
    let maps = env
        .work
        .bpffs()
        .join("marklb")
        .join(&env.topo.lb.port.iface)
        .join("maps");
    let mut conns = env.connect(tcp4(), 30);
    env.agent().kill9();

    let counters = maps.join("COUNTERS");
    let (def, _) = pins::pinned(&counters);
    std::fs::remove_file(&counters).expect("unpinning COUNTERS");
    let old = MapDef {
        max_entries: def.max_entries - 1,
        ..def
    };
    let old_id = pins::pin_map(&counters, old);

    let opts = env.options();
    env.start(opts);
    let warned = env
        .agent()
        .log_lines("does not match this agent's definition");
    assert!(
        warned.len() == 1 && warned[0].contains("COUNTERS") && warned[0].contains("max entries"),
        "log:\n{}",
        env.agent().log()
    );
    eprintln!("{}", warned[0]);
    assert_eq!(
        env.agent().log_lines("adopted the pinned datapath").len(),
        1,
        "log:\n{}",
        env.agent().log()
    );
    let (now, id) = pins::pinned(&counters);
    assert_eq!(now, def, "COUNTERS pinned with this agent's definition");
    assert_ne!(id, old_id, "a fresh COUNTERS map");

    assert_keep_real(&mut conns, "after the restart");
    let s = env.scrape();
    let counted: f64 = s
        .samples
        .iter()
        .filter(|x| x.name == "marklb_datapath_packets_total")
        .map(|x| x.value)
        .sum();
    eprintln!("packets counted in the fresh COUNTERS: {counted}");
    assert!(counted >= 30.0, "{}", interesting(&s));
    assert_eq!(drops(&s), 0.0, "{}", interesting(&s));
}

/// The XDP attach mode of `iface` as `ip link` shows it: `xdp` (native), `xdpgeneric`,
/// `xdpoffload`, `xdpmulti`, or None.
fn ip_link_xdp_mode(ns: &str, iface: &str) -> Option<String> {
    let out = marklb_tests::netns::ip(Some(ns), &["link", "show", "dev", iface]).unwrap();
    out.split_whitespace()
        .find(|w| ["xdp", "xdpgeneric", "xdpoffload", "xdpmulti"].contains(w))
        .map(str::to_string)
}

/// `agent.xdpMode` changed on a node that serves: the agent serving in generic mode is
/// restarted with `--xdp-mode native`; it adopts the pinned datapath, moves it to native mode
/// (`ip link` shows `xdp`, not `xdpgeneric`), and the held connections keep their real (the
/// connection table is the pinned one) while new ones reach the VIP. A restart with `auto`
/// keeps whatever mode is attached.
#[test]
fn an_explicit_xdp_mode_re_attaches_an_adopted_datapath_keeping_connections() {
    let mut env = Env::prepare(2);
    let (ns, iface) = (env.topo.lb.ns.clone(), env.topo.lb.port.iface.clone());
    let with_mode = |env: &Env, mode: &str| {
        let mut o = env.options();
        o.extra_args.extend(["--xdp-mode".into(), mode.into()]);
        o
    };
    let opts = with_mode(&env, "generic");
    env.start(opts);
    assert_eq!(ip_link_xdp_mode(&ns, &iface).as_deref(), Some("xdpgeneric"));
    let mut conns = env.connect(tcp4(), 20);
    let mut flows = env.udp(udp4(), 10);
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");

    let opts = with_mode(&env, "native");
    env.start(opts);
    assert_eq!(
        ip_link_xdp_mode(&ns, &iface).as_deref(),
        Some("xdp"),
        "native mode after the restart with --xdp-mode native; log:\n{}",
        env.agent().log()
    );
    let moved = env.agent().log_lines("re-attached the adopted datapath");
    assert!(
        moved.len() == 1 && moved[0].contains("from=\"generic\""),
        "{moved:?}"
    );
    eprintln!("re-attach (gap_us: detach to attached): {}", moved[0]);
    let s = env.scrape();
    let mode = s.by_label("marklb_datapath_info", "xdp_mode");
    assert_eq!(
        mode.keys().collect::<Vec<_>>(),
        ["native"],
        "{}",
        interesting(&s)
    );
    assert_keep_real(&mut conns, "after the re-attach");
    assert_flows_keep_real(&mut flows, "after the re-attach");
    let fresh = env.connect(tcp4(), 6);
    assert!(fresh.iter().all(|c| env.real_names().contains(&c.real)));

    // `auto` accepts the attached mode: no re-attach, native stays.
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    let opts = with_mode(&env, "auto");
    env.start(opts);
    assert!(
        env.agent()
            .log_lines("re-attached the adopted datapath")
            .is_empty(),
        "{}",
        env.agent().log()
    );
    assert_eq!(ip_link_xdp_mode(&ns, &iface).as_deref(), Some("xdp"));
    assert_keep_real(&mut conns, "after the auto restart");
}

/// The requested mode cannot be attached: veth refuses native XDP while its peer's MTU is
/// above a page (generic XDP does not care). The agent restarted with `--xdp-mode native`
/// puts generic back at once, says so, keeps serving the held connections, and reports the
/// mode it really serves in.
#[test]
fn a_refused_xdp_mode_puts_the_previous_mode_back_and_keeps_serving() {
    let mut env = Env::prepare(2);
    let (ns, iface) = (env.topo.lb.ns.clone(), env.topo.lb.port.iface.clone());
    let mut opts = env.options();
    opts.extra_args
        .extend(["--xdp-mode".into(), "generic".into()]);
    env.start(opts.clone());
    let mut conns = env.connect(tcp4(), 20);
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    let gateway = env.topo.lb.gateway.clone();
    marklb_tests::netns::ip(
        Some(&gateway.ns),
        &["link", "set", "dev", &gateway.iface, "mtu", "9000"],
    )
    .unwrap();

    opts.extra_args = vec!["--xdp-mode".into(), "native".into()];
    env.start(opts);
    let refused = env
        .agent()
        .log_lines("the requested XDP mode cannot be attached");
    assert!(
        refused.len() == 1
            && refused[0].contains("requested=\"native\"")
            && refused[0].contains("serving=\"generic\""),
        "log:\n{}",
        env.agent().log()
    );
    eprintln!("refused (gap_us: detach to generic again): {}", refused[0]);
    assert_eq!(ip_link_xdp_mode(&ns, &iface).as_deref(), Some("xdpgeneric"));
    let s = env.scrape();
    let mode = s.by_label("marklb_datapath_info", "xdp_mode");
    assert_eq!(
        mode.keys().collect::<Vec<_>>(),
        ["generic"],
        "{}",
        interesting(&s)
    );
    assert_keep_real(&mut conns, "after the refused re-attach");
    let fresh = env.connect(tcp4(), 6);
    assert!(fresh.iter().all(|c| env.real_names().contains(&c.real)));
}

// ---------------------------------------------------------------------------------------
// 6. Marks and the fast path
// ---------------------------------------------------------------------------------------

/// Drives `conns` connections and `udp` flows, waits for the agent to have seen their
/// events, then sends `rounds` more requests on each; returns the scrapes before and after
/// the established traffic.
fn established_traffic(
    env: &mut Env,
    conns: usize,
    udp: usize,
    rounds: usize,
    marks: bool,
) -> (Scrape, Scrape) {
    let mut c = env.connect(tcp4(), conns);
    let mut f = env.udp_marked(udp4(), udp);
    let n = (conns + udp) as f64;
    let before = env.wait_scrape("the new-flow events (and marks)", |s| {
        s.get("marklb_flow_events_total", &[("result", "sent")]) >= n
            && (!marks || s.get("marklb_mark_installs_total", &[("result", "ok")]) >= n)
    });
    for round in 0..rounds {
        assert_keep_real(&mut c, &format!("round {round}"));
        assert_flows_keep_real(&mut f, &format!("round {round}"));
    }
    // Let the last ACKs land.
    std::thread::sleep(Duration::from_millis(200));
    let after = env.scrape();
    for c in c {
        c.close();
    }
    (before, after)
}

/// With the emulated NIC every new flow gets a mark (installed after the handshake for TCP,
/// after a few datagrams for UDP) and the packets that follow take the mark fast path.
#[test]
fn marks_are_installed_and_the_fast_path_is_taken() {
    let mut env = Env::up(2);
    let (before, after) = established_traffic(&mut env, 40, 40, 5, true);
    let ok = before.get("marklb_mark_installs_total", &[("result", "ok")]);
    assert!(
        ok >= 80.0,
        "mark installs ok: {ok}\n{}",
        interesting(&before)
    );
    assert!(before.get("marklb_marks_in_use", &[]) >= 80.0);
    assert!(before.get("marklb_nic_rules", &[]) >= 80.0);
    let observed = before.get(
        "marklb_event_to_mark_seconds_count",
        &[("backend", "emulated")],
    );
    assert!(observed >= 80.0, "event-to-mark observations: {observed}");
    let d = |p: &str| path(&after, p) - path(&before, p);
    let (hit, est, new) = (d("mark_hit"), d("established"), d("new_flow"));
    eprintln!("established traffic: mark_hit +{hit}, established +{est}, new_flow +{new}");
    // 5 rounds x (40 TCP requests + 40 UDP datagrams), each at least one client packet.
    assert!(hit >= 400.0, "mark hits +{hit}");
    assert!(
        hit >= 0.95 * (hit + est + new),
        "fast path share: {hit} of {}",
        hit + est + new
    );
    let marked = after.get("marklb_emulated_nic_packets_total", &[("result", "marked")])
        - before.get("marklb_emulated_nic_packets_total", &[("result", "marked")]);
    assert!(
        marked >= hit,
        "the emulated NIC marked {marked}, {hit} hits"
    );
    assert_eq!(drops(&after), 0.0, "{}", interesting(&after));
}

/// Without a NIC backend nothing is marked: every packet after the first takes the
/// established (connection table) path.
#[test]
fn without_a_nic_backend_there_are_no_mark_hits() {
    let mut env = Env::prepare(2);
    let mut opts = env.options();
    opts.hw_backend = "none".into();
    env.start(opts);
    let (before, after) = established_traffic(&mut env, 40, 40, 5, false);
    for s in [&before, &after] {
        assert_eq!(
            s.get("marklb_mark_installs_total", &[("result", "ok")]),
            0.0
        );
        assert_eq!(path(s, "mark_hit"), 0.0, "{}", interesting(s));
        assert_eq!(s.get("marklb_marks_in_use", &[]), 0.0);
        assert_eq!(s.get("marklb_nic_rules", &[]), 0.0);
    }
    let est = path(&after, "established") - path(&before, "established");
    assert!(est >= 400.0, "established +{est}");
    let info = after.by_label("marklb_datapath_info", "hw_backend");
    assert_eq!(info.keys().collect::<Vec<_>>(), ["none"], "{info:?}");
    assert_eq!(drops(&after), 0.0, "{}", interesting(&after));
}

// ---------------------------------------------------------------------------------------
// 7. Metrics and health endpoints
// ---------------------------------------------------------------------------------------

/// `/healthz` answers as soon as the agent serves; `/readyz` only once a valid
/// configuration is applied on an attached datapath (the agent starts here with an invalid
/// file, then gets a good one). `/metrics` passes `promtool check metrics`, parses, has
/// every documented family with its type, and its values agree with the traffic and with
/// the kernel (the program id `ip link` shows).
#[test]
fn metrics_pass_promtool_and_health_endpoints_answer() {
    let mut env = Env::prepare(2);
    let good = env.manifest.to_yaml();
    env.write_text(&good.replacen("protocol: TCP", "protocol: TCP\n      colour: blue", 1));
    let opts = env.options();
    env.agent = Some(Agent::spawn(opts).expect("starting marklb-agent"));
    let deadline = Instant::now() + WAIT;
    let health = loop {
        match env.agent().get("/healthz") {
            Ok(r) => break r,
            Err(e) => {
                assert!(env.agent().is_running(), "{}", env.agent().log_tail(30));
                assert!(Instant::now() < deadline, "/healthz: {e}");
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    };
    assert_eq!(health.status, 200, "{health:?}");
    let ready = env.agent().get("/readyz").unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("no valid configuration"), "{ready:?}");
    let s = env.scrape();
    assert_eq!(s.get("marklb_config_valid", &[]), 0.0);
    assert_eq!(reloads(&s, "failure"), 1.0);
    assert!(env.agent().log_lines("configuration rejected")[0].contains("colour"));

    env.write_text(&good);
    env.agent().wait_ready(WAIT);
    assert_eq!(env.agent().get("/healthz").unwrap().status, 200);
    let mut conns = env.connect(tcp4(), 20);
    conns.extend(env.connect(tcp6(), 20));
    let _flows = env.udp_marked(udp4(), 20);
    env.wait_scrape("marks for the flows", |s| {
        s.get("marklb_mark_installs_total", &[("result", "ok")]) >= 60.0
    });
    assert_keep_real(&mut conns, "more");

    let r = env.agent().get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain") && c.contains("version=0.0.4")),
        "{:?}",
        r.headers
    );
    let report = promtool_check(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
    eprintln!("promtool check metrics: ok {}", report.trim());
    let s = Scrape::parse(&r.body).expect("parsing /metrics");
    for (family, ty) in [
        ("marklb_vip_packets_total", "counter"),
        ("marklb_vip_bytes_total", "counter"),
        ("marklb_real_packets_total", "counter"),
        ("marklb_real_bytes_total", "counter"),
        ("marklb_datapath_packets_total", "counter"),
        ("marklb_flow_events_total", "counter"),
        ("marklb_conn_table_evictions_total", "counter"),
        ("marklb_mark_installs_total", "counter"),
        ("marklb_marks_removed_total", "counter"),
        ("marklb_marks_in_use", "gauge"),
        ("marklb_marks_capacity", "gauge"),
        ("marklb_nic_rules", "gauge"),
        ("marklb_vips", "gauge"),
        ("marklb_reals", "gauge"),
        ("marklb_event_to_mark_seconds", "histogram"),
        ("marklb_config_reloads_total", "counter"),
        ("marklb_config_valid", "gauge"),
        ("marklb_datapath_info", "gauge"),
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(ty),
            "# TYPE of {family}"
        );
    }
    assert_eq!(s.get("marklb_config_valid", &[]), 1.0);
    assert_eq!(reloads(&s, "success"), 1.0);
    assert_eq!(reloads(&s, "failure"), 1.0);
    assert_eq!(s.get("marklb_vips", &[]), 4.0);
    assert_eq!(s.get("marklb_reals", &[]), 4.0);
    assert!(s.get("marklb_marks_in_use", &[]) >= 60.0);
    assert_eq!(s.get("marklb_marks_capacity", &[]), 65535.0);

    // Per-VIP packets add up to what the paths forwarded; per-real likewise.
    let forwarded = path(&s, "mark_hit") + path(&s, "established") + path(&s, "new_flow");
    assert!(forwarded > 0.0);
    assert_eq!(s.sum("marklb_vip_packets_total", &[]), forwarded);
    assert_eq!(s.sum("marklb_real_packets_total", &[]), forwarded);
    let by_vip = s.by_label("marklb_vip_packets_total", "vip");
    assert_eq!(
        by_vip.keys().collect::<Vec<_>>(),
        ["tcp-v4-0", "tcp-v6-1", "udp-v4-0", "udp-v6-1"]
    );
    assert!(by_vip["tcp-v4-0"] >= 60.0 && by_vip["tcp-v6-1"] >= 60.0);
    assert!(by_vip["udp-v4-0"] >= 20.0);

    // The histogram: cumulative buckets ending in +Inf = _count, a plausible sum.
    let labels = [("backend", "emulated")];
    let b = s.buckets("marklb_event_to_mark_seconds", &labels);
    assert!(b.len() >= 2 && b.last().unwrap().0.is_infinite(), "{b:?}");
    assert!(
        b.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {b:?}"
    );
    let count = s.get("marklb_event_to_mark_seconds_count", &labels);
    assert_eq!(b.last().unwrap().1, count);
    assert!(count >= 60.0);
    let sum = s.get("marklb_event_to_mark_seconds_sum", &labels);
    assert!(
        sum > 0.0 && sum / count < 1.0,
        "mean event-to-mark {}",
        sum / count
    );
    eprintln!(
        "event to mark: mean {:.1} us, p50 {:.1} us, p99 {:.1} us",
        sum / count * 1e6,
        s.quantile("marklb_event_to_mark_seconds", &labels, 0.5)
            .unwrap()
            * 1e6,
        s.quantile("marklb_event_to_mark_seconds", &labels, 0.99)
            .unwrap()
            * 1e6
    );

    // The datapath info names the kernel's program.
    let info: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.name == "marklb_datapath_info")
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    let l = &info[0].labels;
    assert_eq!(info[0].value, 1.0);
    assert_eq!(l["interface"], env.topo.lb.port.iface);
    assert_eq!(l["xdp_mode"], "native");
    assert_eq!(l["hw_backend"], "emulated");
    let prog = xdp_prog_id(&env.topo.lb.ns, &env.topo.lb.port.iface)
        .unwrap()
        .expect("XDP on lb0");
    assert_eq!(l["program_id"], prog.to_string());

    let missing = env.agent().get("/nonexistent").unwrap();
    assert_eq!(missing.status, 404);
}

// ---------------------------------------------------------------------------------------
// 8. Leaving: SIGTERM, --remove-on-exit, cleanup
// ---------------------------------------------------------------------------------------

/// Plain SIGTERM leaves the datapath serving (pinned); `--remove-on-exit` on SIGTERM
/// removes it; `marklb-agent cleanup` removes what a stopped agent left. "Removed" means:
/// no XDP program on the interface, no pins, and traffic to the VIPs no longer reaches the
/// reals.
#[test]
fn sigterm_keeps_serving_remove_on_exit_and_cleanup_remove_the_datapath() {
    let mut env = Env::up(2);
    let iface = env.topo.lb.port.iface.clone();
    let lb_ns = env.topo.lb.ns.clone();
    let pins = env.work.bpffs().join("marklb").join(&iface);
    let xdp = |env: &Env| xdp_prog_id(&env.topo.lb.ns, &env.topo.lb.port.iface).unwrap();
    let mut conns = env.connect(tcp4(), 20);
    let mut flows = env.udp(udp4(), 10);
    let prog = xdp(&env).expect("XDP attached");
    assert!(pins.join("xdp_link").exists());

    // 1. Plain SIGTERM: the agent exits, the datapath serves on.
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    env.agent().wait_log("the datapath keeps serving", 1, WAIT);
    assert_eq!(xdp(&env), Some(prog), "the program stays");
    assert!(pins.join("xdp_link").exists());
    assert_keep_real(&mut conns, "after SIGTERM");
    assert_flows_keep_real(&mut flows, "after SIGTERM");
    conns.extend(env.connect(tcp4(), 4));

    // 2. --remove-on-exit: the restarted agent adopts, then SIGTERM removes everything.
    let mut opts = env.options();
    opts.remove_on_exit = true;
    env.start(opts);
    assert_eq!(
        env.agent().log_lines("adopted the pinned datapath").len(),
        1
    );
    assert_keep_real(&mut conns, "adopted");
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    env.agent().wait_log("datapath removed", 1, WAIT);
    assert_eq!(xdp(&env), None, "XDP still on {iface}");
    assert!(!pins.exists(), "{} left", pins.display());
    let accepted = env.servers.tcp_accepted();
    assert!(
        !env.reachable(tcp4(), Duration::from_millis(800)),
        "VIP reachable without the balancer"
    );
    assert!(
        in_netns(&env.topo.client.ns, || UdpFlow::open(
            udp4(),
            Duration::from_millis(600)
        ))
        .unwrap()
        .is_err()
    );
    assert_eq!(env.servers.tcp_accepted(), accepted);
    drop(conns);
    drop(flows);

    // 3. A fresh agent (nothing pinned: it attaches anew), killed; `cleanup` removes what
    // it left.
    let opts = env.options();
    env.start(opts);
    let attached = env.agent().log_lines("datapath attached");
    assert!(attached[0].contains("adopted=false"), "{attached:?}");
    assert!(env.reachable(tcp4(), T));
    env.agent().kill9();
    assert!(xdp(&env).is_some());
    assert!(env.reachable(tcp4(), T), "serving without the agent");
    let bin = agent_binary();
    let bpffs = env.work.bpffs().display().to_string();
    let args = ["cleanup", "--interface", &iface, "--bpffs", &bpffs];
    let (st, out) = run_agent_command(&bin, &lb_ns, &args, WAIT).unwrap();
    assert!(st.success(), "cleanup: {st}: {out}");
    assert!(
        out.contains("removed the marklb datapath from lb0"),
        "{out}"
    );
    assert_eq!(xdp(&env), None, "XDP still on {iface} after cleanup");
    assert!(!pins.exists(), "{} left after cleanup", pins.display());
    let accepted = env.servers.tcp_accepted();
    assert!(!env.reachable(tcp4(), Duration::from_millis(800)));
    assert_eq!(env.servers.tcp_accepted(), accepted);
    // Nothing left: a second cleanup says so.
    let (st, out) = run_agent_command(&bin, &lb_ns, &args, WAIT).unwrap();
    assert!(
        st.success() && out.contains("nothing of marklb's on lb0"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Readiness that tells the truth
// ---------------------------------------------------------------------------------------

/// The agent's `/readyz` body, trimmed.
fn readyz(env: &mut Env) -> (u16, String) {
    let r = env.agent().get("/readyz").expect("GET /readyz");
    (r.status, r.body.trim().to_string())
}

/// The pins vanish under a running agent (the bpffs unmounted, then pin files removed): the
/// agent's own hold on the XDP link keeps traffic flowing with the same program, it pins
/// everything again (a restarted agent still adopts the datapath) and stays ready. Then the
/// link is detached behind its back: traffic stops, and `/readyz` says so with the reason.
#[test]
fn vanished_pins_are_restored_and_readiness_tells_the_truth() {
    let mut env = Env::up(2);
    let iface = env.topo.lb.port.iface.clone();
    let xdp = |env: &Env| xdp_prog_id(&env.topo.lb.ns, &env.topo.lb.port.iface).unwrap();
    let pins = env.work.bpffs().join("marklb").join(&iface);
    let prog = xdp(&env).expect("XDP attached");
    let mut conns = env.connect(tcp4(), 20);
    let mut flows = env.udp(udp4(), 10);
    assert_eq!(readyz(&mut env).0, 200);

    // 1. The bpffs is unmounted (what a careless tool on the host did once).
    env.work.unmount();
    assert!(!is_mounted(&env.work.bpffs()));
    assert_eq!(
        xdp(&env),
        Some(prog),
        "the program stays while the agent holds it"
    );
    assert_keep_real(&mut conns, "bpffs unmounted");
    assert_flows_keep_real(&mut flows, "bpffs unmounted");
    conns.extend(env.connect(tcp4(), 6));
    env.agent().wait_log("pinned again", 1, WAIT);
    assert!(
        is_mounted(&env.work.bpffs()),
        "the agent mounted a bpffs again"
    );
    assert!(pins.join("xdp_link").exists(), "link pinned again");
    assert!(
        pins.join("maps").join("CONN_TABLE").exists(),
        "maps pinned again"
    );
    assert_eq!(readyz(&mut env), (200, "ready".into()));

    // 2. Pin files removed by hand.
    std::fs::remove_file(pins.join("xdp_link")).expect("removing the link pin");
    std::fs::remove_file(pins.join("maps").join("MARKS")).expect("removing a map pin");
    env.agent().wait_log("pinned again", 2, WAIT);
    assert!(pins.join("xdp_link").exists() && pins.join("maps").join("MARKS").exists());
    assert_keep_real(&mut conns, "pins removed");
    assert_eq!(readyz(&mut env).0, 200);

    // The pins put back are the datapath's: a restarted agent adopts it, flows and all.
    env.agent().kill9();
    assert_keep_real(&mut conns, "agent dead");
    let opts = env.options();
    env.start(opts);
    assert_eq!(
        env.agent().log_lines("adopted the pinned datapath").len(),
        1
    );
    assert_keep_real(&mut conns, "adopted after re-pinning");
    assert_flows_keep_real(&mut flows, "adopted after re-pinning");
    let prog = xdp(&env).expect("XDP attached");
    assert_eq!(readyz(&mut env).0, 200);

    // 3. The link is detached behind the agent's back: no program, not ready, and why.
    marklb_agent::xdp_link::detach_pinned(&pins.join("xdp_link")).expect("detaching the link");
    assert_eq!(xdp(&env), None);
    let (status, body) = readyz(&mut env);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("no XDP program on {iface}"))
            && body.contains(&format!("program id {prog}")),
        "{body}"
    );
    assert!(!env.reachable(tcp4(), Duration::from_millis(800)));
    assert_eq!(
        env.agent().get("/healthz").unwrap().status,
        200,
        "alive, not ready"
    );
    // Its log is a file, not a terminal: no colour codes in it.
    let raw = env.agent().raw_log();
    assert!(raw.contains("datapath attached"), "{raw}");
    assert!(
        !raw.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{raw}"
    );
}

// ---------------------------------------------------------------------------------------
// 10. Several LoadBalancers in standalone mode
// ---------------------------------------------------------------------------------------

/// The topology's manifest split by address family: one LoadBalancer per family.
fn split_by_family(m: &Manifest) -> (Manifest, Manifest) {
    let mut v4 = m.clone();
    v4.name = format!("{}-v4", m.name);
    v4.vips.retain(|v| v.address.is_ipv4());
    let mut v6 = m.clone();
    v6.name = format!("{}-v6", m.name);
    v6.vips.retain(|v| v.address.is_ipv6());
    (v4, v6)
}

/// The `/status` report.
fn status(env: &mut Env) -> serde_json::Value {
    let r = env.agent().get("/status").expect("GET /status");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// The report of one LoadBalancer.
fn owner<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["owners"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["owner"] == name))
        .unwrap_or_else(|| panic!("no owner {name} in {report}"))
}

/// `--config` names a directory: every manifest in it is served, each VIP attributed to its
/// LoadBalancer; a later LoadBalancer claiming a VIP an earlier one serves is left out whole
/// and reported; removing a file removes its VIPs and leaves the others' flows alone.
#[test]
fn a_directory_of_loadbalancers_is_served_together_with_conflicts_reported() {
    let mut env = Env::prepare(2);
    let dir = env.work.path().join("lbs");
    std::fs::create_dir_all(&dir).unwrap();
    let (v4, v6) = split_by_family(&env.manifest);
    // Claims the IPv4 TCP VIP too, and brings one VIP of its own: served not at all.
    let mut thief = v4.clone();
    thief.name = "thief".into();
    thief.vips.retain(|v| v.protocol == "TCP");
    let mut extra = thief.vips[0].clone();
    extra.port = 8080;
    extra.name = Some("thief-own".into());
    thief.vips.push(extra);
    write_atomic(&dir.join("a-v4.yaml"), &v4.to_yaml()).unwrap();
    write_atomic(&dir.join("b-v6.yaml"), &v6.to_yaml()).unwrap();
    write_atomic(&dir.join("c-thief.yaml"), &thief.to_yaml()).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let mut opts = env.options();
    opts.config = dir.clone();
    env.start(opts);

    let mut c4 = env.connect(tcp4(), 20);
    let mut c6 = env.connect(tcp6(), 20);
    let _f4 = env.udp(udp4(), 10);
    let _f6 = env.udp(udp6(), 10);
    let s = env.wait_scrape("traffic on every VIP", |s| {
        s.sum(
            "marklb_vip_packets_total",
            &[("loadbalancer", v6.name.as_str())],
        ) > 0.0
    });
    assert_eq!(s.get("marklb_vips", &[]), 4.0, "{}", interesting(&s));
    assert_eq!(s.get("marklb_loadbalancers", &[("state", "serving")]), 2.0);
    assert_eq!(s.get("marklb_loadbalancers", &[("state", "conflict")]), 1.0);
    let by_lb = s.by_label("marklb_vip_packets_total", "loadbalancer");
    assert_eq!(
        by_lb.keys().collect::<Vec<_>>(),
        [&v4.name, &v6.name],
        "{}",
        interesting(&s)
    );
    assert!(
        s.get(
            "marklb_vip_packets_total",
            &[("vip", "tcp-v6-1"), ("loadbalancer", &v6.name)]
        ) > 0.0
    );
    let conflict = env.agent().wait_log("not served", 1, WAIT);
    assert!(
        conflict[0].contains("thief")
            && conflict[0].contains(&format!("conflicts with {}", v4.name))
            && conflict[0].contains("VIP 10.99.0.1:80/TCP"),
        "{conflict:?}"
    );
    let report = status(&mut env);
    assert_eq!(report["vips"], 4);
    assert_eq!(owner(&report, &v4.name)["serving"], true);
    assert_eq!(owner(&report, &v4.name)["vips"], 2);
    assert_eq!(owner(&report, &v6.name)["reals"], 2);
    assert_eq!(owner(&report, "thief")["serving"], false);
    assert_eq!(owner(&report, "thief")["conflictWith"], v4.name.as_str());
    assert_eq!(owner(&report, "thief")["vips"], 0);
    assert!(
        !env.reachable(
            SocketAddr::new(IpAddr::V4(VIP4), 8080),
            Duration::from_millis(800)
        ),
        "the losing LoadBalancer's own VIP is not served either"
    );

    // The IPv6 LoadBalancer's file goes: its VIPs go, the IPv4 flows keep their reals.
    let ok0 = reloads(&env.scrape(), "success");
    std::fs::remove_file(dir.join("b-v6.yaml")).unwrap();
    let s = env.wait_scrape("b-v6 removed", |s| reloads(s, "success") > ok0);
    assert_eq!(s.get("marklb_vips", &[]), 2.0, "{}", interesting(&s));
    assert_keep_real(&mut c4, "after removing the IPv6 LoadBalancer");
    assert!(c6[0].request("gone?").is_err() || !env.reachable(tcp6(), Duration::from_millis(800)));
    assert!(
        status(&mut env)["owners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["owner"] != v6.name.as_str())
    );
}

/// `--config` names a file with several documents: both LoadBalancers are served; one asking
/// for another node-wide setting (MTU) than the first is left out, naming the setting.
#[test]
fn a_multi_document_file_serves_every_loadbalancer_in_it() {
    let mut env = Env::prepare(2);
    let (v4, v6) = split_by_family(&env.manifest);
    let mut jumbo = v4.clone();
    jumbo.name = "jumbo".into();
    jumbo.vips = vec![jumbo.vips[0].clone()];
    jumbo.vips[0].port = 8443;
    jumbo.vips[0].name = Some("jumbo".into());
    let mut text = multi_document(&[&v4, &v6, &jumbo]);
    // The third document asks for jumbo frames.
    let third = text
        .rfind("    size: 1500")
        .expect("an mtu in the third document");
    text.replace_range(third..third + "    size: 1500".len(), "    size: 9000");
    env.write_text(&text);
    let opts = env.options();
    env.start(opts);
    let mut c4 = env.connect(tcp4(), 10);
    let mut c6 = env.connect(tcp6(), 10);
    assert_keep_real(&mut c4, "v4");
    assert_keep_real(&mut c6, "v6");
    let report = status(&mut env);
    assert_eq!(report["vips"], 4);
    let j = owner(&report, "jumbo");
    assert_eq!(j["serving"], false);
    let problem = j["problem"].as_str().unwrap();
    assert!(
        problem.contains(&format!("conflicts with {}", v4.name))
            && problem.contains("node-wide setting mtu 1500/Icmp (asked: 9000/Icmp)"),
        "{problem}"
    );
}

// ---------------------------------------------------------------------------------------
// 11. Inspecting a node: `marklb-agent status`
// ---------------------------------------------------------------------------------------

/// Every file under `dir`, for "status changed nothing".
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
            out.push(e.path().display().to_string());
        }
    }
    out.sort();
    out
}

/// After the agent served traffic and exited (SIGTERM: the datapath keeps serving, pinned),
/// `marklb-agent status --json` shows from the pins alone every VIP with the owner the agent
/// reported, its ring and both reals, the marks and NIC rules the flows got, and path and
/// VIP counters equal to the agent's last scrape; the text form says the same; nothing under
/// the pins changes; an interface with nothing pinned is a clear error.
#[test]
fn status_reads_what_the_node_serves_from_the_pins_without_the_agent() {
    let mut env = Env::up(2);
    let (_, after) = established_traffic(&mut env, 20, 20, 3, true);
    let report = status(&mut env);
    let owner_name = report["owners"][0]["owner"]
        .as_str()
        .unwrap_or_else(|| panic!("no owner in {report}"))
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    let last = env.scrape();
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    env.agent().wait_log("the datapath keeps serving", 1, WAIT);

    let iface = env.topo.lb.port.iface.clone();
    let lb_ns = env.topo.lb.ns.clone();
    let bpffs = env.work.bpffs().display().to_string();
    let pins = env.work.bpffs().join("marklb").join(&iface);
    let files = listing(&pins);
    let bin = agent_binary();
    // The exact command of the README's troubleshooting section.
    let args = ["status", "--interface", &iface, "--bpffs", &bpffs, "--json"];
    for n in [5, 6] {
        let command = readme_form(&format!("marklb-agent {}", args[..n].join(" ")));
        assert!(
            README_TROUBLESHOOTING.contains(&command.as_str()),
            "{command:?} is not among the README's troubleshooting commands"
        );
    }
    let (code, out) = run_agent_command(&bin, &lb_ns, &args, WAIT).unwrap();
    assert!(code.success(), "status: {code}: {out}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));

    // Attachment: the program on the interface, through its pinned link.
    let prog = xdp_prog_id(&lb_ns, &iface).unwrap().expect("XDP attached");
    assert_eq!(s["attach"]["hook"], "xdp", "{s}");
    assert_eq!(s["attach"]["prog_id"], prog, "{s}");
    assert!(
        ["native", "generic"].contains(&s["attach"]["mode"].as_str().unwrap()),
        "{s}"
    );

    // VIPs: the four of the manifest, each owned by the LoadBalancer, both reals in its ring.
    let vips = s["vips"].as_array().unwrap();
    let names: BTreeSet<&str> = vips.iter().map(|v| v["vip"].as_str().unwrap()).collect();
    let want: BTreeSet<String> = [
        "10.99.0.1:80/TCP",
        "10.99.0.1:53/UDP",
        "[fd00:99::1]:80/TCP",
        "[fd00:99::1]:53/UDP",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        names,
        want.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "{s}"
    );
    for v in vips {
        assert_eq!(v["owner"], owner_name.as_str(), "{v}");
        let ring = v["ring_size"].as_u64().unwrap();
        assert!(ring > 0, "{v}");
        let v6 = v["address"].as_str().unwrap().contains(':');
        let reals: BTreeSet<String> = v["reals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap().to_string())
            .collect();
        let expected: BTreeSet<String> =
            [1, 2].map(|n| env.topo.real(n).addr(v6).to_string()).into();
        assert_eq!(reals, expected, "{v}");
        let slots: u64 = v["reals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["slots"].as_u64().unwrap())
            .sum();
        assert_eq!(slots, ring, "every ring slot names a real: {v}");
    }
    let tcp4 = vips
        .iter()
        .find(|v| v["vip"] == "10.99.0.1:80/TCP")
        .unwrap();
    let udp4 = vips
        .iter()
        .find(|v| v["vip"] == "10.99.0.1:53/UDP")
        .unwrap();
    assert!(tcp4["marks"].as_u64().unwrap() >= 20, "{tcp4}");
    assert!(udp4["marks"].as_u64().unwrap() >= 20, "{udp4}");
    assert_eq!(s["reals"].as_array().unwrap().len(), 4, "{s}");

    // Marks, NIC rules and counters agree with the agent's last scrape.
    let marks = s["marks"]["in_use"].as_f64().unwrap();
    assert_eq!(marks, last.get("marklb_marks_in_use", &[]), "{s}");
    assert_eq!(
        s["marks"]["capacity"].as_f64().unwrap(),
        last.get("marklb_marks_capacity", &[]),
        "{s}"
    );
    assert!(marks >= 40.0, "{s}");
    assert_eq!(
        s["nic_rules"]["emulated"].as_f64().unwrap(),
        last.get("marklb_nic_rules", &[]),
        "{s}"
    );
    for p in ["mark_hit", "established", "new_flow"] {
        assert_eq!(
            s["counters"][p].as_f64().unwrap(),
            path(&last, p),
            "{p}: {s}"
        );
    }
    // 3 rounds x (20 TCP requests + 20 UDP datagrams), each at least one client packet.
    assert!(path(&after, "mark_hit") >= 120.0, "{}", interesting(&after));
    let vip_packets: f64 = vips.iter().map(|v| v["packets"].as_f64().unwrap()).sum();
    let scraped: f64 = last
        .by_label("marklb_vip_packets_total", "vip")
        .values()
        .sum();
    assert_eq!(vip_packets, scraped, "{s}");
    eprintln!(
        "status: {} VIPs, rings {}, marks {marks}, NIC rules {}, mark_hit {}, established {}, new_flow {}, VIP packets {vip_packets}",
        vips.len(),
        tcp4["ring_size"],
        s["nic_rules"]["emulated"],
        s["counters"]["mark_hit"],
        s["counters"]["established"],
        s["counters"]["new_flow"]
    );

    // The text form.
    let (code, text) = run_agent_command(&bin, &lb_ns, &args[..5], WAIT).unwrap();
    assert!(code.success(), "status: {code}: {text}");
    for needle in [
        format!(
            "attached:   xdp {}, program {prog}",
            s["attach"]["mode"].as_str().unwrap()
        ),
        format!(
            "10.99.0.1:80/TCP  owner {owner_name}  ring {}",
            tcp4["ring_size"]
        ),
        format!("real {}", env.topo.real(1).addr(false)),
        format!("marks:      {marks} in use"),
        "mark_hit".to_string(),
    ] {
        assert!(text.contains(&needle), "no {needle:?} in\n{text}");
    }
    eprintln!("{text}");

    // Read only; and nothing pinned is an error that says so.
    assert_eq!(listing(&pins), files, "status changed the pins");
    let (code, out) = run_agent_command(
        &bin,
        &lb_ns,
        &["status", "--interface", "nosuch0", "--bpffs", &bpffs],
        WAIT,
    )
    .unwrap();
    assert!(!code.success(), "{out}");
    assert!(
        out.contains("nothing of marklb's pinned for nosuch0"),
        "{out}"
    );
    assert!(!env.work.bpffs().join("marklb").join("nosuch0").exists());
}

// ---------------------------------------------------------------------------------------
// 12. Network exposure of the agent's endpoints
// ---------------------------------------------------------------------------------------

/// Whether a client in `ns` gets an HTTP answer from `addr` (`/metrics`).
fn metrics_answer(ns: &str, addr: SocketAddr) -> Option<u16> {
    http_get_in(ns, addr, "/metrics").ok().map(|r| r.status)
}

/// The DaemonSet binds the agent's `/metrics` and probes to the node's address
/// (`--metrics-addr=$(HOST_IP):9464`, chart value `agent.metricsBind: host-ip`). With the VIP
/// also a local address of the node (so the kernel accepts what XDP passes on other ports),
/// an agent bound to the node address answers a remote client on the node address and not on
/// the VIP; bound to 0.0.0.0 (`metricsBind: all`) the same client scrapes it through the VIP,
/// which is what the default prevents.
#[test]
fn metrics_bound_to_the_node_address_do_not_answer_on_the_vip() {
    let mut env = Env::prepare(2);
    let lb_ns = env.topo.lb.ns.clone();
    let client_ns = env.topo.client.ns.clone();
    ip(
        Some(&lb_ns),
        &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"],
    )
    .expect("VIP on the node's lo");
    let node = SocketAddr::new(IpAddr::V4(env.topo.lb.port.v4), 9464);
    let on_vip = SocketAddr::new(IpAddr::V4(VIP4), 9464);

    let mut opts = env.options();
    opts.metrics_addr = node;
    env.start(opts);
    assert_eq!(metrics_answer(&client_ns, node), Some(200), "node address");
    assert_eq!(metrics_answer(&client_ns, on_vip), None, "VIP answered");
    assert_eq!(metrics_answer(&lb_ns, on_vip), None, "VIP answered locally");
    // The VIP itself still serves.
    assert!(env.reachable(tcp4(), T));
    let st = env.agent().terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");

    // Control: bound to every address, the client scrapes it through the VIP.
    let mut opts = env.options();
    opts.metrics_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9464);
    let mut a = Agent::spawn(opts).expect("starting marklb-agent");
    let deadline = Instant::now() + WAIT;
    while metrics_answer(&client_ns, on_vip).is_none() && Instant::now() < deadline {
        assert!(a.is_running(), "agent exited:\n{}", a.log_tail(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metrics_answer(&client_ns, on_vip),
        Some(200),
        "0.0.0.0 on the VIP"
    );
    env.agent = Some(a);
}
