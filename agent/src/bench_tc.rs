//! `marklb-agent bench`, second part: the TC balancer (`--mark-delivery skb-mark`) next to
//! the XDP balancer, path by path, measured the same way for both.
//!
//! An skb test run allocates a fresh skb for every `BPF_PROG_TEST_RUN` call but not between
//! repetitions, and a forwarded skb cannot be put back the way the XDP wrapper restores a
//! frame (an encapsulated skb stays marked as encapsulated). So every figure here is the
//! median of many single runs (repeat 1: the kernel times one program run), for both
//! hooks, each next to its own trivial program measured the same way. The path counters
//! must show that every run took the measured path.

use anyhow::{Context, Result, bail};
use marklb_common::{Counter, MarkEntry};
use serde::Serialize;

use crate::{
    datapath::{Datapath, LoadOptions, Prog, TcProg},
    maglev::Backend,
    model::DatapathModel,
    packet::FrameSpec,
    vip::VipId,
};

/// One path, both hooks.
#[derive(Clone, Debug, Serialize)]
pub struct HookFigure {
    pub family: &'static str,
    pub path: &'static str,
    /// Median ns of one XDP run, and above the trivial XDP program.
    pub xdp_ns: f64,
    pub xdp_above_floor: f64,
    /// Median ns of one TC run, and above the trivial TC program.
    pub tc_ns: f64,
    pub tc_above_floor: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HookReport {
    /// Single runs per figure.
    pub samples: u32,
    pub xdp_trivial_ns: f64,
    pub tc_trivial_ns: f64,
    pub figures: Vec<HookFigure>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A program under test: which hook, which program.
#[derive(Clone, Copy)]
enum Target {
    Xdp(Prog),
    Tc(TcProg),
}

/// Median ns of `samples` single runs; `expect` must count every run.
fn measure(
    dp: &mut Datapath,
    target: Target,
    frame: &[u8],
    mark: u32,
    samples: u32,
    expect: &[Counter],
) -> Result<f64> {
    let before = dp.counters()?;
    let mut ns = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let t = match target {
            Target::Xdp(p) => {
                dp.test_run(p, frame, (mark != 0).then_some(mark))?
                    .ns_per_run
            }
            Target::Tc(p) => dp.test_run_tc(p, frame, mark)?.ns_per_run,
        };
        ns.push(t as f64);
    }
    let delta = dp.counters()?.since(&before);
    for c in expect {
        if delta.get(*c) != samples as u64 {
            bail!(
                "path check failed: {} counted {} of {samples} runs",
                c.label(),
                delta.get(*c)
            );
        }
    }
    Ok(median(ns))
}

/// XDP and TC, path by path, IPv4 and IPv6.
pub fn run(samples: u32) -> Result<HookReport> {
    let mut dp = Datapath::load(&LoadOptions::default())
        .context("loading the datapath (the benchmark needs root and bpf())")?;
    // Events off: a new flow per run would fill the ring nobody drains here.
    let cfg = marklb_common::LbConfig {
        flags: marklb_common::CFG_F_ENABLED | marklb_common::CFG_F_ICMP_TOO_BIG,
        mtu: 1500,
        next_hop_mac: [0x02, 0, 0, 0, 0, 0xfe],
        encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
        encap_src_v6_be: marklb_common::addr_words("fc00:6d6c:62::".parse().expect("ip")),
        ..Default::default()
    };
    dp.set_config(&cfg)?;
    let mut lb = DatapathModel::new(&dp);
    let probe = FrameSpec::tcp(
        "192.0.2.10".parse().expect("ip"),
        1,
        "10.0.0.10".parse().expect("ip"),
        80,
        true,
    )
    .build();
    let xdp_trivial_ns = measure(
        &mut dp,
        Target::Xdp(Prog::BenchTrivial),
        &probe,
        0,
        samples,
        &[],
    )?;
    let tc_trivial_ns = measure(
        &mut dp,
        Target::Tc(TcProg::BenchTrivial),
        &probe,
        0,
        samples,
        &[],
    )?;
    let mut figures = Vec::new();
    let fams: [(&'static str, &str, &str, &str, &str); 2] = [
        ("ipv4", "192.0.2.10", "10.0.0.10", "10.0.0.99", "10.1.0."),
        (
            "ipv6",
            "2001:db8::10",
            "2001:db8:f::10",
            "2001:db8:f::99",
            "2001:db8:1::",
        ),
    ];
    for (name, client, vip, other, real_prefix) in fams {
        let (client, vip, other) = (
            client.parse().expect("ip"),
            vip.parse().expect("ip"),
            other.parse().expect("ip"),
        );
        let backends: Vec<Backend> = (1..=10)
            .map(|i| Backend {
                addr: format!("{real_prefix}{i}").parse().expect("ip"),
                weight: 1,
            })
            .collect();
        let vid = VipId::tcp(vip, 80);
        let leaving = lb.set_vip(&mut dp, vid, &backends, 65_537)?;
        lb.retire(&mut dp, &leaving)?;
        let syn = FrameSpec::tcp(client, 10_000, vip, 80, true).build();
        let ack_spec = FrameSpec::tcp(client, 10_000, vip, 80, false);
        let ack = ack_spec.build();
        let non_vip = FrameSpec::tcp(client, 10_000, other, 80, false).build();
        // Learn the flow, then give it mark 1 pointing where the normal path sent it.
        dp.test_run(Prog::Balancer, &syn, None)?;
        let conn = dp.conn(&ack_spec.flow()).context("flow learned")?;
        dp.set_mark(
            1,
            &MarkEntry {
                real_id: conn.real_id,
                real_gen: conn.real_gen,
                vip_id: conn.vip_id.into(),
                _pad: 0,
            },
        )?;
        let rows: [(&'static str, &[u8], u32, &[Counter]); 4] = [
            ("non-VIP pass", &non_vip, 0, &[Counter::PassNotVip]),
            ("new flow (SYN)", &syn, 0, &[Counter::NewFlow]),
            ("established (conn table)", &ack, 0, &[Counter::ConnHit]),
            ("mark fast path", &ack, 1, &[Counter::MarkHit]),
        ];
        for (path, frame, mark, expect) in rows {
            let x = measure(
                &mut dp,
                Target::Xdp(Prog::Balancer),
                frame,
                mark,
                samples,
                expect,
            )?;
            let t = measure(
                &mut dp,
                Target::Tc(TcProg::Balancer),
                frame,
                mark,
                samples,
                expect,
            )?;
            figures.push(HookFigure {
                family: name,
                path,
                xdp_ns: x,
                xdp_above_floor: x - xdp_trivial_ns,
                tc_ns: t,
                tc_above_floor: t - tc_trivial_ns,
            });
        }
        // The emulated NIC's TC program alone (the XDP one tail-calls the balancer).
        dp.set_nic_flow(&ack_spec.flow(), 1)?;
        let nic = measure(
            &mut dp,
            Target::Tc(TcProg::EmulatedNic),
            &ack,
            0,
            samples,
            &[Counter::NicMarked],
        )?;
        dp.remove_nic_flow(&ack_spec.flow())?;
        figures.push(HookFigure {
            family: name,
            path: "emulated NIC alone (sets skb->mark)",
            xdp_ns: f64::NAN,
            xdp_above_floor: f64::NAN,
            tc_ns: nic,
            tc_above_floor: nic - tc_trivial_ns,
        });
        let leaving = lb.remove_vip(&mut dp, &vid)?;
        lb.retire(&mut dp, &leaving)?;
    }
    Ok(HookReport {
        samples,
        xdp_trivial_ns,
        tc_trivial_ns,
        figures,
    })
}

/// The report as a table for people.
pub fn render(r: &HookReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "XDP vs TC (skb-mark) balancer: median of {} single runs each; trivial XDP {:.1} ns, trivial TC {:.1} ns",
        r.samples, r.xdp_trivial_ns, r.tc_trivial_ns
    );
    let _ = writeln!(
        s,
        "{:<6} {:<36} {:>8} {:>10} {:>8} {:>10}",
        "family", "path", "XDP ns", "above flr", "TC ns", "above flr"
    );
    for f in &r.figures {
        let _ = writeln!(
            s,
            "{:<6} {:<36} {:>8.1} {:>10.1} {:>8.1} {:>10.1}",
            f.family, f.path, f.xdp_ns, f.xdp_above_floor, f.tc_ns, f.tc_above_floor
        );
    }
    s
}
