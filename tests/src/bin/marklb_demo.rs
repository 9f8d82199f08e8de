//! `marklb-demo`: the whole thing on one machine, in network namespaces (root).
//!
//! Builds client, router, load balancer and three reals (which decapsulate with
//! `marklb-agent decap` and answer the client directly), writes a LoadBalancer manifest,
//! runs `marklb-agent run` standalone with the emulated NIC on the load balancer's
//! interface, sends real TCP connections and UDP flows to the VIPs and reports: where they
//! went, which datapath path the packets took (from `/metrics` deltas), marks and their
//! installation latency, the agent's memory. Then it removes a real from the manifest and
//! shows that real's flows moving while the others keep theirs.
//!
//! Cleans up (agent and decapsulators, namespaces, bpffs mount) on exit, on error and on
//! SIGINT/SIGTERM/SIGHUP. Exits non-zero when traffic did not flow as it should.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use marklb_tests::{
    agent_proc::{
        Agent, AgentOptions, DecapProc, METRICS_ADDR, Manifest, Scrape, VipSpec, Workdir,
        find_agent_binary, unmount_all, write_atomic,
    },
    netns::{
        ENCAP_SRC_V4, ENCAP_SRC_V6, NAME_PREFIX, Servers, TcpConn, Topology, TopologyOptions,
        UdpFlow, in_netns, ip, tally, udp_flows_earning_marks,
    },
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const REALS: usize = 3;
const T: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Teardown on signals
// ---------------------------------------------------------------------------------------

/// What a signal must tear down when it interrupts the demo (the normal path drops the
/// owning objects instead).
#[derive(Default)]
struct Cleanup {
    pids: Vec<u32>,
    bpffs: Option<PathBuf>,
    workdir: Option<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    pids: Vec::new(),
    bpffs: None,
    workdir: None,
});

fn register_pid(pid: u32) {
    CLEANUP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .push(pid);
}

/// Blocks the termination signals in every thread (threads spawned later inherit the
/// mask; child processes get a clean one) and handles them on a dedicated thread.
fn install_signal_teardown() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    interrupted(sig);
                }
            })
            .expect("signal thread");
    }
}

/// Processes whose parent is this process (from `/proc/<pid>/stat`).
fn children() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect()
}

fn interrupted(sig: libc::c_int) -> ! {
    eprintln!("\nmarklb-demo: signal {sig}: tearing down ...");
    let c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    // The agent and the decapsulators (registered), and any child started but not
    // registered yet: every process whose parent is this one.
    let mut pids = c.pids.clone();
    pids.extend(children());
    for pid in pids {
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    if let Some(b) = &c.bpffs {
        unmount_all(b);
    }
    // Every namespace this process created is named mlb<pid>x<n>-<role>.
    let mine = format!("{NAME_PREFIX}{}x", std::process::id());
    if let Ok(list) = ip(None, &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&mine) {
                let _ = ip(None, &["netns", "del", ns]);
            }
        }
    }
    if let Some(w) = &c.workdir {
        let _ = std::fs::remove_dir_all(w);
    }
    eprintln!("marklb-demo: cleaned up");
    std::process::exit(128 + sig);
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// A plain text table: columns whose cells are all numbers (or percentages) are
/// right-aligned, the others left-aligned.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut w: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .filter(|c| !c.is_empty())
                .all(|c| {
                    c.trim_end_matches('%')
                        .split(" / ")
                        .all(|p| p.parse::<f64>().is_ok() || p == "-")
                })
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let pad = " ".repeat(w[i].saturating_sub(c.chars().count()));
            s += "  ";
            if numeric[i] && i > 0 {
                s += &pad;
                s += c;
            } else {
                s += c;
                s += &pad;
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out += &line(w.iter().map(|n| "-".repeat(*n)).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn pct(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part / whole)
    }
}

fn heading(s: &str) {
    println!("\n== {s}");
}

fn us(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.0} us", seconds * 1e6)
    } else {
        format!("{:.2} ms", seconds * 1e3)
    }
}

// ---------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------

struct Args {
    connections: usize,
    connections_v6: usize,
    udp_flows: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        connections: 300,
        connections_v6: 60,
        udp_flows: 150,
        rounds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--connections" => a.connections = num("--connections")?,
            "--connections-v6" => a.connections_v6 = num("--connections-v6")?,
            "--udp-flows" => a.udp_flows = num("--udp-flows")?,
            "--rounds" => a.rounds = num("--rounds")?,
            "-h" | "--help" => {
                println!(
                    "marklb-demo [--connections N (300)] [--connections-v6 N (60)] \
                     [--udp-flows N (150)] [--rounds N (5)]\n\
                     Runs marklb-agent in network namespaces with real traffic (root)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!(
        a.connections >= REALS,
        "--connections must be at least {REALS}"
    );
    Ok(a)
}

/// The owned pieces; dropped in field order (agent and decapsulators first, namespaces
/// last).
struct Demo {
    agent: Option<Agent>,
    decaps: Vec<DecapProc>,
    servers: Option<Servers>,
    work: Workdir,
    topo: Topology,
    logs: PathBuf,
    manifest: Manifest,
}

impl Demo {
    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent")
    }

    fn scrape(&self) -> Result<Scrape> {
        let r = self.agent().get("/metrics").context("GET /metrics")?;
        ensure!(r.status == 200, "GET /metrics: {}", r.status);
        Scrape::parse(&r.body).map_err(|e| anyhow::anyhow!("parsing /metrics: {e}"))
    }

    fn wait_scrape(&self, what: &str, cond: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.scrape()?;
            if cond(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {WAIT:?} for {what} (agent log: {})",
                    self.agent().opts.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn path(s: &Scrape, p: &str) -> f64 {
    s.get("marklb_datapath_packets_total", &[("path", p)])
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("marklb-demo: {e:#}");
            std::process::exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("marklb-demo: needs root (network namespaces, veth, XDP, bpffs)");
        std::process::exit(2);
    }
    let binary = match find_agent_binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("marklb-demo: {e}");
            std::process::exit(2);
        }
    };
    install_signal_teardown();
    let code = match run(&args, binary) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("\nmarklb-demo: FAILED: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args, binary: PathBuf) -> Result<()> {
    let started = Instant::now();
    let logs = PathBuf::from(format!("/tmp/marklb-demo.{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;

    println!("marklb demo: XDP L4 load balancer with NIC flow marks, in network namespaces");
    let topo = Topology::build(TopologyOptions {
        reals: REALS,
        vips_v4: vec![VIP4],
        vips_v6: vec![VIP6],
        client_mtu: 1400,
        ..Default::default()
    })
    .context("building the namespaces")?;
    let work = Workdir::new("marklb-demo-").context("bpffs directory")?;
    {
        let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
        c.bpffs = Some(work.bpffs());
        c.workdir = Some(work.path().to_path_buf());
    }
    let mut demo = Demo {
        agent: None,
        decaps: Vec::new(),
        servers: None,
        work,
        topo,
        logs: logs.clone(),
        manifest: Manifest {
            name: String::new(),
            vips: Vec::new(),
            table_size: None,
            next_hop_mac: None,
            encap_v4: None,
            encap_v6: None,
            mark_idle_timeout: None,
            extra_spec: Vec::new(),
        },
    };
    let result = scenario(&mut demo, args, &binary);
    if result.is_err()
        && let Some(a) = &demo.agent
        && let Ok(r) = a.get("/metrics")
    {
        let file = logs.join("metrics-at-failure.prom");
        if std::fs::write(&file, &r.body).is_ok() {
            eprintln!("marklb-demo: metrics at the failure: {}", file.display());
        }
    }
    // Orderly teardown (also after an error): agent, decapsulators, servers, bpffs,
    // namespaces.
    let log = demo.agent.as_ref().map(|a| a.opts.log.clone());
    drop(demo);
    CLEANUP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .clear();
    heading("Teardown");
    println!("  namespaces, agent, decapsulators and bpffs mount removed");
    if let Some(l) = log {
        println!("  agent log:     {}", l.display());
    }
    println!("  decap logs:    {}/decap-real*.log", logs.display());
    println!(
        "  manifests:     {}/lb.yaml (as started), lb-reload.yaml",
        logs.display()
    );
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    result
}

/// The demo, one function per printed section.
fn scenario(d: &mut Demo, args: &Args, binary: &Path) -> Result<()> {
    print_topology(&d.topo);
    start_reals(d, binary)?;
    let config = write_manifest(d)?;
    let m0 = start_agent(d, binary)?;
    let mut t = run_traffic(d, args, m0)?;
    print_traffic(d, &t)?;
    print_paths(&t)?;
    print_marks(&t.m2);
    print_agent(d, &t.m2);
    reload_without_real3(d, &config, &mut t)?;
    heading(
        "Result: OK (traffic flowed through the agent, fast path taken, reload kept the other flows)",
    );
    Ok(())
}

/// "Topology": the namespaces, their addresses and roles.
fn print_topology(topo: &Topology) {
    heading("Topology");
    let mut rows = vec![
        vec![
            "client".to_string(),
            topo.client.ns.clone(),
            format!("{}, {}", topo.client.port.v4, topo.client.port.v6),
            "sends TCP/UDP to the VIPs".into(),
        ],
        vec![
            "router".into(),
            topo.router_ns.clone(),
            "10.100.0.1, 10.200.0.1, 10.201.N.1".into(),
            format!("routes {VIP4} and {VIP6} to the load balancer"),
        ],
        vec![
            "lb".into(),
            topo.lb.ns.clone(),
            format!("{}, {}", topo.lb.port.v4, topo.lb.port.v6),
            format!("marklb-agent run on {} (emulated NIC)", topo.lb.port.iface),
        ],
    ];
    for r in &topo.reals {
        rows.push(vec![
            r.name.clone(),
            r.ns.clone(),
            format!("{}, {}", r.port.v4, r.port.v6),
            "marklb-agent decap; VIPs on lo; answers directly".into(),
        ]);
    }
    print!(
        "{}",
        table(&["host", "namespace", "addresses", "role"], &rows)
    );
}

/// The reals: decapsulators (processes) and the identify servers (prints nothing).
fn start_reals(d: &mut Demo, binary: &Path) -> Result<()> {
    for n in 1..=REALS {
        let log = d.logs.join(format!("decap-real{n}.log"));
        let p = DecapProc::start(binary, &d.topo, n, &log, WAIT)
            .with_context(|| format!("marklb-agent decap on real{n}"))?;
        register_pid(p.pid);
        d.decaps.push(p);
    }
    d.servers = Some(Servers::start(&d.topo, TCP_PORT, UDP_PORT).context("servers on the reals")?);
    Ok(())
}

/// The manifest: an IPv4 VIP (TCP and UDP) and an IPv6 VIP (TCP) over the three reals, written
/// where the agent reads it (and copied to the logs); the path the agent reads.
fn write_manifest(d: &mut Demo) -> Result<PathBuf> {
    let v4: Vec<(IpAddr, u32)> = d.topo.reals.iter().map(|r| (r.addr(false), 1)).collect();
    let v6: Vec<(IpAddr, u32)> = d.topo.reals.iter().map(|r| (r.addr(true), 1)).collect();
    let vip = |name: &str, address: IpAddr, port: u16, protocol: &'static str, backends| VipSpec {
        name: Some(name.into()),
        address,
        port,
        protocol,
        backends,
    };
    d.manifest = Manifest {
        name: "demo".into(),
        vips: vec![
            vip("web", IpAddr::V4(VIP4), TCP_PORT, "TCP", v4.clone()),
            vip("dns", IpAddr::V4(VIP4), UDP_PORT, "UDP", v4),
            vip("web6", IpAddr::V6(VIP6), TCP_PORT, "TCP", v6),
        ],
        table_size: None,
        // Left out: the agent resolves the default gateway's MAC (the router) itself.
        next_hop_mac: None,
        encap_v4: Some(format!("{ENCAP_SRC_V4}/16")),
        encap_v6: Some(format!("{ENCAP_SRC_V6}/96")),
        mark_idle_timeout: None,
        extra_spec: Vec::new(),
    };
    let yaml = d.manifest.to_yaml();
    let config = d.work.config();
    write_atomic(&config, &yaml)?;
    std::fs::write(d.logs.join("lb.yaml"), &yaml)?;
    Ok(config)
}

/// "Agent": starts `marklb-agent run` and reports what it attached; the first scrape.
fn start_agent(d: &mut Demo, binary: &Path) -> Result<Scrape> {
    let mut opts = AgentOptions::for_topology(&d.topo, &d.work);
    opts.binary = binary.to_path_buf();
    opts.log = d.logs.join("agent.log");
    opts.reload_interval = "250ms".into();
    let mut agent = Agent::spawn(opts).context("starting marklb-agent")?;
    register_pid(agent.pid);
    let t0 = Instant::now();
    agent.wait_ready(WAIT);
    let ready_in = t0.elapsed();
    let cmdline = agent.opts.args().join(" ");
    d.agent = Some(agent);
    let s = d.scrape()?;
    let info = s
        .samples
        .iter()
        .find(|x| x.name == "marklb_datapath_info")
        .context("marklb_datapath_info")?;
    heading("Agent");
    println!("  marklb-agent {cmdline}");
    println!(
        "  pid {}, ready in {} ms: {} XDP on {}, program id {}, NIC backend {}, metrics on {} (lb namespace)",
        d.agent().pid,
        ready_in.as_millis(),
        info.labels["xdp_mode"],
        info.labels["interface"],
        info.labels["program_id"],
        info.labels["hw_backend"],
        METRICS_ADDR
    );
    println!(
        "  manifest: 3 VIPs (web {VIP4}:{TCP_PORT}/TCP, dns {VIP4}:{UDP_PORT}/UDP, web6 [{VIP6}]:{TCP_PORT}/TCP) x {REALS} reals, Maglev table 65537, next hop resolved by the agent"
    );
    Ok(s)
}

/// The flows of the demo and the metrics around them: `m0` before, `m1` once every new flow
/// has its mark, `m2` after the requests on established flows.
struct Traffic {
    conns: Vec<TcpConn>,
    flows: Vec<UdpFlow>,
    tcp4: SocketAddr,
    tcp6: SocketAddr,
    n4: usize,
    n6: usize,
    rounds: usize,
    requests: usize,
    m0: Scrape,
    m1: Scrape,
    m2: Scrape,
}

/// New flows, then established traffic on them (prints nothing).
fn run_traffic(d: &Demo, args: &Args, m0: Scrape) -> Result<Traffic> {
    let client = d.topo.client.ns.clone();
    let tcp4 = SocketAddr::new(IpAddr::V4(VIP4), TCP_PORT);
    let tcp6 = SocketAddr::new(IpAddr::V6(VIP6), TCP_PORT);
    let udp4 = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
    let (n4, n6) = (args.connections, args.connections_v6);
    let mut conns: Vec<TcpConn> = in_netns(&client, || -> Result<Vec<TcpConn>> {
        let mut v = Vec::with_capacity(n4 + n6);
        for (vip, n) in [(tcp4, n4), (tcp6, n6)] {
            for i in 0..n {
                v.push(
                    TcpConn::connect(vip, T)
                        .with_context(|| format!("TCP connection {i} to {vip}"))?,
                );
            }
        }
        Ok(v)
    })??;
    let mut flows: Vec<UdpFlow> =
        // Each sends the datagrams a UDP flow needs to earn its mark (the first ones only count).
        udp_flows_earning_marks(&client, udp4, args.udp_flows, T).context("UDP flows")?;
    let new_flows = (conns.len() + flows.len()) as f64;
    let m1 = d.wait_scrape("a mark for every new flow", |s| {
        s.get("marklb_mark_installs_total", &[("result", "ok")]) >= new_flows
    })?;
    for round in 0..args.rounds {
        for (i, c) in conns.iter_mut().enumerate() {
            let r = c
                .request(&format!("round {round} conn {i}"))
                .with_context(|| format!("request on {}", c.local))?;
            ensure!(
                r == c.real,
                "connection {} moved from {} to {r}",
                c.local,
                c.real
            );
        }
        for (i, f) in flows.iter_mut().enumerate() {
            let r = f
                .ask(&format!("round {round} flow {i}"))
                .with_context(|| format!("UDP flow {}", f.local))?;
            ensure!(
                r == f.real,
                "UDP flow {} moved from {} to {r}",
                f.local,
                f.real
            );
        }
    }
    let requests = args.rounds * (conns.len() + flows.len());
    std::thread::sleep(Duration::from_millis(200));
    let m2 = d.scrape()?;
    Ok(Traffic {
        conns,
        flows,
        tcp4,
        tcp6,
        n4,
        n6,
        rounds: args.rounds,
        requests,
        m0,
        m1,
        m2,
    })
}

/// "Traffic": where the connections and flows went.
fn print_traffic(d: &Demo, t: &Traffic) -> Result<()> {
    heading(&format!(
        "Traffic: {} TCP connections ({} IPv4, {} IPv6) and {} UDP flows, then {} requests on them ({} rounds)",
        t.conns.len(),
        t.n4,
        t.n6,
        t.flows.len(),
        t.requests,
        t.rounds
    ));
    let on = |vip: SocketAddr| {
        tally(
            t.conns
                .iter()
                .filter(|c| c.peer == vip)
                .map(|c| c.real.as_str()),
        )
    };
    let (t4, t6) = (on(t.tcp4), on(t.tcp6));
    let tu = tally(t.flows.iter().map(|f| f.real.as_str()));
    let accepted = d.servers.as_ref().expect("servers").tcp_accepted();
    let mut rows = Vec::new();
    for r in &d.topo.reals {
        let g = |t: &BTreeMap<String, usize>| t.get(&r.name).copied().unwrap_or(0);
        rows.push(vec![
            r.name.clone(),
            g(&t4).to_string(),
            pct(g(&t4) as f64, t.n4 as f64),
            g(&t6).to_string(),
            pct(g(&t6) as f64, t.n6 as f64),
            g(&tu).to_string(),
            pct(g(&tu) as f64, t.flows.len() as f64),
            accepted.get(&r.name).copied().unwrap_or(0).to_string(),
        ]);
    }
    print!(
        "{}",
        table(
            &[
                "real",
                "TCP v4",
                "share",
                "TCP v6",
                "share",
                "UDP flows",
                "share",
                "accepted (server)"
            ],
            &rows
        )
    );
    println!(
        "  all {} requests were answered by the real that took their flow; \
         \"accepted\" is what the reals' TCP servers counted (v4 + v6)",
        t.requests
    );
    for (what, t) in [("TCP v4", &t4), ("TCP v6", &t6), ("UDP", &tu)] {
        let total: usize = t.values().sum();
        if total >= REALS {
            ensure!(
                t.len() == REALS,
                "{what}: not every real got traffic: {t:?}"
            );
        }
    }
    Ok(())
}

/// "Datapath paths": packets per path while flows opened and on established traffic.
fn print_paths(t: &Traffic) -> Result<()> {
    heading("Datapath paths (packets the XDP program handled, from /metrics deltas)");
    let (m0, m1, m2) = (&t.m0, &t.m1, &t.m2);
    let d01 = |p: &str| path(m1, p) - path(m0, p);
    let d12 = |p: &str| path(m2, p) - path(m1, p);
    let d02 = |p: &str| path(m2, p) - path(m0, p);
    let forwarded = |d: &dyn Fn(&str) -> f64| d("mark_hit") + d("established") + d("new_flow");
    let (tot01, tot12, tot02) = (forwarded(&d01), forwarded(&d12), forwarded(&d02));
    let mut rows = Vec::new();
    for (label, p) in [
        ("mark fast path", "mark_hit"),
        ("established (LRU)", "established"),
        ("new flow (Maglev)", "new_flow"),
    ] {
        rows.push(vec![
            label.to_string(),
            format!("{:.0}", d01(p)),
            pct(d01(p), tot01),
            format!("{:.0}", d12(p)),
            pct(d12(p), tot12),
            format!("{:.0}", d02(p)),
            pct(d02(p), tot02),
        ]);
    }
    rows.push(vec![
        "total forwarded".into(),
        format!("{tot01:.0}"),
        String::new(),
        format!("{tot12:.0}"),
        String::new(),
        format!("{tot02:.0}"),
        String::new(),
    ]);
    let dropped: f64 = m2
        .samples
        .iter()
        .filter(|x| {
            x.name == "marklb_datapath_packets_total"
                && x.labels.get("path").is_some_and(|p| p.starts_with("drop_"))
        })
        .map(|x| x.value)
        .sum();
    print!(
        "{}",
        table(
            &[
                "path",
                "opening flows",
                "share",
                "established traffic",
                "share",
                "all",
                "share"
            ],
            &rows
        )
    );
    println!(
        "  (\"opening flows\": handshakes and first datagrams, marks being installed meanwhile; \
         \"established traffic\": the requests after every flow had its mark)"
    );
    println!(
        "  dropped: {dropped:.0}; not for a VIP (passed to the stack): {:.0}",
        d02("pass_not_vip")
    );
    ensure!(d12("mark_hit") > 0.0, "no packet took the mark fast path");
    Ok(())
}

/// "Flow marks": installs, capacity, events and the event-to-mark latency.
fn print_marks(m2: &Scrape) {
    heading("Flow marks");
    let lat = [("backend", "emulated")];
    let count = m2.get("marklb_event_to_mark_seconds_count", &lat);
    let sum = m2.get("marklb_event_to_mark_seconds_sum", &lat);
    let q = |x: f64| {
        m2.quantile("marklb_event_to_mark_seconds", &lat, x)
            .map(us)
            .unwrap_or_else(|| "-".into())
    };
    let installs = |result: &str| m2.get("marklb_mark_installs_total", &[("result", result)]);
    let events = |result: &str| m2.get("marklb_flow_events_total", &[("result", result)]);
    let rows = vec![
        vec![
            "marks installed".to_string(),
            format!("{:.0}", installs("ok")),
        ],
        vec![
            "install failures / no free mark".into(),
            format!(
                "{:.0} / {:.0}",
                installs("failed"),
                installs("no_free_mark")
            ),
        ],
        vec![
            "marks in use / capacity".into(),
            format!(
                "{:.0} / {:.0}",
                m2.get("marklb_marks_in_use", &[]),
                m2.get("marklb_marks_capacity", &[])
            ),
        ],
        vec![
            "emulated NIC rules".into(),
            format!("{:.0}", m2.get("marklb_nic_rules", &[])),
        ],
        vec![
            "new-flow events sent / lost".into(),
            format!("{:.0} / {:.0}", events("sent"), events("lost")),
        ],
        vec![
            "event -> mark installed, mean".into(),
            if count > 0.0 {
                us(sum / count)
            } else {
                "-".into()
            },
        ],
        vec![
            "event -> mark installed, p50 / p90 / p99".into(),
            format!("{} / {} / {}", q(0.5), q(0.9), q(0.99)),
        ],
    ];
    print!("{}", table(&["", "value"], &rows));
    if count > 0.0 && sum / count > 1.0 {
        println!(
            "  WARNING: a mean above one second means the events' timestamps are not \
             CLOCK_MONOTONIC (bpf_ktime_get_ns) or are missing"
        );
    }
    println!(
        "  (latency quantiles interpolated from the histogram's buckets, as histogram_quantile does)"
    );
}

/// "Agent memory and a few metrics".
fn print_agent(d: &Demo, m2: &Scrape) {
    heading("Agent memory and a few metrics");
    let pid = d.agent().pid;
    println!(
        "  agent pid {pid}: VmRSS {} KiB, peak VmHWM {} KiB",
        d.agent().rss_kib().map_or("?".into(), |v| v.to_string()),
        d.agent()
            .peak_rss_kib()
            .map_or("?".into(), |v| v.to_string())
    );
    for l in m2.text.lines().filter(|l| {
        l.starts_with("marklb_vip_packets_total")
            || l.starts_with("marklb_real_packets_total")
            || l.starts_with("marklb_config_")
            || l.starts_with("marklb_datapath_info")
    }) {
        println!("  {l}");
    }
}

/// What happened to the flows after the reload, per real.
#[derive(Default)]
struct AfterReload {
    kept: BTreeMap<String, usize>,
    lost: BTreeMap<String, usize>,
    udp_kept: BTreeMap<String, usize>,
    udp_moved: BTreeMap<String, BTreeMap<String, usize>>,
}

/// Requests on every flow after `removed` left: the others keep their real, `removed`'s TCP
/// connections are reset and its UDP flows move.
fn probe_after_reload(t: &mut Traffic, removed: &str) -> Result<AfterReload> {
    let mut a = AfterReload::default();
    for (i, c) in t.conns.iter_mut().enumerate() {
        let before = c.real.clone();
        if before == removed {
            // Its packets now go to a real that does not know the connection: reset.
            match c.request(&format!("after reload {i}")) {
                Ok(r) => bail!(
                    "connection {} on {before} answered by {r} after the reload",
                    c.local
                ),
                Err(_) => *a.lost.entry(before).or_default() += 1,
            }
        } else {
            let r = c
                .request(&format!("after reload {i}"))
                .with_context(|| format!("connection {} on {before} after the reload", c.local))?;
            ensure!(
                r == before,
                "connection {} moved from {before} to {r}",
                c.local
            );
            *a.kept.entry(before).or_default() += 1;
        }
    }
    for (i, f) in t.flows.iter_mut().enumerate() {
        let r = f
            .ask(&format!("after reload {i}"))
            .with_context(|| format!("UDP flow {} after the reload", f.local))?;
        if r == f.real {
            ensure!(r != removed, "UDP flow {} still on {r}", f.local);
            *a.udp_kept.entry(r).or_default() += 1;
        } else {
            ensure!(
                f.real == removed,
                "UDP flow {} moved from {} to {r}",
                f.local,
                f.real
            );
            *a.udp_moved
                .entry(f.real.clone())
                .or_default()
                .entry(r)
                .or_default() += 1;
        }
    }
    Ok(a)
}

/// "Reload": real3 leaves the manifest; which flows kept their real, which moved.
fn reload_without_real3(d: &mut Demo, config: &Path, t: &mut Traffic) -> Result<()> {
    let real3 = d.topo.real(3).clone();
    let before: BTreeMap<String, usize> = tally(t.conns.iter().map(|c| c.real.as_str()));
    let before_udp: BTreeMap<String, usize> = tally(t.flows.iter().map(|f| f.real.as_str()));
    let ok0 =
        t.m2.get("marklb_config_reloads_total", &[("result", "success")]);
    let m = d
        .manifest
        .clone()
        .without_backend(real3.addr(false))
        .without_backend(real3.addr(true));
    let yaml = m.to_yaml();
    std::fs::write(d.logs.join("lb-reload.yaml"), &yaml)?;
    let t3 = Instant::now();
    write_atomic(config, &yaml)?;
    d.manifest = m;
    let m3 = d.wait_scrape("the reload", |s| {
        s.get("marklb_config_reloads_total", &[("result", "success")]) > ok0
    })?;
    let reload_seen = t3.elapsed();
    let summary = d
        .agent()
        .log_lines("configuration applied")
        .last()
        .and_then(|l| l.split("summary=").nth(1).map(str::to_string))
        .unwrap_or_default();

    let after = probe_after_reload(t, &real3.name)?;
    let tcp4 = t.tcp4;
    let fresh: Vec<TcpConn> = in_netns(&d.topo.client.ns, || -> Result<Vec<TcpConn>> {
        (0..60)
            .map(|_| TcpConn::connect(tcp4, T).context("new connection after the reload"))
            .collect()
    })??;
    let tf = tally(fresh.iter().map(|c| c.real.as_str()));
    ensure!(
        !tf.contains_key(&real3.name),
        "new connections still reach real3: {tf:?}"
    );
    let m4 = d.scrape()?;

    heading(&format!(
        "Reload: {} removed from the manifest (file rewritten, applied {} ms later: {summary})",
        real3.name,
        reload_seen.as_millis()
    ));
    let mut rows = Vec::new();
    for r in &d.topo.reals {
        let g = |t: &BTreeMap<String, usize>| t.get(&r.name).copied().unwrap_or(0);
        let moved: String = after
            .udp_moved
            .get(&r.name)
            .map(|m| {
                m.iter()
                    .map(|(to, n)| format!("{n} -> {to}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "0".into());
        rows.push(vec![
            r.name.clone(),
            g(&before).to_string(),
            g(&after.kept).to_string(),
            g(&after.lost).to_string(),
            g(&before_udp).to_string(),
            g(&after.udp_kept).to_string(),
            moved,
            g(&tf).to_string(),
        ]);
    }
    print!(
        "{}",
        table(
            &[
                "real",
                "open TCP before",
                "kept (same real)",
                "reset",
                "UDP flows before",
                "kept",
                "moved",
                "new TCP after"
            ],
            &rows
        )
    );
    println!(
        "  marks invalidated with {}: {:.0}; reals programmed {:.0} -> {:.0}; reloads ok {:.0}, failed {:.0}",
        real3.name,
        m3.get("marklb_marks_removed_total", &[("reason", "real_removed")]),
        t.m2.get("marklb_reals", &[]),
        m3.get("marklb_reals", &[]),
        m4.get("marklb_config_reloads_total", &[("result", "success")]),
        m4.get("marklb_config_reloads_total", &[("result", "failure")]),
    );
    println!(
        "  connections on the remaining reals kept their real; {}'s TCP connections were reset \
         (their packets now reach a real that does not know them) and its UDP flows moved",
        real3.name
    );
    drop(fresh);
    Ok(())
}
