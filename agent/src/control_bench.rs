//! `marklb-agent bench --control-plane`: how fast the agent programs the datapath and
//! installs flow marks, and how much memory it needs.
//!
//! - programming 1,000 VIPs x 100 reals from nothing, and applying a one-real change,
//!   through the same diff-apply path a reload uses;
//! - mark installs per second through the mark manager with the emulated NIC backend;
//! - new-flow event to installed mark latency, end to end: packets (BPF_PROG_TEST_RUN of
//!   SYNs to distinct flows) emit events, a consumer thread with its own handle on the same
//!   pinned maps (as the daemon) turns them into marks;
//! - process RSS idle and with 100,000 flow rules.

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
    attach,
    balancer::{Balancer, VipId},
    datapath::{Datapath, LoadOptions, Prog},
    desired::{Desired, MarkPolicy, VipPlan},
    maglev::Backend,
    marks::{EmulatedNic, MarkManager},
    packet::FrameSpec,
    reconcile,
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
    /// Event-to-mark latency from packets through the ring buffer, microseconds.
    pub event_to_mark_p50_us: f64,
    pub event_to_mark_p99_us: f64,
    pub events_measured: usize,
    pub rss_idle_mib: f64,
    pub rss_100k_rules_mib: f64,
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
            },
        );
    }
    Desired {
        vips: map,
        marks: policy(MarkScope::PerFlow, 65_535),
        mtu: 1500,
        icmp_too_big: true,
        icmp_echo: true,
        encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
        encap_src_v6_be: [0; 4],
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
    let mut lb = Balancer::new(&dp);
    let mut marks = MarkManager::new(Box::new(EmulatedNic::new(&dp)?), desired.marks);
    reconcile::check_capacity(&lb, &desired).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let report = reconcile::apply(&mut dp, &mut lb, &mut marks, &desired)?;
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
    let report = reconcile::apply(&mut dp, &mut lb, &mut marks, &changed)?;
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
    let mut lb = Balancer::new(&dp);
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
        _pad: 0,
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

    let (p50, p99, n) = event_latency()?;
    Ok(ControlReport {
        vips: VIPS,
        reals_per_vip: REALS,
        table_size: TABLE,
        program_all_s,
        one_real_change_s,
        mark_installs_per_s,
        event_to_mark_p50_us: p50,
        event_to_mark_p99_us: p99,
        events_measured: n,
        rss_idle_mib,
        rss_100k_rules_mib,
    })
}

/// Packets -> events -> consumer thread -> marks, on two handles of the same pinned maps.
fn event_latency() -> Result<(f64, f64, usize)> {
    const FLOWS: u32 = 20_000;
    /// 10,000 new flows per second.
    const PACE: Duration = Duration::from_micros(100);
    let mount = BpffsMount::new()?;
    let opts = LoadOptions {
        pin_dir: Some(mount.0.join("maps")),
        ..LoadOptions::default()
    };
    std::fs::create_dir_all(mount.0.join("maps"))?;
    let mut producer = Datapath::load(&opts)?;
    let mut lb = Balancer::new(&producer);
    let vip_addr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let reals: Vec<Backend> = (1..=10u8)
        .map(|i| Backend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, i)),
            weight: 1,
        })
        .collect();
    lb.set_vip(&mut producer, VipId::tcp(vip_addr, 80), &reals, 65_537)?;
    let cfg = plan(0, 0, 65_537, &[]).lb_config([2, 0, 0, 0, 0, 0xfe]);
    producer.set_config(&cfg)?;

    let mut consumer = Datapath::load(&opts)?;
    let mut reader = consumer.take_events().context("events")?;
    let nic = EmulatedNic::new(&consumer)?;
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let handle = std::thread::spawn(move || -> Vec<Duration> {
        use std::os::fd::AsRawFd;
        let mut marks = MarkManager::new(Box::new(nic), policy(MarkScope::PerFlow, 65_535));
        let mut lat = Vec::new();
        let fd = reader.as_raw_fd();
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut pfd, 1, 20) };
            let mut got = false;
            while let Some(ev) = reader.next_event() {
                got = true;
                if let Some(d) = marks.on_event(&mut consumer, &ev) {
                    lat.push(d);
                }
            }
            if !got && stop.load(Ordering::Relaxed) {
                return lat;
            }
        }
    });
    // Distinct flows at a steady offered load (one call per packet): latency is measured
    // below the install capacity, which the install-rate figure gives separately.
    let start = Instant::now();
    for i in 0..FLOWS {
        while start.elapsed() < PACE * i {
            std::hint::spin_loop();
        }
        let frame = FrameSpec::tcp(
            IpAddr::V4(Ipv4Addr::from(0xc000_0000u32 + (i >> 16))),
            (i & 0xffff) as u16,
            vip_addr,
            80,
            true,
        )
        .build();
        producer.test_run(Prog::Balancer, &frame, None)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let mut lat = handle
        .join()
        .map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    lat.sort();
    drop(mount);
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), lat.len()))
}

pub fn render(r: &ControlReport) -> String {
    format!(
        "marklb control-plane benchmark\n\
         program {} VIPs x {} reals (Maglev {}) from nothing: {:.3} s\n\
         apply a one-real change:                   {:.4} s\n\
         mark installs (emulated NIC):              {:.0} /s\n\
         event-to-mark latency ({} flows at 10k/s): p50 {:.0} us, p99 {:.0} us\n\
         RSS idle: {:.1} MiB; with 100,000 flow rules: {:.1} MiB\n",
        r.vips,
        r.reals_per_vip,
        r.table_size,
        r.program_all_s,
        r.one_real_change_s,
        r.mark_installs_per_s,
        r.events_measured,
        r.event_to_mark_p50_us,
        r.event_to_mark_p99_us,
        r.rss_idle_mib,
        r.rss_100k_rules_mib
    )
}
