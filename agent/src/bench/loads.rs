//! The benchmark over several freshly loaded datapaths (`bench --loads N`).
//!
//! Within one load a row's rounds agree (typically 1-5%), yet two runs of the benchmark
//! disagreed by 10-30% on some rows even on an idle machine. Loads measured back to back
//! in one invocation show two causes: the whole machine's speed drifts over minutes on this
//! VM (rows that touch almost no memory, such as the non-VIP pass, move by 8-15% between
//! loads), and rows that walk much memory (50,000 flows, absent keys, a full connection
//! table) move by 20-96%, since each load's maps land on other pages (cache sets, TLB reach,
//! the LRU's free-node order) that stay fixed for all rounds of that load. Rounds sample
//! neither; loads sample both. Each row then reports the load whose median is the median
//! of all loads, so its min/med/max, spread and ratio stay one load's consistent figures,
//! and the loads' own spread is printed beside it.

use anyhow::{Result, ensure};

use super::{BenchOptions, Figure, FloodFigure, Report, Spread, StepFigure, run, spread_totals};

/// Runs the benchmark on `loads` freshly loaded datapaths and combines the reports.
pub fn run_loads(opts: &BenchOptions, loads: u32) -> Result<Report> {
    let reports = (0..loads.max(1))
        .map(|_| run(opts))
        .collect::<Result<Vec<_>>>()?;
    combine(reports)
}

/// Index of the median of `values` (the lower one of an even count).
fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order[(values.len() - 1) / 2]
}

fn median(values: &[f64]) -> f64 {
    values[median_index(values)]
}

/// One report from several of the same benchmark: per row the median load's figures.
pub fn combine(mut reports: Vec<Report>) -> Result<Report> {
    ensure!(!reports.is_empty(), "no benchmark run to combine");
    if reports.len() == 1 {
        return Ok(reports.remove(0));
    }
    let first = &reports[0];
    for r in &reports[1..] {
        ensure!(
            r.figures.len() == first.figures.len()
                && r.steps.len() == first.steps.len()
                && r.flood.len() == first.flood.len(),
            "benchmark runs measured different rows"
        );
    }
    let mut figures: Vec<Figure> = Vec::with_capacity(first.figures.len());
    for i in 0..first.figures.len() {
        let rows: Vec<&Figure> = reports.iter().map(|r| &r.figures[i]).collect();
        ensure!(
            rows.iter()
                .all(|f| (f.family, f.path, f.flows)
                    == (rows[0].family, rows[0].path, rows[0].flows)),
            "benchmark runs measured different rows at {i}"
        );
        let ns: Vec<f64> = rows.iter().map(|f| f.ns).collect();
        let mut f = rows[median_index(&ns)].clone();
        f.across_loads = Some(Spread::of(ns));
        figures.push(f);
    }
    // Ratios from the combined figures: the chosen established row may come from another
    // load than the row itself.
    let established: Vec<(&'static str, u32, f64)> = figures
        .iter()
        .filter(|f| f.path.starts_with("established"))
        .map(|f| (f.family, f.flows, f.above_floor))
        .collect();
    for f in &mut figures {
        if f.speedup_vs_established.is_some() {
            f.speedup_vs_established = established
                .iter()
                .find(|e| e.0 == f.family && e.1 == f.flows)
                .map(|e| e.2 / f.above_floor.max(0.1));
        }
    }
    let mut steps: Vec<StepFigure> = Vec::with_capacity(first.steps.len());
    for i in 0..first.steps.len() {
        let rows: Vec<&StepFigure> = reports.iter().map(|r| &r.steps[i]).collect();
        let ns: Vec<f64> = rows.iter().map(|s| s.rounds.median).collect();
        let mut s = rows[median_index(&ns)].clone();
        s.cost = median(&rows.iter().map(|s| s.cost).collect::<Vec<_>>());
        s.across_loads = Some(Spread::of(ns));
        steps.push(s);
    }
    // The flood rows as the steps: the median load's, with the loads' spread.
    let mut flood: Vec<FloodFigure> = Vec::with_capacity(first.flood.len());
    for i in 0..first.flood.len() {
        let rows: Vec<&FloodFigure> = reports.iter().map(|r| &r.flood[i]).collect();
        let ns: Vec<f64> = rows.iter().map(|f| f.flooded.median).collect();
        flood.push(rows[median_index(&ns)].clone());
    }
    let field = |get: fn(&Report) -> f64| median(&reports.iter().map(get).collect::<Vec<_>>());
    let (max_spread, rows_remeasured, rows_unstable) = spread_totals(&figures);
    Ok(Report {
        repeat: first.repeat,
        rounds: first.rounds,
        loads: reports.len() as u32,
        trivial_ns: field(|r| r.trivial_ns),
        floor_ns: field(|r| r.floor_ns),
        restore_ns: field(|r| r.restore_ns),
        restore_marked_ns: field(|r| r.restore_marked_ns),
        conn_table_size: first.conn_table_size,
        bench_cpu: first.bench_cpu,
        consumer_cpu: first.consumer_cpu,
        max_spread,
        rows_remeasured,
        rows_unstable,
        events_sent: reports.iter().map(|r| r.events_sent).sum(),
        events_lost: reports.iter().map(|r| r.events_lost).sum(),
        flood_cpu: first.flood_cpu,
        figures,
        steps,
        flood,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(median: f64) -> Spread {
        Spread::of(vec![median - 1.0, median, median + 1.0])
    }

    fn report(est: f64, mark: f64, floor: f64) -> Report {
        let figure = |path: &'static str, ns: f64| Figure {
            family: "ipv4",
            path,
            flows: 1,
            ns,
            rounds: spread(ns),
            above_floor: ns - floor,
            speedup_vs_established: Some(0.0),
            across_loads: None,
        };
        Report {
            repeat: 10,
            rounds: 3,
            loads: 1,
            trivial_ns: 10.0,
            floor_ns: floor,
            restore_ns: 0.0,
            restore_marked_ns: 0.0,
            conn_table_size: Some(1 << 19),
            figures: vec![
                figure("established (conn table)", est),
                figure("mark fast path, per flow", mark),
            ],
            bench_cpu: Some(0),
            consumer_cpu: Some(1),
            max_spread: 0.0,
            rows_remeasured: 0,
            rows_unstable: 0,
            steps: Vec::new(),
            flood: Vec::new(),
            flood_cpu: Some(1),
            events_sent: 1,
            events_lost: 0,
        }
    }

    #[test]
    fn each_row_takes_the_median_load_and_ratios_follow_the_combined_rows() {
        let combined = combine(vec![
            report(150.0, 100.0, 50.0),
            report(250.0, 90.0, 40.0),
            report(200.0, 120.0, 45.0),
        ])
        .unwrap();
        assert_eq!(combined.loads, 3);
        assert_eq!(combined.floor_ns, 45.0);
        let est = &combined.figures[0];
        assert_eq!(est.ns, 200.0, "the middle of 150, 250, 200");
        assert_eq!(est.above_floor, 155.0, "that load's own figure");
        let mark = &combined.figures[1];
        assert_eq!(mark.ns, 100.0);
        assert_eq!(mark.above_floor, 50.0);
        assert_eq!(mark.speedup_vs_established, Some(155.0 / 50.0));
        let loads = mark.across_loads.expect("spread over the loads");
        assert_eq!((loads.min, loads.median, loads.max), (90.0, 100.0, 120.0));
        assert_eq!(combined.events_sent, 3);
    }

    #[test]
    fn runs_of_different_rows_do_not_combine() {
        let mut other = report(150.0, 100.0, 50.0);
        other.figures.pop();
        assert!(combine(vec![report(150.0, 100.0, 50.0), other]).is_err());
    }
}
