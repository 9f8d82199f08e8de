//! `marklb-agent`: the node agent of marklb.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "marklb-agent",
    version,
    about = "marklb node agent: XDP L4 load balancer with NIC flow-mark acceleration"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a LoadBalancer manifest on an interface (standalone mode, no cluster needed).
    Run(marklb_agent::daemon::RunArgs),
    /// Remove everything the agent put on the node for an interface (XDP link, pinned maps,
    /// NIC rules).
    Cleanup {
        /// The interface the datapath was attached to.
        #[arg(long)]
        interface: String,
        /// The bpffs mount the agent pinned under.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: std::path::PathBuf,
    },
    /// Print what a node serves on an interface (VIPs, owners, reals, marks, NIC rules,
    /// path counters, attachment), read from the pinned datapath; works without the agent.
    Status(marklb_agent::status::StatusArgs),
    /// Decapsulate marklb's IP-in-IP traffic on a real server (for kernels without
    /// ipip/ip6tnl devices); runs until SIGTERM/SIGINT.
    Decap(marklb_agent::decap::DecapArgs),
    /// Measure ns/packet of every datapath path with BPF_PROG_TEST_RUN (needs root; built
    /// with `--features bench`).
    #[cfg(feature = "bench")]
    Bench {
        /// Repetitions per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Measurements per figure; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Distinct flows in the many-flows variant.
        #[arg(long, default_value_t = 50_000)]
        flows: u32,
        /// Flows of the rows after the SYN (each flow's SYN unmeasured, then one packet
        /// each a round).
        #[arg(long, default_value_t = marklb_agent::bench::AFTER_SYN_FLOWS)]
        after_syn_flows: u32,
        /// Connection-table entries of the datapath measured (the agent's default: the
        /// memory the many-flows rows' sets spread over).
        #[arg(long, default_value_t = marklb_common::DEFAULT_CONN_TABLE_SIZE)]
        conn_table_size: u32,
        /// Freshly loaded datapaths to measure one after the other (each row reports the
        /// median load's figures and the loads' range): shows how far a row moves with
        /// where the maps land and with the machine's drift.
        #[arg(long, default_value_t = 1)]
        loads: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Measure the control plane instead (programming, mark installs, latency, memory).
        #[arg(long)]
        control_plane: bool,
        /// Measure the XDP and the TC (skb-mark) balancer side by side instead, path by path
        /// (median of this many single runs per figure).
        #[arg(long, value_name = "SAMPLES")]
        hooks: Option<u32>,
        /// Measure the new-flow connection-table write instead, by table size, table kind
        /// (the datapath's sets, the kernel LRU hashes), key present or absent, and fill.
        #[arg(long)]
        conn_table: bool,
    },
}

/// Whether log lines may carry ANSI colours: only on a terminal, and not with `NO_COLOR`.
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(marklb_agent::daemon::run(args))?;
        }
        Command::Decap(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(marklb_agent::decap::run(args))?;
        }
        Command::Status(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(marklb_agent::status::run(args))?;
        }
        Command::Cleanup { interface, bpffs } => {
            if marklb_agent::daemon::cleanup(&bpffs, &interface)? {
                println!("removed the marklb datapath from {interface}");
            } else {
                println!("nothing of marklb's on {interface}");
            }
        }
        #[cfg(feature = "bench")]
        Command::Bench {
            json,
            hooks: Some(samples),
            ..
        } => emit(
            json,
            &marklb_agent::bench_tc::run(samples)?,
            marklb_agent::bench_tc::render,
        )?,
        #[cfg(feature = "bench")]
        Command::Bench {
            json,
            control_plane: true,
            ..
        } => emit(
            json,
            &marklb_agent::control_bench::run()?,
            marklb_agent::control_bench::render,
        )?,
        #[cfg(feature = "bench")]
        Command::Bench {
            repeat,
            rounds,
            flows,
            after_syn_flows,
            conn_table_size,
            json,
            loads,
            conn_table,
            control_plane: false,
            hooks: None,
        } => {
            let opts = marklb_agent::bench::BenchOptions {
                repeat,
                rounds,
                flows,
                after_syn_flows,
                conn_table_size,
            };
            let report = if conn_table {
                marklb_agent::bench::run_conn_table(&opts)?
            } else {
                marklb_agent::bench::run_loads(&opts, loads)?
            };
            emit(json, &report, marklb_agent::bench::render)?;
        }
    }
    Ok(())
}

/// Prints a benchmark's report as JSON or as its table.
#[cfg(feature = "bench")]
fn emit<R: serde::Serialize>(json: bool, report: &R, render: fn(&R) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", render(report));
    }
    Ok(())
}
