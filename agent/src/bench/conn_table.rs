//! `marklb-agent bench --conn-table`: where a new flow's connection-table write spends its
//! time. The new-flow step program (`marklb_bench_step`) cut after the write, minus the same
//! program cut before it (the Maglev read), for each table size and kind (the datapath's
//! 4-way sets, `CONN_TABLE`; the kernel LRU hash it replaced, on per-CPU lists in
//! `BENCH_CONN_LRU` and on one common list in `BENCH_CONN_COMMON`), write (as a SYN does
//! it: refresh a live entry in place, else write; for the LRU kinds also a plain update and
//! `BPF_NOEXIST`), key (present, absent) and fill (empty, half full, full and evicting).
//! Each size is a freshly loaded datapath, so "empty" means never written.

use anyhow::{Context, Result};
use marklb_common::{
    BENCH_STEP_COMMON_LRU, BENCH_STEP_CONN, BENCH_STEP_LRU, BENCH_STEP_MAGLEV, BENCH_STEP_NOEXIST,
    BENCH_STEP_UPDATE, BenchFrame,
};

use super::{
    BASE_SPORT, Bench, BenchOptions, Report, Spread, StepFigure, allowed_cpus, bench_config,
    bench_frame, families, pin_to, stable, with_flows,
};
use crate::{
    datapath::{Datapath, LoadOptions, Prog},
    maglev::Backend,
    model::DatapathModel,
    packet::FrameSpec,
    vip::VipId,
};

/// Connection-table sizes compared.
const SIZES: [u32; 3] = [1 << 10, 1 << 14, 1 << 18];

/// One table under test: the bits that choose it and the nodes the benchmark CPU can take
/// before it must evict (a per-CPU list owns its share of the entries).
struct Kind {
    name: &'static str,
    bits: u32,
    room: u32,
    /// A kernel LRU hash (which has plain and `BPF_NOEXIST` updates to compare); else the
    /// datapath's sets, which write one way.
    lru: bool,
}

/// Hands out flows never sent before: each call's repetitions continue where the last
/// call's stopped (the wrapper adds the repetition number to the source port and address).
struct Fresh(u32);

impl Fresh {
    fn frame(&mut self, base: &BenchFrame, mark: u32, repeat: u32) -> BenchFrame {
        let seq = self.0;
        self.0 = self.0.wrapping_add(repeat);
        with_flows(base, mark, u32::MAX, seq)
    }
}

pub fn run(opts: &BenchOptions) -> Result<Report> {
    let cpus = allowed_cpus();
    let bench_cpu = pin_to(cpus[0]);
    let fam = &families()[0];
    let mut steps = Vec::new();
    let mut floor_ns = 0.0;
    for size in SIZES {
        let mut dp = Datapath::load_for_bench(&LoadOptions {
            conn_table_size: size,
            ..LoadOptions::default()
        })
        .context("loading the datapath (the benchmark needs root and bpf())")?;
        dp.set_config(&bench_config())?;
        let mut lb = DatapathModel::new(&dp);
        let backends: Vec<Backend> = fam
            .reals
            .iter()
            .map(|&addr| Backend { addr, weight: 1 })
            .collect();
        lb.set_vip(&mut dp, VipId::tcp(fam.vip, 80), &backends, 65_537)?;
        let syn = bench_frame(&FrameSpec::tcp(fam.client, BASE_SPORT, fam.vip, 80, true))?;
        let mut bench = Bench {
            dp: &mut dp,
            opts,
            cpu: bench_cpu,
        };
        let floor = bench
            .wrapped(Prog::BenchTrivial, &BenchFrame { mark: 1, ..syn }, &[])?
            .median;
        floor_ns = floor;
        let cut = with_flows(&syn, BENCH_STEP_MAGLEV, 1, 0);
        // The program before the write, for one flow and for a new flow per repetition
        // (the wrapper's source rewrite costs a few ns).
        let before_one = bench.wrapped(Prog::BenchStep, &cut, &[])?.median;
        let mut fresh = Fresh(1);
        // The step program cut as `mark` says, `n` flows never sent before a call.
        let new_flows = |bench: &mut Bench, fresh: &mut Fresh, mark: u32, n: u32| {
            stable(opts.rounds, || {
                let f = fresh.frame(&syn, mark, n);
                bench.wrapped_once(Prog::BenchStep, &f, &[], n)
            })
        };
        let small = (opts.repeat / 16).max(1);
        let before_new = new_flows(&mut bench, &mut fresh, BENCH_STEP_MAGLEV, small)?.median;
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
        let kinds = [
            // `size` entries in sets of 4 (a power of two: SIZES are), shared by all CPUs.
            Kind {
                name: "4-way sets (datapath)",
                bits: 0,
                room: size,
                lru: false,
            },
            Kind {
                name: "per-CPU LRU",
                bits: BENCH_STEP_LRU,
                room: size.div_ceil(ncpu),
                lru: true,
            },
            Kind {
                name: "common LRU",
                bits: BENCH_STEP_COMMON_LRU,
                room: size,
                lru: true,
            },
        ];
        for kind in kinds {
            let mut row = |what: &str, s: Spread, base: f64| {
                steps.push(StepFigure {
                    family: fam.name,
                    step: Box::leak(format!("{size} {}: {what}", kind.name).into_boxed_str()),
                    rounds: s,
                    above_floor: s.median - floor,
                    cost: s.median - base,
                    across_loads: None,
                });
            };
            // New flows while the table has room: few enough repetitions over all rounds
            // (warm-up and re-measurements included) to stay within the free nodes.
            let absent = (kind.room / 64).max(4);
            // Its base: the program before the write over as many new flows per call (a
            // call's fixed costs weigh on few repetitions).
            let before_absent =
                new_flows(&mut bench, &mut fresh, BENCH_STEP_MAGLEV, absent)?.median;
            let write = |bits: u32| BENCH_STEP_CONN | kind.bits | bits;
            let absent_row = |bench: &mut Bench, fresh: &mut Fresh, bits: u32| {
                new_flows(bench, fresh, write(bits), absent)
            };
            let same = |bench: &mut Bench, bits: u32| {
                let f = with_flows(&syn, write(bits), 1, 0);
                bench.wrapped(Prog::BenchStep, &f, &[])
            };
            let s = absent_row(&mut bench, &mut fresh, 0)?;
            row("absent key as SYN, empty", s, before_absent);
            if kind.lru {
                let s = absent_row(&mut bench, &mut fresh, BENCH_STEP_UPDATE)?;
                row("absent key update, empty", s, before_absent);
                let s = absent_row(&mut bench, &mut fresh, BENCH_STEP_NOEXIST)?;
                row("absent key NOEXIST, empty", s, before_absent);
                let s = same(&mut bench, BENCH_STEP_UPDATE)?;
                row("same key update, empty", s, before_one);
            }
            let s = same(&mut bench, 0)?;
            row("same key as SYN, empty", s, before_one);
            // Half the benchmark CPU's room taken by flows never touched again.
            let fill = kind.room / 2;
            let f = fresh.frame(&syn, write(BENCH_STEP_UPDATE), fill);
            bench.wrapped_once(Prog::BenchStep, &f, &[], fill)?;
            let s = absent_row(&mut bench, &mut fresh, 0)?;
            row("absent key as SYN, half full", s, before_absent);
            if kind.lru {
                let s = absent_row(&mut bench, &mut fresh, BENCH_STEP_UPDATE)?;
                row("absent key update, half full", s, before_absent);
                let s = same(&mut bench, BENCH_STEP_UPDATE)?;
                row("same key update, half full", s, before_one);
            }
            let s = same(&mut bench, 0)?;
            row("same key as SYN, half full", s, before_one);
            // Full: twice the room again, then every new flow evicts.
            let fill = kind.room * 2;
            let f = fresh.frame(&syn, write(BENCH_STEP_UPDATE), fill);
            bench.wrapped_once(Prog::BenchStep, &f, &[], fill)?;
            let s = new_flows(&mut bench, &mut fresh, write(0), small)?;
            row("absent key as SYN, full (evicts)", s, before_new);
            if kind.lru {
                let s = new_flows(&mut bench, &mut fresh, write(BENCH_STEP_UPDATE), small)?;
                row("absent key update, full (evicts)", s, before_new);
            }
            steps.push(StepFigure {
                family: fam.name,
                step: Box::leak(
                    format!("{size} {}: before the write, {absent} new flows", kind.name)
                        .into_boxed_str(),
                ),
                rounds: Spread::of(vec![before_absent]),
                above_floor: before_absent - floor,
                cost: before_absent - floor,
                across_loads: None,
            });
        }
        for (what, ns) in [("one flow", before_one), ("new flows", before_new)] {
            steps.push(StepFigure {
                family: fam.name,
                step: Box::leak(format!("{size} before the write, {what}").into_boxed_str()),
                rounds: Spread::of(vec![ns]),
                above_floor: ns - floor,
                cost: ns - floor,
                across_loads: None,
            });
        }
    }
    let max_spread = steps.iter().map(|s| s.rounds.spread).fold(0.0, f64::max);
    Ok(Report {
        repeat: opts.repeat,
        rounds: opts.rounds,
        loads: 1,
        trivial_ns: 0.0,
        floor_ns,
        restore_ns: 0.0,
        restore_marked_ns: 0.0,
        conn_table_size: None,
        figures: Vec::new(),
        bench_cpu,
        consumer_cpu: None,
        flood: Vec::new(),
        flood_cpu: None,
        max_spread,
        rows_remeasured: steps.iter().filter(|s| s.rounds.remeasured > 0).count(),
        rows_unstable: steps.iter().filter(|s| s.rounds.unstable).count(),
        steps,
        events_sent: 0,
        events_lost: 0,
    })
}
