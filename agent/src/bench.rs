//! `marklb-agent bench`: ns/packet of every datapath path, measured with
//! `BPF_PROG_TEST_RUN` in one run, next to a floor measured the same way.
//!
//! Each repetition must see the original frame: the `marklb_bench_restore` wrapper puts it
//! back (with the mark, and a varying source port for many-flow runs) and tail-calls the
//! program under test. The wrapper in front of the trivial program is the floor that is
//! subtracted. After each measurement the path counters must show that every repetition
//! took the measured path; otherwise the benchmark fails instead of printing a wrong figure.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, bail, ensure};
use marklb_common::{
    BENCH_FRAME_MAX, BENCH_STEP_CLOCK, BENCH_STEP_CONN, BENCH_STEP_DOORBELL, BENCH_STEP_EVENT_RING,
    BENCH_STEP_KERNEL_RING, BENCH_STEP_LIMITER, BENCH_STEP_MAGLEV, BENCH_STEP_PARSE,
    BENCH_STEP_VIP, BenchFrame, CFG_F_ENABLED, CFG_F_EVENTS, CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG,
    CFG_F_WAKE_EVERY_EVENT, CONN_WAYS, Counter, DEFAULT_CONN_TABLE_SIZE, EVENT_SLOTS_PER_CPU,
    LbConfig, MarkEntry, addr_words,
};
use serde::Serialize;

mod conn_table;
mod flood;
mod loads;
pub use conn_table::run as run_conn_table;
pub use flood::{FloodEvents, FloodFigure, FloodTotals};
pub use loads::run_loads;

use crate::{
    datapath::{CounterSnapshot, Datapath, LoadOptions, Prog},
    maglev::Backend,
    model::DatapathModel,
    packet::FrameSpec,
    vip::VipId,
};

/// Benchmark settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Repetitions per measurement.
    pub repeat: u32,
    /// Measurements per figure (the median is reported).
    pub rounds: u32,
    /// Distinct flows of the many-flows variant.
    pub flows: u32,
    /// Flows of the rows after the SYN (one repetition each per round).
    pub after_syn_flows: u32,
    /// Connection-table entries of the datapath measured (the agent's default unless
    /// asked): how much memory the many-flows rows' sets are spread over.
    pub conn_table_size: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            repeat: 1_000_000,
            rounds: 5,
            flows: 50_000,
            after_syn_flows: AFTER_SYN_FLOWS,
            conn_table_size: DEFAULT_CONN_TABLE_SIZE,
        }
    }
}

/// Rounds of one figure: a row whose rounds disagree by more than [`MAX_SPREAD`] is
/// measured again (at most [`REMEASURES`] times, keeping the tightest set) and flagged if
/// it never settles.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// (max - min) / median.
    pub spread: f64,
    /// How many times the rounds were measured again.
    pub remeasured: u32,
    /// Still above [`MAX_SPREAD`] after the re-measurements.
    pub unstable: bool,
}

/// Rounds of one row may disagree by this much (max - min over the median).
pub const MAX_SPREAD: f64 = 0.10;
/// Re-measurements of an unsettled row.
const REMEASURES: u32 = 3;

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let (min, max) = (v[0], v[v.len() - 1]);
        let median = v[v.len() / 2];
        Self {
            min,
            median,
            max,
            spread: (max - min) / median.max(1.0),
            remeasured: 0,
            unstable: false,
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub family: &'static str,
    pub path: &'static str,
    pub flows: u32,
    /// Median ns per packet, wrapper included where the path needs it.
    pub ns: f64,
    /// Its rounds (min / median / max ns per packet).
    pub rounds: Spread,
    /// ns above the floor measured the same way.
    pub above_floor: f64,
    /// above_floor(established) / above_floor(this path), same family and flow count.
    pub speedup_vs_established: Option<f64>,
    /// With several loads (`bench --loads`): the row's medians over them.
    pub across_loads: Option<Spread>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub repeat: u32,
    pub rounds: u32,
    /// Freshly loaded datapaths measured (`bench --loads`); each row is the median load's.
    pub loads: u32,
    /// The trivial program alone (no wrapper).
    pub trivial_ns: f64,
    /// Wrapper + trivial program: the floor subtracted from wrapped paths.
    pub floor_ns: f64,
    /// The wrapper's extra cost of shrinking a forwarded (grown) frame back, also
    /// subtracted from forwarding paths (calibrated with a grow-only program).
    pub restore_ns: f64,
    /// The same for a frame with 4 bytes of metadata (a marked frame), subtracted from the
    /// mark rows: the forwarding paths drop the metadata before they grow the frame, and the
    /// wrapper puts it back along with the shrink.
    pub restore_marked_ns: f64,
    /// Connection-table entries of the datapath measured (`None`: several, per row).
    pub conn_table_size: Option<u32>,
    pub figures: Vec<Figure>,
    /// CPU the measuring thread (and so every BPF_PROG_TEST_RUN) is pinned to.
    pub bench_cpu: Option<usize>,
    /// CPU the new-flow event consumer is pinned to.
    pub consumer_cpu: Option<usize>,
    /// The largest spread of any row, and how many rows were re-measured or stayed unstable.
    pub max_spread: f64,
    pub rows_remeasured: usize,
    pub rows_unstable: usize,
    pub steps: Vec<StepFigure>,
    /// Established rows quiet and while `flood_cpu` floods the connection table.
    pub flood: Vec<FloodFigure>,
    /// CPU the flood runs on (None: one CPU only, no flood rows).
    pub flood_cpu: Option<usize>,
    pub events_sent: u64,
    pub events_lost: u64,
}

/// One step of the new-flow path: the cut program up to it, and its own cost (its figure
/// minus the previous step's; the first step's minus the floor).
#[derive(Clone, Debug, Serialize)]
pub struct StepFigure {
    pub family: &'static str,
    pub step: &'static str,
    pub rounds: Spread,
    pub above_floor: f64,
    pub cost: f64,
    /// With several loads: the step's medians over them.
    pub across_loads: Option<Spread>,
}

const REALS: u8 = 10;
const XDP_PASS: u32 = 2;

/// The step program's cuts (`marklb_bench_step`): number, name, and the step whose figure
/// its cost is measured from (the one before, but for the two variants after the limiter).
const STEPS: [(u32, &str, u32); 9] = [
    (BENCH_STEP_PARSE, "parse", 0),
    (BENCH_STEP_VIP, "VIP lookup", BENCH_STEP_PARSE),
    (BENCH_STEP_MAGLEV, "Maglev read", BENCH_STEP_VIP),
    (BENCH_STEP_CONN, "conn table write", BENCH_STEP_MAGLEV),
    (BENCH_STEP_CLOCK, "clock read", BENCH_STEP_CONN),
    (BENCH_STEP_LIMITER, "limiter", BENCH_STEP_CLOCK),
    (
        BENCH_STEP_EVENT_RING,
        "event in the CPU's ring",
        BENCH_STEP_LIMITER,
    ),
    (
        BENCH_STEP_DOORBELL,
        "doorbell with wake-up",
        BENCH_STEP_EVENT_RING,
    ),
    (
        BENCH_STEP_KERNEL_RING,
        "kernel ring buffer instead (before)",
        BENCH_STEP_LIMITER,
    ),
];
/// Repetitions of an event step's round: what a CPU's ring holds.
const EVENT_STEP_REPEAT: u32 = EVENT_SLOTS_PER_CPU;
const BASE_SPORT: u16 = 10_000;
/// Flows of the rows after the SYN by default: one repetition each per round; twice what a
/// CPU's event ring holds, so a consumer that falls behind loses some (counted: the rows
/// accept an event sent or lost).
pub const AFTER_SYN_FLOWS: u32 = 16_384;
/// SYNs per round of the absent-key row: up to 21 rounds (warm-up, re-measurements) stay
/// within the benchmark CPU's share of an unfilled connection table's free entries.
const FRESH_SYNS: u32 = 2_048;
/// Where the absent-key row's flows start (the wrapper adds the sequence number to the
/// source port and address): past every other row's flows.
const FRESH_SYN_SEQ: u32 = 1 << 28;

struct Family {
    name: &'static str,
    client: IpAddr,
    vip: IpAddr,
    other: IpAddr,
    reals: Vec<IpAddr>,
}

fn families() -> [Family; 2] {
    [
        Family {
            name: "ipv4",
            client: "192.0.2.10".parse().expect("ip"),
            vip: "10.0.0.10".parse().expect("ip"),
            other: "10.0.0.99".parse().expect("ip"),
            reals: (1..=REALS)
                .map(|i| format!("10.1.0.{i}").parse().expect("ip"))
                .collect(),
        },
        Family {
            name: "ipv6",
            client: "2001:db8::10".parse().expect("ip"),
            vip: "2001:db8:f::10".parse().expect("ip"),
            other: "2001:db8:f::99".parse().expect("ip"),
            reals: (1..=REALS)
                .map(|i| format!("2001:db8:1::{i}").parse().expect("ip"))
                .collect(),
        },
    ]
}

fn bench_config() -> LbConfig {
    LbConfig {
        flags: CFG_F_ENABLED | CFG_F_ICMP_ECHO | CFG_F_ICMP_TOO_BIG | CFG_F_EVENTS,
        mtu: 1500,
        next_hop_mac: [0x02, 0, 0, 0, 0, 0xfe],
        encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
        encap_src_v6_be: addr_words("fc00:6d6c:62::".parse().expect("ip")),
        // Every new flow emits an event (the worst case for the new-flow path): the
        // limiter runs but never refuses.
        event_interval_ns: 1,
        events_burst: u32::MAX,
        ..Default::default()
    }
}

/// A frame padded to a multiple of 8 bytes (the wrapper copies 8 bytes at a time).
fn bench_frame(spec: &FrameSpec) -> Result<BenchFrame> {
    let mut bytes = spec.build();
    bytes.resize(bytes.len().div_ceil(8) * 8, 0);
    ensure!(
        bytes.len() <= BENCH_FRAME_MAX,
        "frame of {} bytes too long",
        bytes.len()
    );
    let mut data = [0u8; BENCH_FRAME_MAX];
    data[..bytes.len()].copy_from_slice(&bytes);
    // Source port right after the IP header; low 16 bits of the source address at the
    // end of the address field.
    let (sport_off, saddr_off) = if spec.src.is_ipv6() {
        (14 + 40, 14 + 8 + 14)
    } else {
        (14 + 20, 14 + 12 + 2)
    };
    Ok(BenchFrame {
        len: bytes.len() as u32,
        mark: 0,
        flows: 1,
        sport_off,
        saddr_off,
        mark_span: 0,
        seq: 0,
        handshake_tcp_off: 0,
        data,
        _pad: [0; 32],
    })
}

/// The bytes of `f` the wrapper restores: what a test run of it is given.
fn frame_bytes(f: &BenchFrame) -> &[u8] {
    &f.data[..f.len as usize]
}

/// `f` with another mark and flows, starting at `seq`. (A function: closures building the
/// frame in place with `..*f` make rustc's borrow checker fail on the data array.)
fn with_flows(f: &BenchFrame, mark: u32, flows: u32, seq: u32) -> BenchFrame {
    BenchFrame {
        mark,
        flows,
        seq,
        ..*f
    }
}

struct Bench<'a> {
    dp: &'a mut Datapath,
    opts: &'a BenchOptions,
    /// The CPU the measuring thread is pinned to: its wrapper's frame is the one written
    /// and its counters the ones checked, whatever another CPU runs meanwhile (None:
    /// unpinned, every CPU's).
    cpu: Option<usize>,
}

impl Bench<'_> {
    /// The path counters of the measuring CPU (summed over CPUs when unpinned).
    fn counters(&self) -> Result<CounterSnapshot> {
        Ok(match self.cpu {
            Some(cpu) => self.dp.counters_on(cpu)?,
            None => self.dp.counters()?,
        })
    }

    /// Gives the measuring CPU's wrapper `frame` (every CPU's when unpinned).
    fn set_frame(&mut self, frame: &BenchFrame) -> Result<()> {
        match self.cpu {
            Some(cpu) => self.dp.set_bench_frame_on(cpu, frame)?,
            None => self.dp.set_bench_frame(frame)?,
        }
        Ok(())
    }

    /// ns/packet of `target` behind the wrapper over the rounds, checking that `expect`
    /// counted every repetition.
    fn wrapped(&mut self, target: Prog, frame: &BenchFrame, expect: &[Counter]) -> Result<Spread> {
        self.dp.set_bench_target(target)?;
        let rounds = self.opts.rounds;
        let repeat = self.opts.repeat;
        stable(rounds, || self.wrapped_once(target, frame, expect, repeat))
    }

    /// A step program cut that writes an event: every repetition must write one (a full
    /// ring's early return would measure something cheaper), so each round starts with
    /// the rings drained and writes at most a CPU ring's worth. (A consumer on the other
    /// core cannot keep pace with an unlimited producer: it reads each slot the producer
    /// just wrote, one cache-line transfer a slot, and it sleeps between drains as the
    /// agent does; with 1,000,000 events a round the ring overflowed in 2 of 5 runs.)
    fn event_step(
        &mut self,
        frame: &BenchFrame,
        drain: &EventDrain,
        expect: &[Counter],
    ) -> Result<Spread> {
        self.dp.set_bench_target(Prog::BenchStep)?;
        let repeat = self.opts.repeat.min(EVENT_STEP_REPEAT);
        stable(self.opts.rounds, || {
            drain.wait_drained();
            self.wrapped_once(Prog::BenchStep, frame, expect, repeat)
        })
    }

    fn wrapped_once(
        &mut self,
        target: Prog,
        frame: &BenchFrame,
        expect: &[Counter],
        repeat: u32,
    ) -> Result<f64> {
        let (ns, delta) = self.counted(target, frame, repeat)?;
        for c in expect {
            let mut got = delta.get(*c);
            // Many flows cycling through the table: the few whose set holds more of them
            // than it has ways keep evicting each other and take the ring (0.05% of the
            // 50,000-flow rows' packets); counted as established so long as each such
            // packet evicted a flow.
            let conflicts = delta.get(Counter::NewFlow);
            if *c == Counter::ConnHit && conflicts <= delta.get(Counter::ConnEvicted) {
                got += conflicts;
            }
            if got != repeat as u64 {
                bail!(
                    "path check failed for {target:?}: {} counted {got} of {repeat} repetitions \
                     (all counters: {:?})",
                    c.label(),
                    delta.0.iter().filter(|(_, v)| **v > 0).collect::<Vec<_>>()
                );
            }
        }
        Ok(ns)
    }

    /// ns/packet of `target` behind the wrapper, and what the counters counted meanwhile.
    fn counted(
        &mut self,
        target: Prog,
        frame: &BenchFrame,
        repeat: u32,
    ) -> Result<(f64, CounterSnapshot)> {
        self.set_frame(frame)?;
        let before = self.counters()?;
        let r = self
            .dp
            .test_run_repeat(Prog::BenchRestore, frame_bytes(frame), None, repeat)?;
        let delta = self.counters()?.since(&before);
        // The step program passes what it could do to the end, aborts otherwise.
        if target == Prog::BenchStep && r.action != XDP_PASS {
            bail!(
                "the new-flow step program stopped early at step {} (action {}; counters: {:?})",
                frame.mark & 0xff,
                r.action,
                delta.0.iter().filter(|(_, v)| **v > 0).collect::<Vec<_>>()
            );
        }
        Ok((r.ns_per_run as f64, delta))
    }

    /// ns/packet of the `skip + 1`-th packet after the SYN over `after_syn_flows` flows
    /// (one repetition per flow). Every round first sends each flow's SYN (a new pick, its
    /// count back to 1) and the `skip` packets before, unmeasured. Checks that each measured
    /// packet raised an event (`skip` 0: sent or lost for a full ring) or none.
    fn after_syn(&mut self, syn: &BenchFrame, ack: &BenchFrame, skip: u32) -> Result<Spread> {
        let n = self.opts.after_syn_flows;
        let learn = BenchFrame {
            flows: n,
            seq: 0,
            ..*syn
        };
        let next = BenchFrame {
            flows: n,
            seq: 0,
            ..*ack
        };
        self.dp.set_bench_target(Prog::Balancer)?;
        stable(self.opts.rounds, || {
            let (_, learned) = self.counted(Prog::Balancer, &learn, n)?;
            ensure!(
                learned.get(Counter::NewFlow) == n as u64,
                "the SYNs of {n} flows took the new-flow path {} times",
                learned.get(Counter::NewFlow)
            );
            // A flow whose set overflowed while the SYNs were written (more than 4 of the
            // flows in one set, rare) is picked from the ring again by its next packet.
            let evicted = learned.get(Counter::ConnEvicted);
            let established = |d: &CounterSnapshot| {
                let (hit, new) = (d.get(Counter::ConnHit), d.get(Counter::NewFlow));
                ensure!(
                    hit + new == n as u64 && new <= evicted,
                    "{hit} established and {new} new of {n} packets after the SYN \
                     ({evicted} flows evicted by the SYNs)"
                );
                Ok(())
            };
            for _ in 0..skip {
                established(&self.counted(Prog::Balancer, &next, n)?.1)?;
            }
            let (ns, d) = self.counted(Prog::Balancer, &next, n)?;
            established(&d)?;
            let raised = d.get(Counter::EventSent) + d.get(Counter::EventLost);
            // The first packet after the SYN raises the flow's event; an evicted flow's
            // count starts again, so it raises it one packet later.
            let want = if skip == 0 { n as u64 } else { 0 };
            ensure!(
                raised.abs_diff(want) <= evicted && d.get(Counter::EventRateLimited) == 0,
                "packet {} after the SYN raised {raised} events over {n} flows, {} rate-limited (expected {want})",
                skip + 1,
                d.get(Counter::EventRateLimited)
            );
            Ok(ns)
        })
    }

    fn direct(&mut self, prog: Prog, frame: &[u8]) -> Result<Spread> {
        let repeat = self.opts.repeat;
        let dp = &mut *self.dp;
        stable(self.opts.rounds, || {
            Ok(dp.test_run_repeat(prog, frame, None, repeat)?.ns_per_run as f64)
        })
    }
}

/// Measures one row: a warm-up round (discarded: it pulls the program, the maps and the
/// frame into the caches), then `rounds` rounds; measured again while they disagree by more
/// than [`MAX_SPREAD`], keeping the tightest set, and flagged if none settles.
fn stable(rounds: u32, mut once: impl FnMut() -> Result<f64>) -> Result<Spread> {
    once()?;
    let mut best: Option<Spread> = None;
    for attempt in 0..=REMEASURES {
        let samples = (0..rounds.max(1))
            .map(|_| once())
            .collect::<Result<Vec<_>>>()?;
        let mut s = Spread::of(samples);
        s.remeasured = attempt;
        if best.is_none_or(|b| s.spread < b.spread) {
            best = Some(s);
        }
        if s.spread <= MAX_SPREAD {
            break;
        }
    }
    let mut best = best.expect("measured at least once");
    best.unstable = best.spread > MAX_SPREAD;
    Ok(best)
}

/// Pins the calling thread to `cpu` (BPF_PROG_TEST_RUN runs the program on the caller's
/// CPU, so the whole measurement stays on it); None if the kernel refused.
fn pin_to(cpu: usize) -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays inside it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0)
            .then_some(cpu)
    }
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Drains new-flow events on another thread while the kernel produces them.
struct EventDrain {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    /// Passes that found every ring empty.
    empty_passes: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl EventDrain {
    /// Starts the consumer, pinned to `cpu` when given.
    fn start(dp: &mut Datapath, cpu: Option<usize>) -> Result<Self> {
        let mut reader = dp.take_events().context("event ring already taken")?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let empty_passes = Arc::new(AtomicU64::new(0));
        let (s, n, e) = (stop.clone(), seen.clone(), empty_passes.clone());
        let handle = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                let _ = pin_to(cpu);
            }
            while !s.load(Ordering::Relaxed) {
                let mut got = 0;
                while reader.next_event().is_some() {
                    got += 1;
                }
                n.fetch_add(got, Ordering::Relaxed);
                if got == 0 {
                    e.fetch_add(1, Ordering::Release);
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        });
        Ok(Self {
            stop,
            seen,
            empty_passes,
            handle: Some(handle),
        })
    }

    /// Returns once a pass that began after the call found every ring empty (nothing is
    /// writing events meanwhile), or after a second.
    fn wait_drained(&self) {
        let start = self.empty_passes.load(Ordering::Acquire);
        let t0 = std::time::Instant::now();
        while self.empty_passes.load(Ordering::Acquire) < start + 2
            && t0.elapsed() < std::time::Duration::from_secs(1)
        {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.seen.load(Ordering::Relaxed)
    }
}

/// Runs the whole benchmark.
/// Largest `--conn-table-size` the benchmark loads (1 GiB of sets).
const MAX_BENCH_CONN_TABLE: u32 = 1 << 24;

/// Refuses settings the rows cannot be measured with, before anything is loaded.
fn check_options(opts: &BenchOptions) -> Result<()> {
    ensure!(
        (2..=60_000).contains(&opts.flows),
        "--flows must be within 2..=60000"
    );
    ensure!(
        (2..=60_000).contains(&opts.after_syn_flows),
        "--after-syn-flows must be within 2..=60000"
    );
    // A table under one set (of CONN_WAYS) a flow would let flows in full sets go between
    // their SYN and the packets measured after it.
    let most = opts.flows.max(opts.after_syn_flows);
    let ways = CONN_WAYS as u32;
    ensure!(
        opts.conn_table_size / ways >= most && opts.conn_table_size <= MAX_BENCH_CONN_TABLE,
        "--conn-table-size {} cannot hold the benchmark's {most} flows without evicting \
         them: give it at least {} entries (and at most {MAX_BENCH_CONN_TABLE})",
        opts.conn_table_size,
        most * ways,
    );
    Ok(())
}

pub fn run(opts: &BenchOptions) -> Result<Report> {
    check_options(opts)?;
    let mut dp = Datapath::load_for_bench(&LoadOptions {
        conn_table_size: opts.conn_table_size,
        ..LoadOptions::default()
    })
    .context("loading the datapath (the benchmark needs root and bpf())")?;
    dp.set_config(&bench_config())?;
    let mut lb = DatapathModel::new(&dp);
    // The measuring thread on the first allowed CPU, the event consumer on the last (the
    // same CPU when there is only one).
    let cpus = allowed_cpus();
    let consumer_cpu = cpus.last().copied();
    let drain = EventDrain::start(&mut dp, consumer_cpu)?;
    let bench_cpu = pin_to(cpus[0]);
    // The flood shares the consumer's CPU: the only other one on two cores.
    let mut flood_plan = match (bench_cpu, consumer_cpu) {
        (Some(b), Some(c)) if b != c => Some(flood::FloodPlan::new(c)),
        _ => None,
    };
    let mut flood_rows = Vec::new();

    // Without it every test run waits for an RCU grace period (the same-CPU flood rows,
    // thousands of short runs, then take too long to measure and are left out).
    let hold = match dp.hold_in_xdp_dispatcher(Prog::BenchRestore) {
        Ok(hold) => Some(hold),
        Err(e) => {
            tracing::warn!(error = %e, "cannot hold the wrapper in the XDP dispatcher");
            None
        }
    };
    let mut bench = Bench {
        dp: &mut dp,
        opts,
        cpu: bench_cpu,
    };
    let trivial_ns = bench
        .direct(
            Prog::BenchTrivial,
            &FrameSpec::tcp(families()[0].client, 1, families()[0].vip, 80, true).build(),
        )?
        .median;
    let mut figures = Vec::new();
    let mut steps = Vec::new();
    let mut floor_ns = 0.0;
    let mut restore_ns = 0.0;
    let mut restore_marked_ns = 0.0;

    for (fi, fam) in families().iter().enumerate() {
        let vip = VipId::tcp(fam.vip, 80);
        let backends: Vec<Backend> = fam
            .reals
            .iter()
            .map(|&addr| Backend { addr, weight: 1 })
            .collect();
        let leaving = lb.set_vip(bench.dp, vip, &backends, 65_537)?;
        lb.retire(bench.dp, &leaving)?;
        let vip_stats_id = lb.vip_stats_id(&vip).context("vip programmed")?;

        let syn = bench_frame(&FrameSpec::tcp(fam.client, BASE_SPORT, fam.vip, 80, true))?;
        let ack = bench_frame(&FrameSpec::tcp(fam.client, BASE_SPORT, fam.vip, 80, false))?;
        let other = bench_frame(&FrameSpec::tcp(
            fam.client, BASE_SPORT, fam.other, 80, false,
        ))?;

        let floor = bench.wrapped(Prog::BenchTrivial, &ack, &[])?.median;
        // A forwarding path leaves a grown frame, which the wrapper shrinks back with one
        // more helper call than the floor makes. Calibrate it: a program that only grows
        // the frame costs that helper call once in itself and once in the wrapper.
        let grow = bench.wrapped(Prog::BenchGrow, &ack, &[])?.median;
        let restore = ((grow - floor) / 2.0).max(0.0);
        // Marked frames carry 4 bytes of metadata, which the wrapper writes and the
        // forwarding paths drop before they grow the frame (`Packet::open_outer`, as the
        // calibration program does): their floor and the wrapper's cost of putting the
        // frame back (shrink, metadata again) are measured with a mark too.
        let with_mark = BenchFrame { mark: 1, ..ack };
        let floor_marked = bench.wrapped(Prog::BenchTrivial, &with_mark, &[])?.median;
        let grow_marked = bench.wrapped(Prog::BenchGrow, &with_mark, &[])?.median;
        let restore_marked = ((grow_marked - floor_marked) / 2.0).max(0.0);
        if fi == 0 {
            floor_ns = floor;
            restore_ns = restore;
            restore_marked_ns = restore_marked;
        }
        let mut rows: Vec<(&'static str, u32, Spread)> = Vec::new();
        rows.push((
            "non-VIP pass",
            1,
            bench.wrapped(Prog::Balancer, &other, &[Counter::PassNotVip])?,
        ));
        // A SYN raises no new-flow event (events are on: the flow earns its mark with the
        // packet after it, below).
        rows.push((
            "new flow (SYN), no event",
            1,
            bench.wrapped(Prog::Balancer, &syn, &[Counter::NewFlow])?,
        ));
        // A SYN of a flow the table does not hold (the row above refreshes its own entry
        // in place, as for a retransmitted SYN): each repetition a flow never sent. IPv4
        // runs first, while the table has room (few enough over all rounds); IPv6 finds
        // the table IPv4's last row filled, so its SYNs evict.
        let mut next = FRESH_SYN_SEQ;
        let s = stable(opts.rounds, || {
            let f = with_flows(&syn, syn.mark, u32::MAX, next);
            next += FRESH_SYNS;
            bench.wrapped_once(Prog::Balancer, &f, &[Counter::NewFlow], FRESH_SYNS)
        })?;
        rows.push(("new flow (SYN), absent key", FRESH_SYNS, s));
        // The packet that raises the event: the first after the SYN, each repetition
        // another flow's (the SYNs teach the table again before every round, unmeasured);
        // next to the packet after it on the same flows (no event): the event's cost.
        rows.push((
            "after SYN: event",
            opts.after_syn_flows,
            bench.after_syn(&syn, &ack, 0)?,
        ));
        let with_events = bench.dp.config()?;
        bench.dp.set_config(&LbConfig {
            flags: with_events.flags | CFG_F_WAKE_EVERY_EVENT,
            ..with_events
        })?;
        rows.push((
            "after SYN: event, wake each",
            opts.after_syn_flows,
            bench.after_syn(&syn, &ack, 0)?,
        ));
        bench.dp.set_config(&with_events)?;
        rows.push((
            "established (after SYN)",
            opts.after_syn_flows,
            bench.after_syn(&syn, &ack, 1)?,
        ));
        // The new-flow path step by step (the step number rides in the mark).
        let mut step_medians = BTreeMap::from([(0, floor_marked)]);
        for (n, name, from) in STEPS {
            let cut = BenchFrame { mark: n, ..syn };
            // The limiter's cut too: the event steps' costs are measured from it, at the
            // same repetitions a round.
            let r = if n >= BENCH_STEP_LIMITER {
                let expect: &[Counter] = if n >= BENCH_STEP_EVENT_RING {
                    &[Counter::EventSent]
                } else {
                    &[]
                };
                bench.event_step(&cut, &drain, expect)?
            } else {
                bench.wrapped(Prog::BenchStep, &cut, &[])?
            };
            steps.push(StepFigure {
                family: fam.name,
                step: name,
                rounds: r,
                above_floor: r.median - floor_marked,
                cost: r.median - step_medians[&from],
                across_loads: None,
            });
            step_medians.insert(n, r.median);
        }
        rows.push((
            "established (conn table)",
            1,
            bench.wrapped(Prog::Balancer, &ack, &[Counter::ConnHit])?,
        ));

        // The mark of the measured flow points where the normal path sent it.
        let flow = FrameSpec::tcp(fam.client, BASE_SPORT, fam.vip, 80, false).flow();
        let conn = bench
            .dp
            .conn(&flow)
            .context("flow learned by the SYN runs")?;
        let entry = MarkEntry {
            real_id: conn.real_id,
            real_gen: conn.real_gen,
            vip_id: conn.vip_id.into(),
            _pad: 0,
        };
        bench.dp.set_mark(1, &entry)?;
        let marked = BenchFrame { mark: 1, ..ack };
        rows.push((
            "mark fast path, per flow",
            1,
            bench.wrapped(Prog::Balancer, &marked, &[Counter::MarkHit])?,
        ));
        // Per real: the same datapath work; one mark per (VIP, real) shared by its flows.
        let real_mark = 100 + conn.real_id;
        bench.dp.set_mark(real_mark, &entry)?;
        let marked_real = BenchFrame {
            mark: real_mark,
            ..ack
        };
        rows.push((
            "mark fast path, per real",
            1,
            bench.wrapped(Prog::Balancer, &marked_real, &[Counter::MarkHit])?,
        ));
        bench.dp.chain_nic_to_balancer()?;
        bench.dp.set_nic_flow(&flow, 1)?;
        rows.push((
            "emulated NIC + mark path",
            1,
            bench.wrapped(
                Prog::EmulatedNic,
                &ack,
                &[Counter::NicMarked, Counter::MarkHit],
            )?,
        ));
        bench.dp.remove_nic_flow(&flow)?;

        // Many flows: learn them all, then measure with the source port varying.
        let n = opts.flows;
        let many = |f: &BenchFrame| BenchFrame {
            flows: n,
            seq: 0,
            ..*f
        };
        let saved_repeat = bench.opts.repeat;
        let learn_opts = BenchOptions {
            repeat: n,
            rounds: 1,
            ..bench.opts.clone()
        };
        let mut learner = Bench {
            dp: &mut *bench.dp,
            opts: &learn_opts,
            cpu: bench_cpu,
        };
        learner.wrapped(Prog::Balancer, &many(&syn), &[Counter::NewFlow])?;
        let _ = saved_repeat;
        rows.push((
            "established (conn table)",
            n,
            bench.wrapped(Prog::Balancer, &many(&ack), &[Counter::ConnHit])?,
        ));
        // Per-flow marks: flow i carries mark 1000 + i and its own real.
        for i in 0..n {
            let spec = FrameSpec::tcp(
                fam.client,
                BASE_SPORT.wrapping_add(i as u16),
                fam.vip,
                80,
                false,
            );
            // A flow its set let go (more of the flows than ways) learns its real again.
            if bench.dp.conn(&spec.flow()).is_none() {
                bench.dp.test_run(Prog::Balancer, &spec.build(), None)?;
            }
            let c = bench.dp.conn(&spec.flow()).context("flow learned")?;
            let e = MarkEntry {
                real_id: c.real_id,
                real_gen: c.real_gen,
                vip_id: vip_stats_id,
                _pad: 0,
            };
            bench.dp.set_mark(1_000 + i, &e)?;
            bench.dp.set_nic_flow(&spec.flow(), 1_000 + i)?;
        }
        let per_flow = BenchFrame {
            mark: 1_000,
            mark_span: n,
            ..many(&ack)
        };
        rows.push((
            "mark fast path, per flow",
            n,
            bench.wrapped(Prog::Balancer, &per_flow, &[Counter::MarkHit])?,
        ));
        // Per-real marks: the flows share one mark per real (marks 100 + real id).
        for id in 0..=REALS as u32 + 1 {
            let e = MarkEntry {
                real_id: id.max(1),
                real_gen: bench.dp.real(id.max(1))?.generation,
                vip_id: vip_stats_id,
                _pad: 0,
            };
            bench.dp.set_mark(100 + id, &e)?;
        }
        let per_real = BenchFrame {
            mark: 101,
            mark_span: REALS as u32,
            ..many(&ack)
        };
        rows.push((
            "mark fast path, per real",
            n,
            bench.wrapped(Prog::Balancer, &per_real, &[Counter::MarkHit])?,
        ));
        rows.push((
            "emulated NIC + mark path",
            n,
            bench.wrapped(
                Prog::EmulatedNic,
                &many(&ack),
                &[Counter::NicMarked, Counter::MarkHit],
            )?,
        ));
        for i in 0..n {
            let spec = FrameSpec::tcp(
                fam.client,
                BASE_SPORT.wrapping_add(i as u16),
                fam.vip,
                80,
                false,
            );
            bench.dp.remove_nic_flow(&spec.flow())?;
        }

        // Last, since it evicts learned flows: every repetition a flow never seen before (the table fills up and evicts).
        let fresh = BenchFrame {
            flows: u32::MAX,
            ..syn
        };
        rows.push((
            "new flow (SYN), all distinct",
            bench.opts.repeat,
            bench.wrapped(Prog::Balancer, &fresh, &[Counter::NewFlow])?,
        ));

        // Established flows while the other CPU floods the table, now full, with flows
        // never seen; its events as the agent limits them.
        if let Some(plan) = flood_plan.as_mut() {
            bench.dp.set_config(&flood::agent_limiter(&with_events))?;
            for flows in [1, n] {
                let above = |ns| ns - floor - restore;
                let measured = flood::Measured {
                    family: fam.name,
                    syn: &syn,
                    ack: &ack,
                    flows,
                };
                flood_rows.extend(bench.established_under_floods(plan, &measured, above)?);
                if hold.is_some() {
                    flood_rows.push(bench.established_between_syns(plan, &measured, above)?);
                }
            }
            bench.dp.set_config(&with_events)?;
        }

        // Everything but the non-VIP pass forwards (grows the frame).
        let above_floor = |path: &str, ns: f64| {
            if path.starts_with("non-VIP") {
                ns - floor
            } else if path.starts_with("mark") {
                ns - floor_marked - restore_marked
            } else {
                ns - floor - restore
            }
        };
        let established = |flows: u32, rows: &[(&str, u32, Spread)]| {
            rows.iter()
                .find(|r| r.0.starts_with("established") && r.1 == flows)
                .map(|r| above_floor(r.0, r.2.median))
        };
        for (path, flows, spread) in &rows {
            let above = above_floor(path, spread.median);
            figures.push(Figure {
                family: fam.name,
                path,
                flows: *flows,
                ns: spread.median,
                rounds: *spread,
                above_floor: above,
                speedup_vs_established: established(*flows, &rows).map(|e| e / above.max(0.1)),
                across_loads: None,
            });
        }
        let leaving = lb.remove_vip(bench.dp, &vip)?;
        lb.retire(bench.dp, &leaving)?;
    }
    let counters = dp.counters()?;
    let _seen = drain.stop();
    drop(hold);
    let (max_spread, rows_remeasured, rows_unstable) = spread_totals(&figures);
    Ok(Report {
        repeat: opts.repeat,
        rounds: opts.rounds,
        loads: 1,
        trivial_ns,
        floor_ns,
        restore_ns,
        restore_marked_ns,
        conn_table_size: Some(opts.conn_table_size),
        figures,
        bench_cpu,
        consumer_cpu,
        max_spread,
        rows_remeasured,
        rows_unstable,
        steps,
        flood: flood_rows,
        flood_cpu: flood_plan.map(|p| p.cpu),
        events_sent: counters.get(Counter::EventSent),
        events_lost: counters.get(Counter::EventLost),
    })
}

/// The largest spread of any row, and how many rows were re-measured or stayed unstable.
fn spread_totals(figures: &[Figure]) -> (f64, usize, usize) {
    (
        figures.iter().map(|f| f.rounds.spread).fold(0.0, f64::max),
        figures.iter().filter(|f| f.rounds.remeasured > 0).count(),
        figures.iter().filter(|f| f.rounds.unstable).count(),
    )
}

/// A row's spread over the loads, when there were several.
fn loads_column(across: Option<Spread>) -> String {
    across.map_or_else(String::new, |l| {
        format!(
            "  loads {:.0}-{:.0} ({:.1}%)",
            l.min,
            l.max,
            l.spread * 100.0
        )
    })
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let cpu = |c: Option<usize>| c.map_or_else(|| "unpinned".to_string(), |c| format!("CPU {c}"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "marklb datapath benchmark (BPF_PROG_TEST_RUN, {} repetitions x {} rounds after a \
         warm-up; min / median / max ns per packet)",
        r.repeat, r.rounds
    );
    if r.loads > 1 {
        let _ = writeln!(
            s,
            "{} freshly loaded datapaths: each row is the load whose median is the median of \
             the loads (\"loads\": the spread of the loads' medians)",
            r.loads
        );
    }
    let _ = writeln!(
        s,
        "measuring thread on {}, new-flow event consumer on {}",
        cpu(r.bench_cpu),
        cpu(r.consumer_cpu)
    );
    let _ = writeln!(
        s,
        "trivial XDP program alone: {:.1} ns; wrapper + trivial (floor): {:.1} ns; \
         wrapper's shrink after a forwarded packet: {:.1} ns, {:.1} ns for a marked frame \
         (also subtracted)",
        r.trivial_ns, r.floor_ns, r.restore_ns, r.restore_marked_ns
    );
    if let Some(entries) = r.conn_table_size {
        let sets = marklb_common::conn_sets(entries) as usize;
        let _ = writeln!(
            s,
            "connection table: {entries} entries ({} MiB of sets)",
            (sets * std::mem::size_of::<marklb_common::ConnSet>()) >> 20
        );
    }
    let _ = writeln!(
        s,
        "{:<6} {:<28} {:>7} {:>17} {:>7} {:>11} {:>8}",
        "family", "path", "flows", "min/med/max", "spread", "above floor", "vs est."
    );
    for f in &r.figures {
        let ratio = f
            .speedup_vs_established
            .map(|x| format!("{x:.2}x"))
            .unwrap_or_default();
        let loads = loads_column(f.across_loads);
        let flag = if f.rounds.unstable {
            " UNSTABLE"
        } else if f.rounds.remeasured > 0 {
            " (re-measured)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{:<6} {:<28} {:>7} {:>17} {:>6.1}% {:>11.1} {:>8}{loads}{flag}",
            f.family,
            f.path,
            f.flows,
            format!(
                "{:.0}/{:.0}/{:.0}",
                f.rounds.min, f.rounds.median, f.rounds.max
            ),
            f.rounds.spread * 100.0,
            f.above_floor,
            ratio
        );
    }
    let _ = writeln!(
        s,
        "new-flow path step by step (cumulative program, min/med/max; cost = this step's \
         median minus the previous one's; the kernel ring buffer row replaces the CPU's \
         ring and is costed from the limiter):"
    );
    for st in &r.steps {
        let _ = writeln!(
            s,
            "{:<6} {:<34} {:>17} {:>6.1}% {:>7.1} above floor {:>7.1} ns step{}{}",
            st.family,
            st.step,
            format!(
                "{:.0}/{:.0}/{:.0}",
                st.rounds.min, st.rounds.median, st.rounds.max
            ),
            st.rounds.spread * 100.0,
            st.above_floor,
            st.cost,
            loads_column(st.across_loads),
            if st.rounds.unstable { " UNSTABLE" } else { "" }
        );
    }
    render_flood(&mut s, r);
    let _ = writeln!(
        s,
        "run spread: largest row {:.1}% (limit {:.0}%); {} rows re-measured, {} unstable",
        r.max_spread * 100.0,
        MAX_SPREAD * 100.0,
        r.rows_remeasured,
        r.rows_unstable
    );
    let _ = writeln!(
        s,
        "new-flow events: {} delivered, {} lost (ring full)",
        r.events_sent, r.events_lost
    );
    s
}

/// The flood section of [`render`].
fn render_flood(s: &mut String, r: &Report) {
    use std::fmt::Write;
    let Some(cpu) = r.flood_cpu.filter(|_| !r.flood.is_empty()) else {
        if !r.figures.is_empty() {
            let _ = writeln!(s, "no flood rows: they need a second CPU");
        }
        return;
    };
    let _ = writeln!(
        s,
        "established flows while CPU {cpu} floods the full connection table with flows never \
         seen, in rounds taken in turns with the flood paused (its events limited as the \
         agent does: {} a second a CPU, burst {}; the event consumer shares CPU {cpu}; \
         re-picked: packets whose flow was evicted, quiet / flooded):",
        crate::desired::EVENTS_PER_SEC_PER_CPU,
        crate::desired::EVENTS_BURST
    );
    let _ = writeln!(
        s,
        "{:<6} {:>6} {:<21} {:>13} {:>13} {:>15} {:>6} {:>15} | {:>8} {:>6} {:>8} {:>24}",
        "family",
        "flows",
        "flood",
        "quiet",
        "flooded",
        "above floor",
        "ratio",
        "re-picked",
        "flood",
        "ns/pkt",
        "evicted",
        "events sent/limited/lost"
    );
    let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    for f in &r.flood {
        let t = &f.flooder;
        let mmm = |x: &Spread| format!("{:.0}/{:.0}/{:.0}", x.min, x.median, x.max);
        let _ = writeln!(
            s,
            "{:<6} {:>6} {:<21} {:>13} {:>13} {:>15} {:>5.2}x {:>15} | {:>8} {:>6.1} {:>8} {:>24}",
            f.family,
            f.flows,
            f.flood,
            mmm(&f.quiet),
            mmm(&f.flooded),
            format!("{:.1} -> {:.1}", f.quiet_above, f.flooded_above),
            f.ratio,
            format!(
                "{:.2}% / {:.2}%",
                pct(f.quiet_repicked, f.quiet_packets),
                pct(f.repicked, f.flooded_packets)
            ),
            t.packets,
            t.ns_per_packet,
            t.evicted,
            t.events.as_ref().map_or_else(
                || "-".to_string(),
                |e| format!("{}/{}/{}", e.sent, e.rate_limited, e.lost)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_options_pass_and_a_table_too_small_for_the_flows_is_refused() {
        let ok = BenchOptions::default();
        check_options(&ok).unwrap();
        let small = BenchOptions {
            flows: 4_096,
            after_syn_flows: 4_096,
            conn_table_size: 1 << 16,
            ..ok.clone()
        };
        check_options(&small).unwrap();
        let too_small = BenchOptions {
            conn_table_size: 1 << 16,
            ..ok.clone()
        };
        let err = check_options(&too_small).unwrap_err().to_string();
        assert!(err.contains("at least 200000 entries"), "{err}");
        let too_few = BenchOptions {
            after_syn_flows: 1,
            ..ok
        };
        assert!(check_options(&too_few).is_err());
    }
}
