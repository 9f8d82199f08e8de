//! Decapsulation on the reals: loads the embedded `marklb-decap` object, tells it which
//! addresses are local, attaches it (XDP native, falling back to generic; or TC ingress:
//! tcx, falling back to cls_bpf) and reads its counters.
//!
//! The balancer sends each packet to its real inside an outer IPv4/IPv6 header (direct
//! server return). Kernels with `ipip`/`ip6tnl` devices can strip it themselves; this
//! program does it where they are missing (or unwanted): packets whose outer destination
//! is a local address lose the outer header and continue up the stack as the inner packet,
//! addressed to the VIP that the real carries on its loopback.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    net::IpAddr,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
        xdp::XdpLinkId,
    },
};
use marklb_common::{
    DecapCounter, addr_words,
    decap::{
        DECAP_ADDR_V4, DECAP_ADDR_V6, DECAP_F_DROP_FOREIGN, MAX_DECAP_ADDRS, decap_map_names as n,
        decap_prog_names,
    },
    words_addr,
};

use crate::datapath::{DatapathError, Result, map_err, prog_err};

/// The decapsulation object, built by build.rs from `ebpf/prog` (bin `marklb-decap`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/marklb-decap"));

/// `TC_ACT_UNSPEC`: what the TC variant returns for packets that go on (decapsulated or not
/// ours): the next tcx program, or cls_bpf's default action (on to the stack).
pub const TC_ACT_UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`: the TC variant dropped the packet.
pub const TC_ACT_SHOT: i32 = 2;

/// Where the program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecapMode {
    /// XDP in the driver (native), falling back to generic XDP where the driver has none.
    Xdp,
    /// Generic (skb) XDP only.
    XdpGeneric,
    /// TC ingress: tcx, falling back to a cls_bpf filter on a clsact qdisc.
    Tc,
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attached {
    XdpNative,
    XdpGeneric,
    Tcx,
    ClsBpf,
}

/// Which TC attachment API to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcApi {
    /// tcx (kernel 6.6+), falling back to cls_bpf.
    Auto,
    /// tcx only.
    Tcx,
    /// A cls_bpf filter (direct action) on the clsact qdisc, added if missing.
    ClsBpf,
}

#[derive(Debug)]
enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// One attachment, as reported by [`Decap::attachments`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub how: Attached,
}

/// Sum over CPUs of every decapsulation counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapCounters(pub BTreeMap<DecapCounter, u64>);

impl DecapCounters {
    pub fn get(&self, c: DecapCounter) -> u64 {
        self.0.get(&c).copied().unwrap_or(0)
    }

    /// Packets decapsulated (all three encapsulations).
    pub fn decapsulated(&self) -> u64 {
        DecapCounter::DECAPSULATED
            .iter()
            .map(|c| self.get(*c))
            .sum()
    }

    /// Packets dropped, for any reason.
    pub fn dropped(&self) -> u64 {
        self.0
            .iter()
            .filter(|(c, _)| c.is_drop())
            .map(|(_, v)| v)
            .sum()
    }

    /// Every packet the program saw (each bumps exactly one counter).
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Per-counter difference `self - earlier`.
    pub fn since(&self, earlier: &DecapCounters) -> DecapCounters {
        DecapCounters(
            self.0
                .iter()
                .map(|(k, v)| (*k, v.saturating_sub(earlier.get(*k))))
                .collect(),
        )
    }

    /// `label -> value`, every counter (for JSON and metrics).
    pub fn labelled(&self) -> BTreeMap<&'static str, u64> {
        DecapCounter::ALL
            .iter()
            .map(|c| (c.label(), self.get(*c)))
            .collect()
    }

    /// `label=value` for the non-zero counters, for logs.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| format!("{}={v}", k.label()))
            .collect();
        if parts.is_empty() {
            "no packets".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// The outcome of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapRun {
    /// XDP action (`XDP_PASS` = 2, `XDP_DROP` = 1), or TC verdict ([`TC_ACT_UNSPEC`],
    /// [`TC_ACT_SHOT`]) as an `i32` cast to `u32`.
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

/// The loaded decapsulation object: its maps, both programs, and what it is attached to.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, [u32; 4], u32>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
    links: Vec<(String, Link, Attached)>,
}

impl std::fmt::Debug for Decap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decap")
            .field("attachments", &self.attachments())
            .finish_non_exhaustive()
    }
}

impl Decap {
    /// Loads the object and verifies both programs (needs root / CAP_BPF + CAP_NET_ADMIN).
    /// Nothing is attached and no address is local yet: until [`Decap::set_local_addrs`],
    /// every packet passes untouched.
    pub fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let xdp: &mut Xdp = ebpf
            .program_mut(decap_prog_names::XDP)
            .ok_or(DatapathError::MissingProgram(decap_prog_names::XDP))?
            .try_into()
            .map_err(prog_err(decap_prog_names::XDP))?;
        xdp.load().map_err(prog_err(decap_prog_names::XDP))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(decap_prog_names::TC)
            .ok_or(DatapathError::MissingProgram(decap_prog_names::TC))?
            .try_into()
            .map_err(prog_err(decap_prog_names::TC))?;
        tc.load().map_err(prog_err(decap_prog_names::TC))?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name));
        let addrs = take(n::DECAP_ADDRS)?
            .try_into()
            .map_err(map_err(n::DECAP_ADDRS))?;
        let counters = take(n::DECAP_COUNTERS)?
            .try_into()
            .map_err(map_err(n::DECAP_COUNTERS))?;
        let config = take(n::DECAP_CONFIG)?
            .try_into()
            .map_err(map_err(n::DECAP_CONFIG))?;
        Ok(Self {
            ebpf,
            addrs,
            counters,
            config,
            links: Vec::new(),
        })
    }

    fn xdp(&mut self) -> Result<&mut Xdp> {
        let name = decap_prog_names::XDP;
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    fn tc(&mut self) -> Result<&mut SchedClassifier> {
        let name = decap_prog_names::TC;
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    /// Makes exactly `addrs` the local addresses (outer destinations that are decapsulated):
    /// new ones are added before stale ones are removed, so an address in both sets never
    /// stops being served.
    pub fn set_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let mut want: BTreeMap<[u32; 4], u32> = BTreeMap::new();
        for a in addrs {
            *want.entry(addr_words(*a)).or_default() |= family_bit(a);
        }
        if want.len() > MAX_DECAP_ADDRS as usize {
            return Err(DatapathError::Capacity(format!(
                "{} local addresses, at most {MAX_DECAP_ADDRS}",
                want.len()
            )));
        }
        let have: Vec<([u32; 4], u32)> = self
            .addrs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::DECAP_ADDRS))?;
        for (k, v) in &want {
            if !have.contains(&(*k, *v)) {
                self.addrs
                    .insert(k, v, 0)
                    .map_err(map_err(n::DECAP_ADDRS))?;
            }
        }
        for (k, _) in have {
            if !want.contains_key(&k) {
                match self.addrs.remove(&k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(n::DECAP_ADDRS)(e)),
                }
            }
        }
        Ok(())
    }

    /// The local addresses currently programmed.
    pub fn local_addrs(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for kv in self.addrs.iter() {
            let (k, bits) = kv.map_err(map_err(n::DECAP_ADDRS))?;
            if bits & DECAP_ADDR_V4 != 0 {
                out.insert(words_addr(&k, false));
            }
            if bits & DECAP_ADDR_V6 != 0 {
                out.insert(words_addr(&k, true));
            }
        }
        Ok(out)
    }

    /// Drop (instead of pass untouched) encapsulated packets whose outer destination is not
    /// a local address.
    pub fn set_drop_foreign(&mut self, drop: bool) -> Result<()> {
        let flags = if drop { DECAP_F_DROP_FOREIGN } else { 0 };
        self.config
            .set(0, flags, 0)
            .map_err(map_err(n::DECAP_CONFIG))
    }

    /// Attaches the XDP variant to `iface` (in the calling thread's network namespace):
    /// native first, generic if the driver has no XDP support.
    pub fn attach_xdp(&mut self, iface: &str) -> Result<Attached> {
        match self.attach_xdp_mode(iface, XdpMode::Driver) {
            Ok(a) => Ok(a),
            Err(native) => {
                tracing::info!(%iface, %native, "native XDP attach failed, trying generic XDP");
                self.attach_xdp_mode(iface, XdpMode::Skb)
            }
        }
    }

    /// Attaches the XDP variant in this mode (`Driver`, `Skb` or `Default`).
    pub fn attach_xdp_mode(&mut self, iface: &str, mode: XdpMode) -> Result<Attached> {
        let id = self
            .xdp()?
            .attach(iface, mode)
            .map_err(prog_err(decap_prog_names::XDP))?;
        let how = if mode == XdpMode::Skb {
            Attached::XdpGeneric
        } else {
            Attached::XdpNative
        };
        self.links.push((iface.to_string(), Link::Xdp(id), how));
        Ok(how)
    }

    /// Attaches the TC variant to `iface`'s ingress: tcx, or cls_bpf where tcx is missing.
    pub fn attach_tc(&mut self, iface: &str) -> Result<Attached> {
        self.attach_tc_with(iface, TcApi::Auto)
    }

    /// Attaches the TC variant to `iface`'s ingress through the given API.
    pub fn attach_tc_with(&mut self, iface: &str, api: TcApi) -> Result<Attached> {
        let name = decap_prog_names::TC;
        if api != TcApi::ClsBpf {
            let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
            match self
                .tc()?
                .attach_with_options(iface, TcAttachType::Ingress, tcx)
            {
                Ok(id) => {
                    self.links
                        .push((iface.to_string(), Link::Tc(id), Attached::Tcx));
                    return Ok(Attached::Tcx);
                }
                Err(e) if api == TcApi::Tcx => return Err(prog_err(name)(e)),
                Err(e) => tracing::debug!(%e, "tcx attach failed, trying cls_bpf"),
            }
        }
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(TcError::AlreadyAttached) => {}
            // The qdisc may exist already (EEXIST through netlink).
            Err(TcError::NetlinkError(e)) if e.to_string().contains("exists") => {}
            Err(e) => {
                return Err(DatapathError::Io(io::Error::other(format!(
                    "clsact qdisc on {iface}: {e}"
                ))));
            }
        }
        let nl = TcAttachOptions::Netlink(NlOptions::default());
        let id = self
            .tc()?
            .attach_with_options(iface, TcAttachType::Ingress, nl)
            .map_err(prog_err(name))?;
        self.links
            .push((iface.to_string(), Link::Tc(id), Attached::ClsBpf));
        Ok(Attached::ClsBpf)
    }

    /// Where the programs are attached.
    pub fn attachments(&self) -> Vec<Attachment> {
        self.links
            .iter()
            .map(|(i, _, how)| Attachment {
                interface: i.clone(),
                how: *how,
            })
            .collect()
    }

    /// Detaches every program attached to `iface` by this object.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(i, _, _)| i == iface);
        self.links = rest;
        for (_, link, _) in mine {
            match link {
                Link::Xdp(id) => self
                    .xdp()?
                    .detach(id)
                    .map_err(prog_err(decap_prog_names::XDP))?,
                Link::Tc(id) => self
                    .tc()?
                    .detach(id)
                    .map_err(prog_err(decap_prog_names::TC))?,
            }
        }
        Ok(())
    }

    /// Detaches everything (also happens when the `Decap` is dropped).
    pub fn detach_all(&mut self) -> Result<()> {
        let ifaces: BTreeSet<String> = self.links.iter().map(|(i, _, _)| i.clone()).collect();
        for i in ifaces {
            self.detach(&i)?;
        }
        Ok(())
    }

    /// Sum over CPUs of every counter.
    pub fn counters(&self) -> Result<DecapCounters> {
        let mut out = BTreeMap::new();
        for &c in DecapCounter::ALL {
            let per_cpu = self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_err(n::DECAP_COUNTERS))?;
            out.insert(c, per_cpu.iter().sum());
        }
        Ok(DecapCounters(out))
    }

    /// Runs the XDP variant once on `frame` (`BPF_PROG_TEST_RUN`).
    pub fn test_run(&mut self, frame: &[u8]) -> Result<DecapRun> {
        let r = crate::datapath::testrun::run_xdp(self.xdp()?, frame, None, 1)
            .map_err(prog_err(decap_prog_names::XDP))?;
        Ok(DecapRun {
            action: r.action,
            frame: r.frame,
        })
    }

    /// Runs the TC variant once on `frame` (an skb built by the kernel from it).
    pub fn test_run_tc(&mut self, frame: &[u8]) -> Result<DecapRun> {
        let mut data_out = vec![0u8; frame.len() + 256];
        let res = self
            .tc()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ..TestRunOptions::new()
            })
            .map_err(prog_err(decap_prog_names::TC))?;
        let size = (res.data_size_out as usize).min(data_out.len());
        Ok(DecapRun {
            action: res.return_value,
            frame: data_out[..size].to_vec(),
        })
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        // aya detaches on drop too; this only makes the order explicit.
        let _ = self.detach_all();
    }
}

fn family_bit(a: &IpAddr) -> u32 {
    if a.is_ipv6() {
        DECAP_ADDR_V6
    } else {
        DECAP_ADDR_V4
    }
}

/// The interface (in the calling thread's network namespace) that holds `addr`.
pub fn interface_holding(addr: IpAddr) -> io::Result<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() && found.is_none() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        let here = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                Some(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        };
        if here == Some(addr) {
            found = Some(
                unsafe { CStr::from_ptr(ifa.ifa_name) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    unsafe { libc::freeifaddrs(head) };
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface holds {addr}"),
        )
    })
}

/// The addresses of `iface` (in the calling thread's network namespace), without IPv6
/// link-local ones (the balancer never encapsulates to those).
pub fn interface_addrs(iface: &str) -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null()
            || unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != iface.as_bytes()
        {
            continue;
        }
        found = true;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if a.segments()[0] & 0xffc0 != 0xfe80 {
                    out.push(IpAddr::V6(a));
                }
            }
            _ => {}
        }
    }
    unsafe { libc::freeifaddrs(head) };
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface}"),
        ));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `marklb-agent decap`: strip the balancer's outer header on a real.
#[derive(Clone, Debug, clap::Args)]
pub struct DecapArgs {
    /// Interface the encapsulated packets arrive on.
    #[arg(long, default_value = "", required_unless_present = "interface_of")]
    pub interface: String,
    /// Instead of --interface: the interface that holds this local address (a node's
    /// InternalIP from the downward API, where interface names differ between nodes).
    #[arg(long, value_name = "ADDR", conflicts_with = "interface")]
    pub interface_of: Option<IpAddr>,
    /// Extra local address to accept as outer destination (repeatable). The interface's own
    /// addresses are always included unless --no-interface-addresses.
    #[arg(long = "address", value_name = "ADDR")]
    pub addresses: Vec<IpAddr>,
    /// Accept only the --address addresses, not the interface's.
    #[arg(long)]
    pub no_interface_addresses: bool,
    /// XDP (native, falling back to generic), generic XDP only, or TC ingress.
    #[arg(long, value_enum, default_value_t = DecapMode::Xdp)]
    pub mode: DecapMode,
    /// Drop encapsulated packets for other destinations instead of passing them.
    #[arg(long)]
    pub drop_foreign: bool,
    /// Seconds between counter reports (and re-reads of the interface's addresses).
    #[arg(long, default_value_t = 10)]
    pub stats_interval: u64,
}

impl DecapArgs {
    /// The local addresses these arguments ask for, read now.
    pub fn local_addrs(&self) -> anyhow::Result<Vec<IpAddr>> {
        let mut addrs = self.addresses.clone();
        if !self.no_interface_addresses {
            addrs.extend(interface_addrs(&self.interface)?);
        }
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }
}

/// Runs the decapsulator until SIGTERM or SIGINT: attaches, reports counters every
/// `stats_interval` (and follows address changes of the interface), detaches on exit and
/// prints the final counters as one JSON line.
pub async fn run(args: DecapArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    // Registered before attaching, so a signal during start-up still detaches cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let total = run_until(args, stop).await?;
    println!("{}", serde_json::to_string(&total.labelled())?);
    Ok(())
}

/// [`run`] with any stop condition (tests, embedding): attaches, reports, follows the
/// interface's addresses, and detaches when `stop` completes; returns the final counters.
pub async fn run_until(
    args: DecapArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<DecapCounters> {
    use anyhow::Context as _;

    let mut args = args;
    if let Some(addr) = args.interface_of {
        args.interface = interface_holding(addr)
            .with_context(|| format!("finding the interface that holds {addr}"))?;
    }
    let mut decap = Decap::load().context("loading the decapsulation object")?;
    let mut addrs = args.local_addrs()?;
    if addrs.is_empty() {
        anyhow::bail!(
            "no local address to decapsulate for: {} has none and no --address was given",
            args.interface
        );
    }
    decap.set_local_addrs(&addrs)?;
    decap.set_drop_foreign(args.drop_foreign)?;
    let how = match args.mode {
        DecapMode::Xdp => decap.attach_xdp(&args.interface)?,
        DecapMode::XdpGeneric => decap.attach_xdp_mode(&args.interface, XdpMode::Skb)?,
        DecapMode::Tc => decap.attach_tc(&args.interface)?,
    };
    tracing::info!(interface = %args.interface, ?how, addresses = ?addrs, "decapsulating");

    let mut tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    tick.tick().await;
    let mut last = decap.counters()?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let now = decap.counters()?;
                tracing::info!(interval = %now.since(&last).summary(), total = %now.summary(), "decap counters");
                last = now;
                match args.local_addrs() {
                    Ok(fresh) if fresh != addrs && !fresh.is_empty() => {
                        tracing::info!(addresses = ?fresh, "local addresses changed");
                        decap.set_local_addrs(&fresh)?;
                        addrs = fresh;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%e, "reading the interface's addresses"),
                }
            }
        }
    }
    decap.detach_all()?;
    let total = decap.counters()?;
    tracing::info!(total = %total.summary(), "detached");
    Ok(total)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        decap: DecapArgs,
    }

    #[test]
    fn args_flatten_and_parse() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from([
            "decap",
            "--interface",
            "eth1",
            "--address",
            "10.0.0.1",
            "--address",
            "fd00::1",
            "--mode",
            "tc",
            "--drop-foreign",
        ]);
        let a = cli.decap;
        assert_eq!(a.interface, "eth1");
        assert_eq!(
            a.addresses,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(a.mode, DecapMode::Tc);
        assert!(a.drop_foreign && !a.no_interface_addresses);
        assert_eq!(a.stats_interval, 10);
        let d = Cli::parse_from(["decap", "--interface", "eth1"]).decap;
        assert_eq!(d.mode, DecapMode::Xdp);
        assert!(Cli::try_parse_from(["decap", "--interface", "eth1", "--mode", "bogus"]).is_err());
        assert!(
            Cli::try_parse_from(["decap"]).is_err(),
            "--interface is required"
        );
        let by_address = Cli::parse_from(["decap", "--interface-of", "10.0.0.7"]).decap;
        assert_eq!(by_address.interface_of, Some("10.0.0.7".parse().unwrap()));
        assert!(
            Cli::try_parse_from(["decap", "--interface", "eth1", "--interface-of", "10.0.0.7"])
                .is_err(),
            "one or the other"
        );
    }

    #[test]
    fn the_interface_holding_an_address() {
        assert_eq!(
            interface_holding("127.0.0.1".parse().unwrap()).unwrap(),
            "lo"
        );
        assert!(interface_holding("192.0.2.251".parse().unwrap()).is_err());
    }

    #[test]
    fn loopback_addresses() {
        let addrs = interface_addrs("lo").expect("lo");
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
        assert!(interface_addrs("no-such-if0").is_err());
        let args = DecapArgs {
            interface: "lo".into(),
            interface_of: None,
            addresses: vec!["192.0.2.1".parse().unwrap()],
            no_interface_addresses: true,
            mode: DecapMode::Xdp,
            drop_foreign: false,
            stats_interval: 1,
        };
        assert_eq!(
            args.local_addrs().unwrap(),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn counter_arithmetic() {
        let mut a = DecapCounters::default();
        a.0.insert(DecapCounter::DecapIpip, 5);
        a.0.insert(DecapCounter::DecapIp4ip6, 2);
        a.0.insert(DecapCounter::DropMalformed, 1);
        a.0.insert(DecapCounter::PassNotIp, 3);
        assert_eq!((a.decapsulated(), a.dropped(), a.total()), (7, 1, 11));
        let mut b = a.clone();
        b.0.insert(DecapCounter::DecapIpip, 9);
        assert_eq!(b.since(&a).get(DecapCounter::DecapIpip), 4);
        assert_eq!(b.since(&a).total(), 4);
        assert_eq!(a.labelled().len(), DecapCounter::ALL.len());
        assert!(a.summary().contains("decap_ipip=5"));
    }
}
