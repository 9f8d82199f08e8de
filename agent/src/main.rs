//! `marklb-agent`: the node agent of marklb.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "marklb-agent", version, about = "marklb node agent: XDP L4 load balancer with NIC flow-mark acceleration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure ns/packet of every datapath path with BPF_PROG_TEST_RUN (needs root).
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
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { repeat, rounds, flows, json } => {
            let opts = marklb_agent::bench::BenchOptions { repeat, rounds, flows };
            let report = marklb_agent::bench::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", marklb_agent::bench::render(&report));
            }
        }
    }
    Ok(())
}
