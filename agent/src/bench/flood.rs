//! Established flows while a flood of new flows goes through the connection table.
//!
//! A flood thread pinned to a second CPU runs the balancer, behind the wrapper, on flows
//! never seen before, for as long as the measuring CPU times the packets of flows it
//! learned just before. Both go through the same connection table: the figure says what a
//! legitimate flow's packet costs while the flood's writes take its sets' cache lines away
//! and evict (its flow, when its set's least recently used), and the flood CPU's counters
//! say what the flood did meanwhile (its packets, the flows it evicted, the events it
//! raised, sent, rate-limited and lost). Two floods: SYNs alone (they raise no event: a
//! flow earns its mark with the packet after the SYN), and handshakes (each flow's SYN,
//! then its ACK, which raises the flow's event) under the agent's own event limiter.
//!
//! A third row floods the measuring CPU itself (RSS spreads a flood over every receive
//! queue, so a flow's own CPU runs its share): batches of 64 measured packets, a NAPI poll's
//! budget, each after a batch of 64 new flows' SYNs.
//!
//! The rounds go in turns, the flood paused and then running, so that the machine's drift
//! over the minute (8-20% on this VM between loads) moves both figures alike and their
//! ratio stays within one stretch of time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use marklb_common::{BenchFrame, Counter, LbConfig};
use serde::Serialize;

use super::{Bench, Spread, frame_bytes, pin_to};
use crate::{
    datapath::{CounterSnapshot, Prog, testrun::XdpRunner},
    desired::{EVENT_INTERVAL_NS, EVENTS_BURST},
};

/// Repetitions of one `BPF_PROG_TEST_RUN` call of the flood (about 20 ms of SYNs): short
/// enough that the flood stops soon after it is told to.
const FLOOD_CHUNK: u32 = 20_000;
/// Where the floods' flows start (the wrapper adds the repetition number to the source
/// port and address): past every other row's flows.
const FLOOD_SEQ: u32 = 1 << 29;
/// Flows apart two floods start: ten times what one sends at the default repetitions (at
/// most about 6 million), so that no flood meets another's flows.
const FLOOD_SEQ_STRIDE: u32 = 1 << 26;

/// What floods the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodKind {
    /// Each repetition a new flow's SYN.
    Syns,
    /// Each new flow's SYN, then its ACK (which raises the flow's event).
    Handshakes,
}

impl FloodKind {
    fn name(self) -> &'static str {
        match self {
            FloodKind::Syns => "SYNs, other CPU",
            FloodKind::Handshakes => "handshakes, other CPU",
        }
    }
}

/// What the flood did while one row was measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodTotals {
    pub packets: u64,
    /// The kernel's ns a flood packet, wrapper included.
    pub ns_per_packet: f64,
    pub new_flows: u64,
    /// Flows the flood's writes evicted (its own older flows, or the measured ones).
    pub evicted: u64,
    /// The events the flood raised (None where the measured flows' own share the
    /// counters: on the measuring CPU, whose unmarked flows ask again now and then).
    pub events: Option<FloodEvents>,
}

/// What became of the events a flood raised.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodEvents {
    pub sent: u64,
    pub rate_limited: u64,
    /// Found the CPU's ring full.
    pub lost: u64,
}

/// Established packets of some flows in rounds taken in turns: quiet, then flooded.
#[derive(Clone, Debug, Serialize)]
pub struct FloodFigure {
    pub family: &'static str,
    pub flows: u32,
    /// What flooded the table, and from which CPU.
    pub flood: &'static str,
    pub quiet: Spread,
    pub flooded: Spread,
    /// ns above the floor (and the wrapper's shrink) of each, as the established rows.
    pub quiet_above: f64,
    pub flooded_above: f64,
    /// flooded_above / quiet_above.
    pub ratio: f64,
    /// Packets of the flooded rounds, and how many of them found their flow evicted by the
    /// flood (picked from the ring again: the same real, at a new flow's cost).
    pub flooded_packets: u64,
    pub repicked: u64,
    /// The same for the quiet rounds (flows of the measured set evicting each other).
    pub quiet_packets: u64,
    pub quiet_repicked: u64,
    pub flooder: FloodTotals,
}

/// The event limiter the agent programs (`desired::LbConfig`), for the flood rows: the
/// benchmark's own config lets every event through, which no node does.
pub fn agent_limiter(cfg: &LbConfig) -> LbConfig {
    LbConfig {
        event_interval_ns: EVENT_INTERVAL_NS,
        events_burst: EVENTS_BURST,
        ..*cfg
    }
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// The flood thread: loops the wrapper (whose frame on `cpu` says which flows) while told
/// to run, idles while paused.
struct Flooder {
    command: Arc<AtomicU8>,
    /// Set by the thread while it sends nothing.
    idle: Arc<AtomicBool>,
    handle: JoinHandle<Result<(u64, f64)>>,
}

impl Flooder {
    /// Starts the thread, paused.
    fn start(runner: XdpRunner, cpu: usize, input: Vec<u8>) -> Self {
        let command = Arc::new(AtomicU8::new(PAUSE));
        let idle = Arc::new(AtomicBool::new(false));
        let (c, i) = (command.clone(), idle.clone());
        let handle = std::thread::spawn(move || {
            let pinned = pin_to(cpu);
            let (mut packets, mut ns) = (0u64, 0f64);
            loop {
                match c.load(Ordering::Acquire) {
                    STOP => break,
                    PAUSE => {
                        i.store(true, Ordering::Release);
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    _ => {
                        i.store(false, Ordering::Release);
                        pinned.with_context(|| format!("pinning the flood to CPU {cpu}"))?;
                        let (action, per_run) = runner.run(&input, FLOOD_CHUNK)?;
                        ensure!(
                            action != 0,
                            "the flood's packets were aborted (the wrapper or the balancer failed)"
                        );
                        packets += FLOOD_CHUNK as u64;
                        ns += per_run as f64 * FLOOD_CHUNK as f64;
                    }
                }
            }
            i.store(true, Ordering::Release);
            Ok((packets, ns / packets.max(1) as f64))
        });
        Self {
            command,
            idle,
            handle,
        }
    }

    /// Pauses the flood: returns once the thread sends nothing.
    fn pause(&self) {
        self.tell(PAUSE, true);
    }

    /// Resumes the flood: returns once the thread is sending.
    fn resume(&self) {
        self.tell(RUN, false);
    }

    /// Tells the thread `command` and waits until its idle flag reads `idle` (or it ended).
    fn tell(&self, command: u8, idle: bool) {
        self.command.store(command, Ordering::Release);
        while self.idle.load(Ordering::Acquire) != idle && !self.handle.is_finished() {
            std::thread::sleep(Duration::from_micros(10));
        }
    }

    /// Stops the flood: its packets and ns a packet.
    fn stop(self) -> Result<(u64, f64)> {
        self.command.store(STOP, Ordering::Release);
        self.handle
            .join()
            .map_err(|_| anyhow!("the flood thread panicked"))?
    }
}

/// The flood rows' state across families: where the next flood's flows start.
pub struct FloodPlan {
    pub cpu: usize,
    next_seq: u32,
}

impl FloodPlan {
    pub fn new(cpu: usize) -> Self {
        Self {
            cpu,
            next_seq: FLOOD_SEQ,
        }
    }

    /// The flood CPU's frame: `syn` over flows never seen, in handshakes or not.
    fn frame(&mut self, syn: &BenchFrame, kind: FloodKind) -> BenchFrame {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(FLOOD_SEQ_STRIDE);
        BenchFrame {
            flows: u32::MAX,
            seq,
            // The TCP header opens with the source port.
            handshake_tcp_off: match kind {
                FloodKind::Syns => 0,
                FloodKind::Handshakes => syn.sport_off,
            },
            ..*syn
        }
    }
}

/// The flows whose established packets a flood row measures.
#[derive(Clone, Copy)]
pub(super) struct Measured<'a> {
    pub family: &'static str,
    /// Their SYN (which teaches the table each flow) and a packet after it, flow 0's.
    pub syn: &'a BenchFrame,
    pub ack: &'a BenchFrame,
    pub flows: u32,
}

/// Rounds taken in turns, quiet and flooded, and their packets.
struct Turns {
    quiet: Vec<f64>,
    flooded: Vec<f64>,
    q: Tally,
    f: Tally,
}

/// A warm-up pair, then `rounds` (at least 3) pairs of rounds, each quiet and then flooded,
/// so that both sample the machine's drift alike. `round(flooded, tally)`: one round's ns
/// a measured packet.
fn in_turns(rounds: u32, mut round: impl FnMut(bool, &mut Tally) -> Result<f64>) -> Result<Turns> {
    let mut t = Turns {
        quiet: Vec::new(),
        flooded: Vec::new(),
        q: Tally::default(),
        f: Tally::default(),
    };
    for i in 0..=rounds.max(3) {
        let quiet = round(false, &mut t.q)?;
        let flooded = round(true, &mut t.f)?;
        if i > 0 {
            t.quiet.push(quiet);
            t.flooded.push(flooded);
        }
    }
    Ok(t)
}

impl FloodFigure {
    fn of(
        m: &Measured,
        flood: &'static str,
        t: Turns,
        flooder: FloodTotals,
        above: impl Fn(f64) -> f64,
    ) -> Self {
        let (quiet, flooded) = (Spread::of(t.quiet), Spread::of(t.flooded));
        let (quiet_above, flooded_above) = (above(quiet.median), above(flooded.median));
        Self {
            family: m.family,
            flows: m.flows,
            flood,
            quiet,
            flooded,
            quiet_above,
            flooded_above,
            ratio: flooded_above / quiet_above.max(0.1),
            flooded_packets: t.f.packets,
            repicked: t.f.repicked,
            quiet_packets: t.q.packets,
            quiet_repicked: t.q.repicked,
            flooder,
        }
    }
}

/// One round's packets: how many, and how many found their flow gone.
#[derive(Default)]
struct Tally {
    packets: u64,
    repicked: u64,
}

impl Bench<'_> {
    /// Established packets of `flows` flows (learned first by their SYNs), in rounds taken
    /// in turns quiet and while `plan.cpu` floods, for each flood. `above` turns a median
    /// into ns above the floor.
    pub(super) fn established_under_floods(
        &mut self,
        plan: &mut FloodPlan,
        m: &Measured,
        above: impl Fn(f64) -> f64,
    ) -> Result<Vec<FloodFigure>> {
        let legit = BenchFrame {
            flows: m.flows,
            seq: 0,
            ..*m.ack
        };
        let mut out = Vec::new();
        for kind in [FloodKind::Syns, FloodKind::Handshakes] {
            // The flows learned again: the previous flood evicted some.
            self.learn_flows(m)?;
            let frame = plan.frame(m.syn, kind);
            self.dp.set_bench_frame_on(plan.cpu, &frame)?;
            let before = self.dp.counters_on(plan.cpu)?;
            let runner = self.dp.xdp_runner(Prog::BenchRestore)?;
            let flooder = Flooder::start(runner, plan.cpu, frame_bytes(&frame).to_vec());
            let turns = in_turns(self.opts.rounds, |flooded, tally| {
                if flooded {
                    flooder.resume();
                } else {
                    flooder.pause();
                }
                self.established_round(&legit, tally)
            });
            // The flood stops whatever the rounds did.
            let (packets, ns_per_packet) = flooder.stop()?;
            let flood = self.dp.counters_on(plan.cpu)?.since(&before);
            let totals = flood_totals(kind, packets, ns_per_packet, &flood)?;
            out.push(FloodFigure::of(m, kind.name(), turns?, totals, &above));
        }
        Ok(out)
    }

    /// Teaches the table the measured flows by their SYNs (through the balancer, which the
    /// wrapper calls from here on).
    fn learn_flows(&mut self, m: &Measured) -> Result<()> {
        self.dp.set_bench_target(Prog::Balancer)?;
        let flows = m.flows;
        let learn = BenchFrame {
            flows,
            seq: 0,
            ..*m.syn
        };
        let (_, learned) = self.counted(Prog::Balancer, &learn, flows)?;
        ensure!(
            learned.get(Counter::NewFlow) == flows as u64,
            "the SYNs of {flows} flows took the new-flow path {} times",
            learned.get(Counter::NewFlow)
        );
        Ok(())
    }

    /// One round of established packets: each took the established path or, its flow
    /// evicted, the new-flow path.
    fn established_round(&mut self, legit: &BenchFrame, tally: &mut Tally) -> Result<f64> {
        let repeat = self.opts.repeat;
        let (ns, d) = self.counted(Prog::Balancer, legit, repeat)?;
        let (hit, new) = (d.get(Counter::ConnHit), d.get(Counter::NewFlow));
        ensure!(
            hit + new == repeat as u64,
            "{hit} established and {new} re-picked of {repeat} packets of {} learned flows",
            legit.flows
        );
        tally.packets += repeat as u64;
        tally.repicked += new;
        Ok(ns)
    }
}

/// Packets a NAPI poll hands XDP at most: a flood's share of the measuring CPU comes in
/// batches of this many between batches of the measured flows.
const NAPI_BUDGET: u32 = 64;

impl Bench<'_> {
    /// Established packets of `flows` flows (learned first by their SYNs) on the measuring
    /// CPU in batches of [`NAPI_BUDGET`], in rounds taken in turns: the batches back to
    /// back, then each after a batch of SYNs of flows never seen, on the same CPU (RSS
    /// spreads a flood over every receive queue, so the flows' own CPU runs its share).
    /// Each batch's figure is the kernel's whole-ns average of its repetitions, in both
    /// kinds of round alike.
    pub(super) fn established_between_syns(
        &mut self,
        plan: &mut FloodPlan,
        m: &Measured,
        above: impl Fn(f64) -> f64,
    ) -> Result<FloodFigure> {
        self.learn_flows(m)?;
        let mut batches = Batches {
            legit: BenchFrame {
                flows: m.flows,
                seq: 0,
                ..*m.ack
            },
            flood: plan.frame(m.syn, FloodKind::Syns),
            count: (self.opts.repeat / NAPI_BUDGET).max(1),
            flood_totals: FloodTotals::default(),
            flood_ns: 0.0,
        };
        let turns = in_turns(self.opts.rounds, |flooded, tally| {
            self.batch_round(&mut batches, flooded, tally)
        })?;
        let mut totals = batches.flood_totals;
        totals.ns_per_packet = batches.flood_ns / totals.packets.max(1) as f64;
        Ok(FloodFigure::of(m, "SYNs, same CPU", turns, totals, &above))
    }

    /// One round of [`Batches::count`] batches of the measured flows, each after a batch of
    /// the flood's SYNs when `flood`: the measured batches' mean ns a packet.
    fn batch_round(&mut self, b: &mut Batches, flood: bool, tally: &mut Tally) -> Result<f64> {
        let before = self.counters()?;
        let legit_input = frame_bytes(&b.legit).to_vec();
        let flood_input = frame_bytes(&b.flood).to_vec();
        let (mut legit_ns, mut flood_packets) = (0.0, 0u64);
        for _ in 0..b.count {
            if flood {
                self.set_frame(&b.flood)?;
                let r =
                    self.dp
                        .test_run_repeat(Prog::BenchRestore, &flood_input, None, NAPI_BUDGET)?;
                b.flood.seq = b.flood.seq.wrapping_add(NAPI_BUDGET);
                b.flood_ns += (r.ns_per_run * NAPI_BUDGET as u64) as f64;
                flood_packets += NAPI_BUDGET as u64;
            }
            self.set_frame(&b.legit)?;
            let r = self
                .dp
                .test_run_repeat(Prog::BenchRestore, &legit_input, None, NAPI_BUDGET)?;
            b.legit.seq = b.legit.seq.wrapping_add(NAPI_BUDGET) % b.legit.flows;
            legit_ns += r.ns_per_run as f64;
        }
        let d = self.counters()?.since(&before);
        let packets = (b.count * NAPI_BUDGET) as u64;
        let (hit, new) = (d.get(Counter::ConnHit), d.get(Counter::NewFlow));
        // Every flood SYN is a new flow; the rest of the new flows are measured packets
        // whose flow was evicted.
        let repicked = new.checked_sub(flood_packets).unwrap_or(u64::MAX);
        ensure!(
            hit.checked_add(repicked) == Some(packets),
            "{hit} established and {new} new flows of {packets} packets of {} learned flows \
             and {flood_packets} SYNs of new flows",
            b.legit.flows
        );
        tally.packets += packets;
        tally.repicked += repicked;
        let t = &mut b.flood_totals;
        t.packets += flood_packets;
        t.new_flows += flood_packets;
        t.evicted += d.get(Counter::ConnEvicted);
        Ok(legit_ns / b.count as f64)
    }
}

/// The two frames of [`Bench::established_between_syns`] and what its flood did.
struct Batches {
    legit: BenchFrame,
    flood: BenchFrame,
    /// Batches a round.
    count: u32,
    flood_totals: FloodTotals,
    flood_ns: f64,
}

/// The flood CPU's counters checked against what it sent: every SYN a new flow; in
/// handshakes every ACK found its flow (just written) or, rarely, lost it to the table.
fn flood_totals(
    kind: FloodKind,
    packets: u64,
    ns_per_packet: f64,
    d: &CounterSnapshot,
) -> Result<FloodTotals> {
    let (new, hit) = (d.get(Counter::NewFlow), d.get(Counter::ConnHit));
    let syns = match kind {
        FloodKind::Syns => packets,
        FloodKind::Handshakes => packets / 2,
    };
    if new < syns || new + hit != packets {
        bail!(
            "the flood's {packets} packets ({}) took the new-flow path {new} times and found \
             their flow {hit} times",
            kind.name()
        );
    }
    Ok(FloodTotals {
        packets,
        ns_per_packet,
        new_flows: new,
        evicted: d.get(Counter::ConnEvicted),
        events: Some(FloodEvents {
            sent: d.get(Counter::EventSent),
            rate_limited: d.get(Counter::EventRateLimited),
            lost: d.get(Counter::EventLost),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn counters(pairs: &[(Counter, u64)]) -> CounterSnapshot {
        CounterSnapshot(
            pairs
                .iter()
                .map(|(c, v)| (c.label(), *v))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn every_flood_starts_on_flows_no_other_flood_sent() {
        let syn = BenchFrame {
            len: 56,
            mark: 0,
            flows: 1,
            sport_off: 34,
            saddr_off: 28,
            mark_span: 0,
            seq: 0,
            handshake_tcp_off: 0,
            data: [0; marklb_common::BENCH_FRAME_MAX],
            _pad: [0; 32],
        };
        let mut plan = FloodPlan::new(1);
        let a = plan.frame(&syn, FloodKind::Syns);
        let b = plan.frame(&syn, FloodKind::Handshakes);
        assert_eq!((a.flows, a.handshake_tcp_off), (u32::MAX, 0));
        assert_eq!((b.flows, b.handshake_tcp_off), (u32::MAX, 34));
        assert_eq!(b.seq - a.seq, FLOOD_SEQ_STRIDE);
        assert!(a.seq >= FLOOD_SEQ);
    }

    #[test]
    fn the_flood_counters_must_account_for_every_packet() {
        // SYNs: each one a new flow.
        let syns = counters(&[(Counter::NewFlow, 100), (Counter::ConnEvicted, 90)]);
        let t = flood_totals(FloodKind::Syns, 100, 400.0, &syns).unwrap();
        assert_eq!((t.new_flows, t.evicted), (100, 90));
        // Handshakes: half new flows, half found; their events reported.
        let hs = counters(&[
            (Counter::NewFlow, 50),
            (Counter::ConnHit, 50),
            (Counter::EventSent, 20),
            (Counter::EventRateLimited, 30),
        ]);
        let t = flood_totals(FloodKind::Handshakes, 100, 400.0, &hs).unwrap();
        let e = t.events.unwrap();
        assert_eq!((e.sent, e.rate_limited, e.lost), (20, 30, 0));
        // Packets the counters do not show (another path, or counted elsewhere) fail.
        let short = counters(&[(Counter::NewFlow, 99)]);
        assert!(flood_totals(FloodKind::Syns, 100, 400.0, &short).is_err());
        let acks_lost = counters(&[(Counter::NewFlow, 40), (Counter::ConnHit, 60)]);
        assert!(flood_totals(FloodKind::Handshakes, 100, 400.0, &acks_lost).is_err());
    }
}
