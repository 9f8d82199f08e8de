//! `marklb-agent bench --control-plane`: how fast the agent programs the datapath and
//! installs flow marks, and how much memory it needs.
//!
//! - programming 1,000 VIPs x 100 reals from nothing, and applying a one-real change,
//!   through the same diff-apply path a reload uses;
//! - mark installs per second through the mark manager with the emulated NIC backend;
//! - new-flow event to installed mark latency, end to end: packets (BPF_PROG_TEST_RUN of
//!   a SYN and the packet after it, which raises the event, for distinct flows) emit events, a consumer thread with its own handle on the same
//!   pinned maps (as the daemon) turns them into marks through the node engine, alone and
//!   with a `/metrics` scrape every 100 ms over 1,000 VIPs and 4,000 reals;
//! - process RSS idle and with 100,000 flow rules;
//! - mellanox rule requests: building and encoding tc flower requests per second, and the
//!   whole backend path (handles, batching into datagrams, bookkeeping) against a kernel
//!   that acks everything at once, so the agent's side of a NIC's insert rate is known.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use marklb_common::{FlowKey, NewFlowEvent};
use marklb_crds::loadbalancer::MarkScope;
use serde::Serialize;

use crate::{
    apply, attach,
    datapath::{Datapath, LoadOptions, Prog},
    desired::{Desired, MarkPolicy, NextHop, NodeSettings, Owner, VipPlan},
    maglev::Backend,
    marks::{EmulatedNic, MarkManager},
    metrics::Metrics,
    model::DatapathModel,
    node::{self, Core, NodeHandle, NodeView, Published},
    packet::FrameSpec,
    plan as diff,
    vip::VipId,
};

#[derive(Clone, Debug, Serialize)]
pub struct ControlReport {
    pub vips: usize,
    pub reals_per_vip: usize,
    pub table_size: u32,
    /// Seconds to program every VIP from an empty datapath.
    pub program_all_s: f64,
    /// Seconds to apply a change of one real in one VIP.
    pub one_real_change_s: f64,
    /// Marks installed per second by the mark manager (emulated NIC).
    pub mark_installs_per_s: f64,
    /// Event-to-mark latency from packets through the event rings, microseconds.
    pub event_to_mark_p50_us: f64,
    pub event_to_mark_p99_us: f64,
    /// The same p99 with a `/metrics` scrape every 100 ms (1,000 VIPs, 4,000 reals).
    pub event_to_mark_p99_scraped_us: f64,
    /// Mean time one of those scrapes took, milliseconds.
    pub scrape_ms: f64,
    pub events_measured: usize,
    pub rss_idle_mib: f64,
    pub rss_100k_rules_mib: f64,
    /// tc flower rule requests built and encoded per second (IPv4, IPv6).
    pub rule_requests_v4_per_s: f64,
    pub rule_requests_v6_per_s: f64,
    /// Rules per second through the mellanox backend with batching (64 per datagram),
    /// against a kernel that acks at once: the agent's ceiling, not the NIC's.
    pub mellanox_installs_per_s: f64,
}

/// A kernel that accepts every request at once (the backend's own cost only).
struct AckingKernel(u32);

impl crate::tc::TcTransport for AckingKernel {
    fn next_seq(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
    fn request(&mut self, _: u32, _: &[u8]) -> Result<(), crate::tc::TcError> {
        Ok(())
    }
    fn batch(
        &mut self,
        msgs: &[(u32, Vec<u8>)],
    ) -> Result<Vec<Result<(), crate::tc::TcError>>, crate::tc::TcError> {
        // What the socket does before sending: one datagram of every request.
        let datagram: Vec<u8> = msgs.iter().flat_map(|(_, m)| m.iter().copied()).collect();
        std::hint::black_box(&datagram);
        Ok(msgs.iter().map(|_| Ok(())).collect())
    }
    fn dump(&mut self, _: u32, _: &[u8]) -> Result<Vec<Vec<u8>>, crate::tc::TcError> {
        Ok(Vec::new())
    }
}

/// Rule requests: (IPv4 encodes/s, IPv6 encodes/s, backend installs/s).
pub fn rule_requests() -> Result<(f64, f64, f64)> {
    use crate::{
        marks::{
            HwBackend,
            mellanox::{self, Mellanox},
        },
        tc::flower::{self, RuleId},
    };
    const N: u32 = 200_000;
    let encode = |v6: bool| -> Result<f64> {
        let t = Instant::now();
        let mut bytes = 0usize;
        for i in 0..N {
            let mut f = flow(i);
            if v6 {
                f.src_be = [0x2001_0db8u32.to_be(), 0, 0, i.to_be()];
                f.dst_be = [0x2001_0db8u32.to_be(), 0, 0xf, 1u32.to_be()];
            }
            let id = RuleId {
                ifindex: 3,
                chain: 0,
                prio: 1 + v6 as u16,
                handle: i + 1,
                v6,
            };
            let m = mellanox::flow_match(&f);
            bytes += flower::add_rule(i, &id, &m, 1 + i % 65_535)?.len();
        }
        std::hint::black_box(bytes);
        Ok(N as f64 / t.elapsed().as_secs_f64())
    };
    let v4 = encode(false)?;
    let v6 = encode(true)?;
    let (mut nic, _) = Mellanox::with_transport(
        Box::new(AckingKernel(0)),
        3,
        &|_| false,
        Box::new(Instant::now),
    )?;
    let t = Instant::now();
    let mut i = 0u32;
    while i < 65_535 {
        nic.begin_batch();
        for _ in 0..256 {
            if i == 65_535 {
                break;
            }
            nic.install(&flow(i), 1 + i)?;
            i += 1;
        }
        anyhow::ensure!(nic.end_batch().is_empty(), "a rule was refused");
    }
    let installs = i as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(nic.counts().installed == 65_535, "{:?}", nic.counts());
    Ok((v4, v6, installs))
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn policy(scope: MarkScope, capacity: u32) -> MarkPolicy {
    MarkPolicy {
        scope,
        capacity,
        idle_timeout: Duration::from_secs(3600),
    }
}

fn plan(vips: usize, reals: usize, table_size: u32, pool: &[IpAddr]) -> Desired {
    let mut map = BTreeMap::new();
    for v in 0..vips {
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + v as u32 + 1));
        let backends = (0..reals)
            .map(|r| Backend {
                addr: pool[(v * 7 + r) % pool.len()],
                weight: 1,
            })
            .collect();
        map.insert(
            VipId::tcp(addr, 80),
            VipPlan {
                label: format!("vip{v}"),
                backends,
                table_size,
                owner: Owner::new("bench", "lb"),
            },
        );
    }
    Desired {
        vips: map,
        settings: NodeSettings {
            interface: None,
            next_hop: NextHop::default(),
            marks: policy(MarkScope::PerFlow, 65_535),
            mtu: 1500,
            icmp_too_big: true,
            icmp_echo: true,
            encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
            encap_src_v6_be: [0; 4],
            udp_packets_before_mark: marklb_common::DEFAULT_UDP_EVENT_PACKETS,
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn flow(i: u32) -> FlowKey {
    FrameSpec::tcp(
        IpAddr::V4(Ipv4Addr::from(0xc000_0000u32 + (i >> 16))),
        (i & 0xffff) as u16,
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        80,
        true,
    )
    .flow()
}

/// A private bpffs mount, so two handles can open the same pinned maps.
struct BpffsMount(PathBuf);

impl BpffsMount {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("marklb-bench-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        attach::ensure_bpffs(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run() -> Result<ControlReport> {
    const VIPS: usize = 1_000;
    const REALS: usize = 100;
    const TABLE: u32 = 65_537;
    const RULES: u32 = 100_000;
    let rss_start = rss_mib();

    // 1,000 x 100 from nothing, then one real changed.
    let pool: Vec<IpAddr> = (0..4_000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a64_0000u32 + i)))
        .collect();
    let desired = plan(VIPS, REALS, TABLE, &pool);
    let capacity = (VIPS as u32 + 1) * TABLE + 1;
    let mut dp = Datapath::load(&LoadOptions {
        ring_capacity: capacity,
        ..LoadOptions::default()
    })
    .context("loading the datapath (needs root and bpf())")?;
    let mut lb = DatapathModel::new(&dp);
    let mut marks = MarkManager::new(Box::new(EmulatedNic::new(&dp)?), desired.settings.marks);
    diff::check_capacity(&lb, &desired).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let report = apply::apply(&mut dp, &mut lb, &mut marks, &desired)?;
    let program_all_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.added.len() == VIPS,
        "programmed {} VIPs",
        report.added.len()
    );
    let mut changed = desired.clone();
    let first = *changed.vips.keys().next().expect("vips");
    changed.vips.get_mut(&first).expect("vip").backends[0].addr = pool[pool.len() - 1];
    let t = Instant::now();
    let report = apply::apply(&mut dp, &mut lb, &mut marks, &changed)?;
    let one_real_change_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.changed.len() == 1 && report.unchanged == VIPS - 1,
        "{report:?}"
    );
    drop((dp, lb, marks));

    // Mark installs per second: the manager on synthetic events.
    let mut dp = Datapath::load(&LoadOptions {
        nic_flows: 1 << 17,
        ..LoadOptions::default()
    })?;
    let mut lb = DatapathModel::new(&dp);
    let vip = VipId::tcp(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80);
    let backends: Vec<Backend> = pool[..10]
        .iter()
        .map(|&addr| Backend { addr, weight: 1 })
        .collect();
    lb.set_vip(&mut dp, vip, &backends, TABLE)?;
    let real_id = lb.real_id(&pool[0]).context("real")?;
    let real_gen = dp.real(real_id)?.generation;
    let vip_id = lb.vip_stats_id(&vip).context("vip")?;
    let event = |i: u32| NewFlowEvent {
        flow: flow(i),
        vip_id,
        real_id,
        real_gen,
        check: 0,
        ts_ns: 0,
    };
    let mut per_flow = MarkManager::new(
        Box::new(EmulatedNic::new(&dp)?),
        policy(MarkScope::PerFlow, 65_535),
    );
    let t = Instant::now();
    for i in 0..65_535 {
        per_flow.on_event(&mut dp, &event(i));
    }
    let mark_installs_per_s = per_flow.stats.installed as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(per_flow.stats.installed == 65_535, "{:?}", per_flow.stats);
    per_flow.flush(&mut dp);
    drop(per_flow);

    // RSS with 100k flow rules (per-real marks: 16-bit marks cap per-flow marks at 65,535).
    let rss_idle_mib = rss_mib().max(rss_start);
    let mut per_real = MarkManager::new(
        Box::new(EmulatedNic::new(&dp)?),
        policy(MarkScope::PerReal, 65_535),
    );
    for i in 0..RULES {
        per_real.on_event(&mut dp, &event(i));
    }
    anyhow::ensure!(per_real.rules() == RULES as usize, "{:?}", per_real.stats);
    let rss_100k_rules_mib = rss_mib();
    per_real.flush(&mut dp);
    drop((per_real, dp, lb));

    let (rule_requests_v4_per_s, rule_requests_v6_per_s, mellanox_installs_per_s) =
        rule_requests()?;
    let quiet = event_latency(None)?;
    let scraped = event_latency(Some(Duration::from_millis(100)))?;
    Ok(ControlReport {
        vips: VIPS,
        reals_per_vip: REALS,
        table_size: TABLE,
        program_all_s,
        one_real_change_s,
        mark_installs_per_s,
        event_to_mark_p50_us: quiet.p50_us,
        event_to_mark_p99_us: quiet.p99_us,
        event_to_mark_p99_scraped_us: scraped.p99_us,
        scrape_ms: scraped.scrape_ms,
        events_measured: quiet.events,
        rss_idle_mib,
        rss_100k_rules_mib,
        rule_requests_v4_per_s,
        rule_requests_v6_per_s,
        mellanox_installs_per_s,
    })
}

/// Event-to-mark latency of one run.
struct Latency {
    p50_us: f64,
    p99_us: f64,
    events: usize,
    /// Mean time one scrape took (0 without scrapes).
    scrape_ms: f64,
}

/// VIPs and reals programmed while event-to-mark latency is measured with scrapes: every
/// scrape reports one series per VIP and per real, so its cost grows with them.
const SCRAPED_VIPS: usize = 1_000;
const SCRAPED_REALS_PER_VIP: usize = 4;

/// Packets -> events -> consumer thread -> marks, on two handles of the same pinned maps.
/// The consumer takes the agent's state lock per batch of events, as the daemon does; with
/// `scrape_every`, another thread renders `/metrics` that often, as Prometheus would.
fn event_latency(scrape_every: Option<Duration>) -> Result<Latency> {
    const FLOWS: u32 = 20_000;
    /// 10,000 new flows per second.
    const PACE: Duration = Duration::from_micros(100);
    const TABLE: u32 = 1_009;
    let mount = BpffsMount::new()?;
    let opts = LoadOptions {
        pin_dir: Some(mount.0.join("maps")),
        ring_capacity: (SCRAPED_VIPS as u32 + 1) * TABLE,
        ..LoadOptions::default()
    };
    std::fs::create_dir_all(mount.0.join("maps"))?;
    let mut producer = Datapath::load(&opts)?;
    let mut lb = DatapathModel::new(&producer);
    let pool: Vec<IpAddr> = (0..(SCRAPED_VIPS * SCRAPED_REALS_PER_VIP) as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a01_0000u32 + i)))
        .collect();
    let vips = plan(SCRAPED_VIPS, SCRAPED_REALS_PER_VIP, TABLE, &pool);
    for (i, (vip, p)) in vips.vips.iter().enumerate() {
        let backends: Vec<Backend> = pool[i * SCRAPED_REALS_PER_VIP..][..SCRAPED_REALS_PER_VIP]
            .iter()
            .map(|&addr| Backend { addr, weight: 1 })
            .collect();
        lb.set_vip(&mut producer, *vip, &backends, p.table_size)?;
    }
    let vip_addr = vips.vips.keys().next().context("a VIP")?.addr;
    let cfg = plan(0, 0, TABLE, &[]).lb_config([2, 0, 0, 0, 0, 0xfe]);
    producer.set_config(&cfg)?;

    let mut consumer = Datapath::load(&opts)?;
    let reader = consumer.take_events().context("events")?;
    let nic = EmulatedNic::new(&consumer)?;
    let model = DatapathModel::adopt(&consumer)?;
    let view = NodeView {
        interface: "bench0".into(),
        vips: node::view_vips(&model, &vips),
        reals: model.real_ids().map(|(a, id)| (*a, id)).collect(),
        ..NodeView::default()
    };
    let published = Published::new(consumer.stats_reader()?, view);
    let marks = MarkManager::new(Box::new(nic), policy(MarkScope::PerFlow, 65_535));
    let engine = NodeHandle::new(
        Core {
            dp: consumer,
            model,
            marks,
        },
        published,
    );
    let done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (stop, engine) = (done.clone(), engine.clone());
        std::thread::spawn(move || consume(reader, &engine, &stop))
    };
    let scraper = scrape_every.map(|every| {
        let (stop, engine) = (done.clone(), engine.clone());
        std::thread::spawn(move || {
            let metrics = Metrics::new();
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let p = engine.published();
                let body = metrics.render(&p.view(), &p.marks(), p.stats());
                std::hint::black_box(body);
                took.push(t.elapsed());
                std::thread::sleep(every);
            }
            took
        })
    });
    // Distinct flows at a steady offered load (one call per packet): latency is measured
    // below the install capacity, which the install-rate figure gives separately.
    let start = Instant::now();
    for i in 0..FLOWS {
        while start.elapsed() < PACE * i {
            std::hint::spin_loop();
        }
        // The SYN teaches the connection table; the packet after it raises the event.
        for syn in [true, false] {
            let frame = FrameSpec::tcp(
                IpAddr::V4(Ipv4Addr::from(0xc000_0000u32 + (i >> 16))),
                (i & 0xffff) as u16,
                vip_addr,
                80,
                syn,
            )
            .build();
            producer.test_run(Prog::Balancer, &frame, None)?;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let mut lat = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    let mut scrape_ms = 0.0;
    if let Some(s) = scraper {
        let took = s
            .join()
            .map_err(|_| anyhow::anyhow!("scraper thread panicked"))?;
        anyhow::ensure!(took.len() >= 3, "only {} scrapes", took.len());
        scrape_ms = took.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / took.len() as f64;
    }
    lat.sort();
    drop(engine);
    drop(mount);
    Ok(Latency {
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        events: lat.len(),
        scrape_ms,
    })
}

/// The agent's event consumer, on a thread: a batch of events per wake-up, handled by the
/// node engine as the daemon's consumer task does, and a drain every `EVENT_POLL_NS` as the
/// daemon's (the datapath wakes the consumer at most once per `EVENT_WAKE_GAP_NS` per CPU).
fn consume(
    mut reader: crate::datapath::EventReader,
    engine: &NodeHandle,
    stop: &AtomicBool,
) -> Vec<Duration> {
    use std::os::fd::AsRawFd;
    let mut lat = Vec::new();
    let mut batch = Vec::with_capacity(1024);
    let fd = reader.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let poll_ms = (marklb_common::EVENT_POLL_NS / 1_000_000).max(1) as i32;
        unsafe { libc::poll(&mut pfd, 1, poll_ms) };
        while let Some(ev) = reader.next_event() {
            batch.push(ev);
            if batch.len() == 1024 {
                break;
            }
        }
        if batch.is_empty() {
            if stop.load(Ordering::Relaxed) {
                return lat;
            }
            continue;
        }
        lat.extend(engine.handle_events(&mut batch));
    }
}

pub fn render(r: &ControlReport) -> String {
    format!(
        "marklb control-plane benchmark\n\
         program {} VIPs x {} reals (Maglev {}) from nothing: {:.3} s\n\
         apply a one-real change:                   {:.4} s\n\
         mark installs (emulated NIC):              {:.0} /s\n\
         event-to-mark latency ({} flows at 10k/s): p50 {:.0} us, p99 {:.0} us\n\
         ... with a /metrics scrape every 100 ms ({} VIPs, {} reals; {:.1} ms each): p99 {:.0} us\n\
         RSS idle: {:.1} MiB; with 100,000 flow rules: {:.1} MiB\n\
         tc flower rule requests built+encoded:     {:.0} /s IPv4, {:.0} /s IPv6\n\
         mellanox backend installs (64/datagram, kernel acking at once): {:.0} /s\n",
        r.vips,
        r.reals_per_vip,
        r.table_size,
        r.program_all_s,
        r.one_real_change_s,
        r.mark_installs_per_s,
        r.events_measured,
        r.event_to_mark_p50_us,
        r.event_to_mark_p99_us,
        SCRAPED_VIPS,
        SCRAPED_VIPS * SCRAPED_REALS_PER_VIP,
        r.scrape_ms,
        r.event_to_mark_p99_scraped_us,
        r.rss_idle_mib,
        r.rss_100k_rules_mib,
        r.rule_requests_v4_per_s,
        r.rule_requests_v6_per_s,
        r.mellanox_installs_per_s
    )
}
