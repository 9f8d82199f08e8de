//! Network-namespace toolkit for the end-to-end tests and the demo.
//!
//! [`Topology::build`] creates, with names unique to this process and topology:
//!
//! ```text
//!  client ns            router ns                          lb ns
//!  c0 10.100.0.2/24 ── r-c  10.100.0.1/24
//!     fd00:100::2/64        fd00:100::1/64
//!                      r-lb 10.200.0.1/24 ─────────────── lb0 10.200.0.2/24
//!                           fd00:200::1/64   (trivial XDP)    fd00:200::2/64 (the balancer)
//!                      r-rN 10.201.N.1/24 ─────────────── rN  10.201.N.2/24     real N ns
//!                           fd00:201:N::1/64                  fd00:201:N::2/64  VIPs on lo
//! ```
//!
//! The router forwards (IPv4 and IPv6) and routes every VIP (/32, /128) via the load
//! balancer; reals answer directly through the router (direct server return), so
//! reverse-path filtering is off on the router and the reals. TX checksum offload is off
//! on every veth (XDP never sees partial checksums), and a trivial XDP program sits on
//! `r-lb` so that frames the balancer sends back with `XDP_TX` are delivered promptly.
//!
//! Everything is torn down in `Drop`, also when a test panics: helper threads are told to
//! stop and waited for, then the namespaces are deleted (their veths go with them).
//! Namespaces left by a process that was killed are removed by the next [`Topology::build`].
//!
//! Commands (`ip`, `ethtool`, `sysctl`) are run through `std::process` with timeouts; code
//! runs inside a namespace on a thread that `setns`es into `/var/run/netns/<name>`
//! ([`in_netns`], [`spawn_in_netns`]). Sockets keep the namespace they were created in,
//! so a connection opened inside the client namespace can be used from any thread.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use marklb_agent::datapath::{Datapath, LoadOptions, Prog};
use marklb_common::{CFG_F_ENABLED, LbConfig};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace this module creates (`mlb<pid>x<n>-<role>`).
pub const NAME_PREFIX: &str = "mlb";
/// Longest any external command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Drop` waits for helper threads to leave the namespaces.
pub const TEARDOWN_WAIT: Duration = Duration::from_secs(5);
/// Outer IPv4 source prefix (/16) the balancer should use here: routed nowhere, owned by
/// nobody, so hashed outer sources never collide with a real address.
pub const ENCAP_SRC_V4: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 0);
/// Outer IPv6 source prefix (/96).
pub const ENCAP_SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 0);

/// Panics with a clear message unless running as root (namespaces, veth, bpf()).
pub fn require_root(what: &str) {
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "\n\n*** {what} NEEDS ROOT (network namespaces, veth, XDP) ***\nrunning as uid {euid}; \
         run it as root. These tests are never skipped.\n"
    );
}

// ---------------------------------------------------------------------------------------
// Running commands and code inside namespaces
// ---------------------------------------------------------------------------------------

/// Runs a command to completion within `timeout`, feeding `stdin`; returns its stdout.
/// Fails with the command line and its stderr when it fails or times out.
pub fn run_command(
    cmd: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> io::Result<String> {
    let line = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{line}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    // Drain the pipes on threads so a chatty command cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_with_timeout(&mut child, timeout, &line)?;
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        return Err(io::Error::other(format!(
            "{line}: {status}: {}",
            stderr.trim()
        )));
    }
    Ok(stdout)
}

/// `ip [-n ns] <args>`.
pub fn ip(ns: Option<&str>, args: &[&str]) -> io::Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run_command(&mut cmd, None, COMMAND_TIMEOUT)
}

/// Attaches the trivial XDP program (passes everything) to `iface` in this namespace, so that
/// frames the peer of a veth sends back with `XDP_TX` are delivered to it (a veth hands XDP
/// frames only to a peer that runs XDP itself). Detached when the returned datapath drops.
pub fn attach_trivial_xdp(iface: &str) -> io::Result<Datapath> {
    let mut dp = Datapath::load(&LoadOptions {
        ring_capacity: 2,
        conn_table_size: 16,
        nic_flows: 16,
        pin_dir: None,
    })
    .map_err(|e| io::Error::other(format!("loading the trivial XDP program: {e}")))?;
    let prog = dp.program(Prog::BenchTrivial).map_err(io::Error::other)?;
    prog.attach(iface, aya::programs::XdpMode::Driver)
        .map_err(|e| io::Error::other(format!("trivial XDP on {iface}: {e}")))?;
    Ok(dp)
}

/// Runs several `ip` commands (one per line, without the leading `ip`) in one process.
pub fn ip_batch(ns: Option<&str>, commands: &[String]) -> io::Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let input = commands.join("\n") + "\n";
    run_command(&mut cmd, Some(&input), COMMAND_TIMEOUT)
        .map_err(|e| io::Error::new(e.kind(), format!("{e}\nbatch:\n{input}")))?;
    Ok(())
}

/// Runs a program inside a namespace (`ip netns exec ns argv...`); returns its stdout.
pub fn netns_exec(ns: &str, argv: &[&str]) -> io::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    run_command(&mut cmd, None, COMMAND_TIMEOUT)
}

/// The handle file of a named namespace.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

fn enter_netns(handle: &File) -> io::Result<()> {
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_netns(ns: &str) -> io::Result<File> {
    File::open(netns_path(ns)).map_err(|e| io::Error::new(e.kind(), format!("namespace {ns}: {e}")))
}

/// Runs `f` on a thread inside namespace `ns` and returns its result (a panic in `f` is
/// propagated). `f` may borrow from the caller.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    let handle = open_netns(ns)?;
    std::thread::scope(|s| {
        let t = s.spawn(move || -> io::Result<R> {
            enter_netns(&handle)?;
            Ok(f())
        });
        match t.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Starts a named thread inside namespace `ns` running `f`; fails if entering fails.
pub fn spawn_in_netns<R: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> io::Result<JoinHandle<R>> {
    let handle = open_netns(ns)?;
    let (tx, rx) = mpsc::channel::<io::Result<()>>();
    let t = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let entered = enter_netns(&handle);
            drop(handle);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                // The caller got the error; end this thread without running `f` (and without
                // the panic hook's noise).
                std::panic::resume_unwind(Box::new("setns failed"));
            }
            f()
        })?;
    rx.recv()
        .map_err(|_| io::Error::other("netns thread died"))??;
    Ok(t)
}

/// The network namespace inode of a thread or process (`/proc/.../ns/net`).
pub fn netns_inode(proc_path: &Path) -> Option<u64> {
    std::fs::metadata(proc_path.join("ns/net"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// The namespace inode behind a named namespace.
pub fn named_netns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(netns_path(ns))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Deletes namespaces named by this module whose creating process is gone (left behind by
/// a test run that was killed). Returns their names.
pub fn cleanup_stale() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && ip(None, &["netns", "del", &name]).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

// ---------------------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------------------

/// What to build.
#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// Real servers (1..=250).
    pub reals: usize,
    /// IPv4 VIPs: routed via the load balancer, configured on every real's loopback.
    pub vips_v4: Vec<Ipv4Addr>,
    /// IPv6 VIPs, likewise.
    pub vips_v6: Vec<Ipv6Addr>,
    /// MTU of every veth except the client's link.
    pub mtu: u32,
    /// MTU of the client's link (both ends). Below `mtu - 40`, full-sized client packets
    /// still fit once the balancer adds its outer header (TCP's MSS follows it).
    pub client_mtu: u32,
    /// Attach the trivial XDP program to the router's side of the load balancer's link
    /// (needed for `XDP_TX` from the balancer to arrive promptly).
    pub router_xdp: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            reals: 2,
            vips_v4: vec![Ipv4Addr::new(10, 99, 0, 1)],
            vips_v6: vec![Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1)],
            mtu: 1500,
            client_mtu: 1500,
            router_xdp: true,
        }
    }
}

/// One end of a veth link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Namespace the interface lives in.
    pub ns: String,
    pub iface: String,
    pub mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Port {
    pub fn mac_string(&self) -> String {
        mac_string(&self.mac)
    }
}

/// A host (client, load balancer or real) and its link to the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Role: `client`, `lb`, `real1`, `real2`, ...
    pub name: String,
    /// The namespace.
    pub ns: String,
    /// Its interface.
    pub port: Port,
    /// The router's end of its link (its gateway).
    pub gateway: Port,
}

impl Host {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.port.v6)
        } else {
            IpAddr::V4(self.port.v4)
        }
    }
}

/// Formats a MAC as `02:00:...`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Tells helper threads to stop and counts those still running in the namespaces.
#[derive(Clone, Debug, Default)]
pub struct Lifeline {
    shutdown: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
}

impl Lifeline {
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Helper threads still running.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    fn enter(&self) -> RunningGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        RunningGuard(self.running.clone())
    }
}

struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A built topology; dropping it tears everything down.
pub struct Topology {
    /// Unique id, the prefix of every namespace name.
    pub id: String,
    pub client: Host,
    pub lb: Host,
    pub reals: Vec<Host>,
    /// The router's namespace.
    pub router_ns: String,
    pub vips_v4: Vec<Ipv4Addr>,
    pub vips_v6: Vec<Ipv6Addr>,
    pub mtu: u32,
    lifeline: Lifeline,
    /// Holds the trivial program's link on the router.
    router_xdp: Option<Datapath>,
    /// Namespaces created so far (deleted in reverse order).
    created: Vec<String>,
}

static TOPOLOGY_SEQ: AtomicUsize = AtomicUsize::new(0);

const CLIENT_LINK: u8 = 0;
const LB_LINK: u8 = 1;

fn link_mac(link: u8, host_side: bool) -> [u8; 6] {
    [0x02, 0, 0, link, 0, if host_side { 2 } else { 1 }]
}

impl Topology {
    /// Builds the topology (needs root). On error, whatever was created is removed.
    pub fn build(opts: TopologyOptions) -> io::Result<Self> {
        require_root("Topology::build");
        assert!(
            (1..=250).contains(&opts.reals),
            "1..=250 reals, not {}",
            opts.reals
        );
        cleanup_stale();
        let id = format!(
            "{NAME_PREFIX}{}x{}",
            std::process::id(),
            TOPOLOGY_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let ns = |role: &str| format!("{id}-{role}");
        let router_ns = ns("router");
        let host =
            |name: String, link: u8, iface: String, gw_iface: String, v4: [u8; 3], v6: [u16; 3]| {
                let hns = ns(&name);
                let addr4 = |last| Ipv4Addr::new(v4[0], v4[1], v4[2], last);
                let addr6 = |last| Ipv6Addr::new(v6[0], v6[1], v6[2], 0, 0, 0, 0, last);
                Host {
                    port: Port {
                        ns: hns.clone(),
                        iface,
                        mac: link_mac(link, true),
                        v4: addr4(2),
                        v6: addr6(2),
                    },
                    gateway: Port {
                        ns: router_ns.clone(),
                        iface: gw_iface,
                        mac: link_mac(link, false),
                        v4: addr4(1),
                        v6: addr6(1),
                    },
                    ns: hns,
                    name,
                }
            };
        let client = host(
            "client".into(),
            CLIENT_LINK,
            "c0".into(),
            "r-c".into(),
            [10, 100, 0],
            [0xfd00, 0x100, 0],
        );
        let lb = host(
            "lb".into(),
            LB_LINK,
            "lb0".into(),
            "r-lb".into(),
            [10, 200, 0],
            [0xfd00, 0x200, 0],
        );
        let reals = (1..=opts.reals)
            .map(|n| {
                host(
                    format!("real{n}"),
                    LB_LINK + n as u8,
                    format!("r{n}"),
                    format!("r-r{n}"),
                    [10, 201, n as u8],
                    [0xfd00, 0x201, n as u16],
                )
            })
            .collect();
        let mut topo = Topology {
            id,
            client,
            lb,
            reals,
            router_ns,
            vips_v4: opts.vips_v4.clone(),
            vips_v6: opts.vips_v6.clone(),
            mtu: opts.mtu,
            lifeline: Lifeline::default(),
            router_xdp: None,
            created: Vec::new(),
        };
        // From here on, an error drops `topo`, which removes what was created.
        topo.create(&opts)?;
        Ok(topo)
    }

    fn hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(&self.client)
            .chain(std::iter::once(&self.lb))
            .chain(self.reals.iter())
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.router_ns.clone())
            .chain(self.hosts().map(|h| h.ns.clone()))
            .collect()
    }

    fn create(&mut self, opts: &TopologyOptions) -> io::Result<()> {
        for ns in self.namespaces() {
            ip(None, &["netns", "add", &ns])?;
            self.created.push(ns);
        }
        // Sysctls before any interface exists, so `default` values reach the veths.
        let common = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ];
        let router_only = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"];
        // DSR reals: never answer ARP for the VIPs on lo, never use them as ARP sources.
        let real_only = [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ];
        for ns in self.namespaces() {
            let mut args = vec!["sysctl", "-q", "-w"];
            args.extend(common);
            if ns == self.router_ns {
                args.extend(router_only);
            }
            if self.reals.iter().any(|r| r.ns == ns) {
                args.extend(real_only);
            }
            netns_exec(&ns, &args)?;
        }

        let mut router = vec!["link set lo up".to_string()];
        for h in self.hosts() {
            let g = &h.gateway;
            let p = &h.port;
            let mtu = if h.name == "client" {
                opts.client_mtu
            } else {
                opts.mtu
            };
            router.push(format!(
                "link add {} address {} mtu {mtu} type veth peer name {} address {} mtu {mtu} netns {}",
                g.iface,
                g.mac_string(),
                p.iface,
                p.mac_string(),
                p.ns
            ));
            router.push(format!("addr add {}/24 dev {}", g.v4, g.iface));
            router.push(format!("addr add {}/64 dev {} nodad", g.v6, g.iface));
            router.push(format!("link set {} up", g.iface));
        }
        for v in &self.vips_v4 {
            router.push(format!("route add {v}/32 via {}", self.lb.port.v4));
        }
        for v in &self.vips_v6 {
            router.push(format!("route add {v}/128 via {}", self.lb.port.v6));
        }
        ip_batch(Some(&self.router_ns), &router)?;

        for h in self.hosts() {
            let p = &h.port;
            let mut cmds = vec![
                "link set lo up".to_string(),
                format!("addr add {}/24 dev {}", p.v4, p.iface),
                format!("addr add {}/64 dev {} nodad", p.v6, p.iface),
                format!("link set {} up", p.iface),
                format!("route add default via {}", h.gateway.v4),
                format!("route add ::/0 via {}", h.gateway.v6),
            ];
            if h.name.starts_with("real") {
                for v in &self.vips_v4 {
                    cmds.push(format!("addr add {v}/32 dev lo"));
                }
                for v in &self.vips_v6 {
                    cmds.push(format!("addr add {v}/128 dev lo nodad"));
                }
            }
            ip_batch(Some(&h.ns), &cmds)?;
        }

        // No partial checksums anywhere: XDP programs see final bytes.
        for h in self.hosts() {
            for p in [&h.port, &h.gateway] {
                netns_exec(&p.ns, &["ethtool", "-K", &p.iface, "tx", "off"])?;
            }
        }

        if opts.router_xdp {
            let mut dp = Datapath::load(&LoadOptions {
                ring_capacity: 2,
                conn_table_size: 16,
                nic_flows: 16,
                pin_dir: None,
            })
            .map_err(|e| io::Error::other(format!("loading the trivial XDP program: {e}")))?;
            let iface = self.lb.gateway.iface.clone();
            in_netns(&self.router_ns, || -> io::Result<()> {
                let prog = dp.program(Prog::BenchTrivial).map_err(io::Error::other)?;
                prog.attach(&iface, aya::programs::XdpMode::Driver)
                    .map_err(|e| io::Error::other(format!("trivial XDP on {iface}: {e}")))?;
                Ok(())
            })??;
            self.router_xdp = Some(dp);
        }
        Ok(())
    }

    /// The host named `real<n>` (1-based `n`).
    pub fn real(&self, n: usize) -> &Host {
        &self.reals[n - 1]
    }

    /// The real whose name is `name`.
    pub fn real_by_name(&self, name: &str) -> Option<&Host> {
        self.reals.iter().find(|r| r.name == name)
    }

    /// Every VIP, IPv4 first.
    pub fn vips(&self) -> Vec<IpAddr> {
        self.vips_v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(self.vips_v6.iter().map(|a| IpAddr::V6(*a)))
            .collect()
    }

    /// The balancer configuration for this topology: enabled, next hop = the router's side
    /// of the load balancer's link, outer sources from [`ENCAP_SRC_V4`]/[`ENCAP_SRC_V6`],
    /// MTU of the links.
    pub fn balancer_config(&self) -> LbConfig {
        let v6 = ENCAP_SRC_V6.octets();
        let w = |i: usize| u32::from_ne_bytes(v6[i..i + 4].try_into().expect("4 bytes"));
        LbConfig {
            flags: CFG_F_ENABLED,
            mtu: self.mtu,
            next_hop_mac: self.lb.gateway.mac,
            encap_src_v4_be: u32::from_ne_bytes(ENCAP_SRC_V4.octets()),
            encap_src_v6_be: [w(0), w(4), w(8), w(12)],
            ..Default::default()
        }
    }

    /// Tells helper threads to stop, and counts them.
    pub fn lifeline(&self) -> Lifeline {
        self.lifeline.clone()
    }

    /// Runs `f` inside namespace `ns` (see [`in_netns`]).
    pub fn in_ns<R: Send>(&self, ns: &str, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        in_netns(ns, f)
    }

    /// Starts a helper thread in `ns`, counted by the lifeline (so teardown waits for it).
    /// `f` should return soon after `lifeline.is_shutdown()`.
    pub fn spawn_in<R: Send + 'static>(
        &self,
        ns: &str,
        name: &str,
        f: impl FnOnce(Lifeline) -> R + Send + 'static,
    ) -> io::Result<JoinHandle<R>> {
        let lifeline = self.lifeline.clone();
        let guard = lifeline.enter();
        spawn_in_netns(ns, name, move || {
            let _guard = guard;
            f(lifeline)
        })
    }

    /// Human-readable summary (namespaces, interfaces, MACs, addresses).
    pub fn describe(&self) -> String {
        let mut s = format!("topology {} (router ns {})\n", self.id, self.router_ns);
        for h in self.hosts() {
            s += &format!(
                "  {:<7} ns {:<22} {:<4} {} {} {}   <->  router {:<6} {} {} {}\n",
                h.name,
                h.ns,
                h.port.iface,
                h.port.mac_string(),
                h.port.v4,
                h.port.v6,
                h.gateway.iface,
                h.gateway.mac_string(),
                h.gateway.v4,
                h.gateway.v6
            );
        }
        s += &format!(
            "  VIPs {:?} (routed via lb, on every real's lo)\n",
            self.vips()
        );
        s
    }

    /// Tears down now (what `Drop` does); returns what could not be removed.
    pub fn teardown(&mut self) -> Vec<String> {
        self.lifeline.shutdown.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while self.lifeline.running() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Detaches the router's XDP program.
        self.router_xdp = None;
        let mut failed = Vec::new();
        while let Some(ns) = self.created.pop() {
            if let Err(e) = ip(None, &["netns", "del", &ns]) {
                failed.push(format!("{ns}: {e}"));
            }
        }
        failed
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let failed = self.teardown();
        if !failed.is_empty() {
            eprintln!("netns teardown left: {failed:?}");
        }
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What is left of a topology's namespaces after teardown (empty when nothing is).
pub fn leftovers(namespaces: &[String], inodes: &[u64]) -> Vec<String> {
    let mut left = Vec::new();
    for ns in namespaces {
        if netns_path(ns).exists() {
            left.push(format!("handle {}", netns_path(ns).display()));
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for ns in namespaces {
            if mounts.lines().any(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m == netns_path(ns).to_string_lossy())
            }) {
                left.push(format!("mount of {ns}"));
            }
        }
    }
    // Any task on the machine (threads of this process included) still inside one of them.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                if let Some(ino) = netns_inode(&t.path())
                    && inodes.contains(&ino)
                {
                    left.push(format!("task {} in netns inode {ino}", t.path().display()));
                }
            }
        }
    }
    left
}

// ---------------------------------------------------------------------------------------
// Traffic tools
// ---------------------------------------------------------------------------------------

/// Poll interval of helper threads (how fast they notice a stop).
const POLL: Duration = Duration::from_millis(50);

fn stopped(stop: &AtomicBool, life: &Lifeline) -> bool {
    stop.load(Ordering::Relaxed) || life.is_shutdown()
}

/// `port` on every VIP of the topology.
fn vip_sockets(topo: &Topology, port: u16) -> Vec<SocketAddr> {
    topo.vips()
        .into_iter()
        .map(|a| SocketAddr::new(a, port))
        .collect()
}

/// What a serving thread of an identify server knows.
#[derive(Clone)]
pub struct Worker {
    /// The real's name, the first word of every answer.
    name: String,
    stop: Arc<AtomicBool>,
    /// Connections accepted (TCP) or datagrams answered (UDP).
    count: Arc<AtomicU64>,
    /// Connections open now (TCP).
    open: Arc<AtomicUsize>,
    life: Lifeline,
}

impl Worker {
    fn stopped(&self) -> bool {
        stopped(&self.stop, &self.life)
    }
}

/// How an identify server binds and serves one protocol ([`Tcp`], [`Udp`]).
pub trait IdProtocol {
    type Socket: Send + 'static;
    /// Names the serving threads.
    const KIND: &'static str;
    /// Binds `addr` (in the calling thread's namespace); the socket and its local address.
    fn bind(addr: &SocketAddr) -> io::Result<(Self::Socket, SocketAddr)>;
    /// Serves `socket` until the worker is told to stop.
    fn serve(socket: Self::Socket, worker: Worker);
}

/// TCP: answers each connection with the real's name (`"<name>\n"`), then every line `L` it
/// receives with `"<name> L\n"`, and keeps the connection open until the client closes it or
/// the server stops.
pub struct Tcp;

/// UDP: answers each datagram `P` with `"<name> P"`, from the address it was sent to.
pub struct Udp;

/// An identify server on every given address of one real (one thread per socket, counted by
/// the topology's lifeline so teardown waits for them). Dropping it stops and joins the threads.
pub struct IdServer<P: IdProtocol> {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    _protocol: std::marker::PhantomData<P>,
}

/// The TCP identify server.
pub type TcpIdServer = IdServer<Tcp>;
/// The UDP identify server.
pub type UdpIdServer = IdServer<Udp>;

impl<P: IdProtocol> IdServer<P> {
    /// Listens on `port` of every VIP inside real `n`'s namespace.
    pub fn start(topo: &Topology, n: usize, port: u16) -> io::Result<Self> {
        let real = topo.real(n);
        Self::start_on(topo, &real.ns, &real.name, &vip_sockets(topo, port))
    }

    /// Listens on `addrs` inside `ns`, answering as `name`.
    pub fn start_on(
        topo: &Topology,
        ns: &str,
        name: &str,
        addrs: &[SocketAddr],
    ) -> io::Result<Self> {
        let sockets = in_netns(ns, || {
            addrs
                .iter()
                .map(|a| P::bind(a).map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}"))))
                .collect::<io::Result<Vec<_>>>()
        })??;
        let mut me = IdServer {
            name: name.to_string(),
            addrs: addrs.to_vec(),
            stop: Arc::new(AtomicBool::new(false)),
            count: Arc::new(AtomicU64::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
            _protocol: std::marker::PhantomData,
        };
        for (socket, local) in sockets {
            let worker = Worker {
                name: name.to_string(),
                stop: me.stop.clone(),
                count: me.count.clone(),
                open: me.open.clone(),
                life: topo.lifeline(),
            };
            me.threads.push(topo.spawn_in(
                ns,
                &format!("{} {name} {local}", P::KIND),
                move |life| P::serve(socket, Worker { life, ..worker }),
            )?);
        }
        Ok(me)
    }

    /// Stops serving, closes every connection and waits for the threads.
    pub fn stop(self) {}
}

impl<P: IdProtocol> Drop for IdServer<P> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl IdServer<Tcp> {
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl IdServer<Udp> {
    /// Datagrams answered so far.
    pub fn answered(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl IdProtocol for Tcp {
    type Socket = TcpListener;
    const KIND: &'static str = "tcp-id";

    fn bind(addr: &SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let local = l.local_addr()?;
        Ok((l, local))
    }

    /// Accepts connections until the server stops; one thread per connection.
    fn serve(l: TcpListener, w: Worker) {
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !w.stopped() {
            match l.accept() {
                Ok((s, _)) => {
                    w.count.fetch_add(1, Ordering::Relaxed);
                    let w = w.clone();
                    let guard = w.life.enter();
                    conns.push(std::thread::spawn(move || {
                        let _guard = guard;
                        w.open.fetch_add(1, Ordering::SeqCst);
                        let _ = serve_tcp(s, &w);
                        w.open.fetch_sub(1, Ordering::SeqCst);
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL / 5),
                Err(_) => std::thread::sleep(POLL),
            }
            conns.retain(|c| !c.is_finished());
        }
        for c in conns {
            let _ = c.join();
        }
    }
}

fn serve_tcp(mut s: TcpStream, w: &Worker) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(POLL))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    s.write_all(format!("{}\n", w.name).as_bytes())?;
    let mut pending = Vec::new();
    let mut buf = [0u8; 2048];
    while !w.stopped() {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    s.write_all(format!("{} {line}\n", w.name).as_bytes())?;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A socket read that timed out (nothing arrived within the poll interval).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl IdProtocol for Udp {
    type Socket = UdpSocket;
    const KIND: &'static str = "udp-id";

    fn bind(addr: &SocketAddr) -> io::Result<(UdpSocket, SocketAddr)> {
        let s = UdpSocket::bind(addr)?;
        s.set_read_timeout(Some(POLL))?;
        let local = s.local_addr()?;
        Ok((s, local))
    }

    /// Answers datagrams until the server stops.
    fn serve(s: UdpSocket, w: Worker) {
        let mut buf = [0u8; 2048];
        while !w.stopped() {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let mut reply = format!("{} ", w.name).into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    // Counted before the answer leaves, so a client holding its answer
                    // finds it counted (CI once read the count between the two).
                    w.count.fetch_add(1, Ordering::Relaxed);
                    if s.send_to(&reply, from).is_err() {
                        w.count.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }
}

/// TCP and UDP identify servers on every real of a topology.
pub struct Servers {
    pub tcp: Vec<TcpIdServer>,
    pub udp: Vec<UdpIdServer>,
}

impl Servers {
    /// Starts both kinds on every real (TCP on `tcp_port`, UDP on `udp_port` of every VIP).
    pub fn start(topo: &Topology, tcp_port: u16, udp_port: u16) -> io::Result<Self> {
        let mut s = Servers {
            tcp: Vec::new(),
            udp: Vec::new(),
        };
        for n in 1..=topo.reals.len() {
            s.tcp.push(TcpIdServer::start(topo, n, tcp_port)?);
            s.udp.push(UdpIdServer::start(topo, n, udp_port)?);
        }
        Ok(s)
    }

    /// TCP connections accepted, per real name.
    pub fn tcp_accepted(&self) -> BTreeMap<String, u64> {
        self.tcp
            .iter()
            .map(|s| (s.name.clone(), s.accepted()))
            .collect()
    }

    /// UDP datagrams answered, per real name.
    pub fn udp_answered(&self) -> BTreeMap<String, u64> {
        self.udp
            .iter()
            .map(|s| (s.name.clone(), s.answered()))
            .collect()
    }
}

/// One client connection to a VIP and the real that answered it.
#[derive(Debug)]
pub struct TcpConn {
    /// The real that greeted the connection.
    pub real: String,
    /// Client address and (distinct) source port.
    pub local: SocketAddr,
    /// The VIP and port.
    pub peer: SocketAddr,
    stream: TcpStream,
    pending: Vec<u8>,
}

impl TcpConn {
    /// Opens a connection (in whatever namespace the calling thread is in) and reads the
    /// greeting.
    pub fn connect(vip: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&vip, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("connect {vip}: {e}")))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut c = TcpConn {
            real: String::new(),
            local,
            peer: vip,
            stream,
            pending: Vec::new(),
        };
        c.real = c
            .read_line()
            .map_err(|e| io::Error::new(e.kind(), format!("greeting on {local}: {e}")))?;
        Ok(c)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            match self.stream.read(&mut buf)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ));
                }
                n => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends one line and returns the name of the real that answered it (the echo is
    /// checked).
    pub fn request(&mut self, msg: &str) -> io::Result<String> {
        assert!(!msg.contains('\n'), "one line");
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let line = self.read_line()?;
        match line.split_once(' ') {
            Some((real, echo)) if echo == msg => Ok(real.to_string()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {line:?} to {msg:?}"),
            )),
        }
    }

    /// Closes the connection (FIN) and waits for the server's close, bounded.
    pub fn close(mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Opens `n` connections to `vip` from namespace `ns` (each with its own source port) and
/// reads which real greeted each. They stay open until dropped or closed.
pub fn tcp_connect_many(
    ns: &str,
    vip: SocketAddr,
    n: usize,
    timeout: Duration,
) -> io::Result<Vec<TcpConn>> {
    in_netns(ns, || {
        (0..n).map(|_| TcpConn::connect(vip, timeout)).collect()
    })?
}

/// A UDP "flow": one client socket (its own source port) talking to a VIP.
#[derive(Debug)]
pub struct UdpFlow {
    /// The real that answered the first datagram.
    pub real: String,
    pub local: SocketAddr,
    pub vip: SocketAddr,
    socket: UdpSocket,
    timeout: Duration,
}

impl UdpFlow {
    /// Opens a socket (in the calling thread's namespace) and asks once.
    pub fn open(vip: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let any: SocketAddr = if vip.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .expect("addr");
        let socket = UdpSocket::bind(any)?;
        socket.connect(vip)?;
        let local = socket.local_addr()?;
        let mut f = UdpFlow {
            real: String::new(),
            local,
            vip,
            socket,
            timeout,
        };
        f.real = f.ask("hello")?;
        Ok(f)
    }

    /// Sends `msg` (retrying up to 3 times within the timeout) and returns the name of the
    /// real that answered. Only answers from the VIP itself are accepted (the socket is
    /// connected to it): a reply from any other source would be discarded by the kernel.
    pub fn ask(&mut self, msg: &str) -> io::Result<String> {
        let tries = 3u32;
        self.socket.set_read_timeout(Some(self.timeout / tries))?;
        let mut buf = [0u8; 2048];
        for _ in 0..tries {
            self.socket.send(msg.as_bytes())?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    return match line.split_once(' ') {
                        Some((real, echo)) if echo == msg => Ok(real.to_string()),
                        _ => Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected answer {line:?}"),
                        )),
                    };
                }
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {} to {msg:?} from {}", self.vip, self.local),
        ))
    }
}

/// Opens `n` UDP flows to `vip` from namespace `ns` (distinct source ports) and reads
/// which real answered each.
pub fn udp_flows(
    ns: &str,
    vip: SocketAddr,
    n: usize,
    timeout: Duration,
) -> io::Result<Vec<UdpFlow>> {
    in_netns(ns, || (0..n).map(|_| UdpFlow::open(vip, timeout)).collect())?
}

/// [`udp_flows`] that each send as many datagrams as a UDP flow needs to earn a flow mark
/// (`marklb_common::DEFAULT_UDP_EVENT_PACKETS`, the agent's setting, the first included),
/// every one answered by the flow's real.
pub fn udp_flows_earning_marks(
    ns: &str,
    vip: SocketAddr,
    n: usize,
    timeout: Duration,
) -> io::Result<Vec<UdpFlow>> {
    let mut flows = udp_flows(ns, vip, n, timeout)?;
    for f in &mut flows {
        for i in 1..marklb_common::DEFAULT_UDP_EVENT_PACKETS {
            let real = f.ask(&format!("earning {i}"))?;
            if real != f.real {
                return Err(io::Error::other(format!(
                    "UDP flow {} moved from {} to {real}",
                    f.local, f.real
                )));
            }
        }
    }
    Ok(flows)
}

/// How many times each name occurs.
pub fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n.to_string()).or_default() += 1;
    }
    t
}

/// Waits for a child process; kills it (and says so, naming `what`) after `timeout`.
pub fn wait_with_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
    what: &str,
) -> io::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: timed out after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
