//! `marklb-agent run`: the command line, and the loop that ties a source of desired state to
//! the node engine. The standalone source reads LoadBalancer manifests ([`file_source`]);
//! the engine ([`Node`]) does everything on the node. The datapath is pinned: a restarted
//! agent, even after `kill -9`, adopts it without losing flows or marks.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use tokio::signal::unix::SignalKind;

use crate::{
    attach::{self, ModePref, PinLayout},
    file_source::{self, FileSource},
    marks::{HwBackendKind, MarkDelivery},
    metrics::Metrics,
    node::{self, Node, NodeOptions},
};
use marklb_common::{DEFAULT_CONN_TABLE_SIZE, DEFAULT_RING_CAPACITY};

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// LoadBalancer manifests to serve: a file (several YAML documents allowed) or a
    /// directory of `*.yaml` files; re-read when they change and on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
    /// Interface the XDP datapath attaches to (default: spec.interface).
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// Hardware backend that marks packets of known flows.
    #[arg(long, value_enum, default_value = "emulated")]
    pub hw_backend: HwBackendKind,
    /// How marks reach the datapath: `xdp-metadata` (XDP balancer) or `skb-mark` (TC ingress
    /// balancer on tcx, the mark in the low 16 bits of skb->mark, as upstream mlx5 delivers
    /// a flower rule's flow tag).
    #[arg(long, value_enum, default_value = "xdp-metadata")]
    pub mark_delivery: MarkDelivery,
    /// Address for /metrics, /healthz, /readyz and /status.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,
    /// This node's name (Kubernetes: from the NODE_NAME downward-API variable).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs mount under which maps and the XDP link are pinned (mounted if needed).
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: ModePref,
    /// Replace an XDP program on the interface that is not marklb's (default: refuse).
    #[arg(long)]
    pub replace_foreign_xdp: bool,
    /// Turn GRO/LRO off on the interface (they are only reported otherwise).
    #[arg(long)]
    pub disable_offloads: bool,
    /// Remove the datapath from the interface on SIGTERM (default: keep it serving).
    #[arg(long)]
    pub remove_on_exit: bool,
    /// Maglev ring storage, in slots (the sum of all VIPs' table sizes plus one spare ring).
    #[arg(long, default_value_t = DEFAULT_RING_CAPACITY)]
    pub ring_capacity: u32,
    /// Established flows remembered by the connection table.
    #[arg(long, default_value_t = DEFAULT_CONN_TABLE_SIZE)]
    pub conn_table_size: u32,
    /// How often the configuration is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    }
}

/// Sets up the datapath and runs until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let first = file_source::load(&args.config);
    let interface = match (
        &args.interface,
        first.as_ref().ok().and_then(|l| l.interface()),
    ) {
        (Some(i), _) => i.clone(),
        (None, Some(i)) => i,
        (None, None) => bail!("no interface: pass --interface or set spec.interface"),
    };
    let initial_marks = first
        .as_ref()
        .ok()
        .and_then(|l| l.mark_policy())
        .unwrap_or_else(node::default_mark_policy);
    let mut node = Node::open(NodeOptions {
        interface,
        bpffs: args.bpffs.clone(),
        xdp_mode: args.xdp_mode,
        replace_foreign_xdp: args.replace_foreign_xdp,
        disable_offloads: args.disable_offloads,
        ring_capacity: args.ring_capacity,
        conn_table_size: args.conn_table_size,
        hw_backend: args.hw_backend,
        mark_delivery: args.mark_delivery,
        initial_marks,
        node_name: args.node_name.clone(),
    })
    .await?;
    let metrics = Arc::new(Metrics::new());
    let mut source = FileSource::new(args.config.clone());

    // Program the VIPs before attaching, so the first packet meets a configured datapath.
    source.reload(&mut node, &metrics, true).await;
    node.attach().await?;

    let http = tokio::spawn(crate::http::serve(
        args.metrics_addr,
        node.handle().clone(),
        metrics.clone(),
    ));
    let events = node.take_events().expect("event reader taken once");
    let histogram = metrics.clone();
    let events_task = tokio::spawn(node::consume_events(
        events,
        node.handle().clone(),
        move |backend, latency| {
            histogram
                .event_to_mark
                .with_label_values(&[backend])
                .observe(latency.as_secs_f64())
        },
    ));

    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut reload_tick = tokio::time::interval(args.reload_interval);
    let mut upkeep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = reload_tick.tick() => source.reload(&mut node, &metrics, false).await,
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading");
                source.reload(&mut node, &metrics, true).await
            }
            _ = upkeep.tick() => node.tick(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if http.is_finished() {
            bail!(
                "the metrics server stopped (is {} in use?)",
                args.metrics_addr
            );
        }
    }
    events_task.abort();
    node.finish(args.remove_on_exit)
}

/// `marklb-agent cleanup`: removes what the agent put on the node for an interface.
pub fn cleanup(bpffs: &std::path::Path, iface: &str) -> Result<bool> {
    let pins = attach::remove_pins(&PinLayout::new(bpffs, iface))?;
    let rules = crate::marks::mellanox::remove_rules(iface).map_err(anyhow::Error::msg)?;
    Ok(pins || rules)
}
