//! `marklb-agent run`: the command line, and the loop that ties a source of desired state to
//! the node engine. Two sources: LoadBalancer manifests ([`file_source`], `--config`), or
//! this node's LoadBalancerNodeStates in the Kubernetes API ([`crate::kubernetes`],
//! `--kubernetes`); the engine ([`Node`]) does everything on the node. The datapath is
//! pinned: a restarted agent, even after `kill -9`, adopts it without losing flows or marks.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{signal::unix::SignalKind, task::JoinHandle};

use crate::{
    attach::{self, ModePref, PinLayout},
    desired::MarkPolicy,
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
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// Serve this node's LoadBalancerNodeStates from the Kubernetes API (in-cluster service
    /// account, or KUBECONFIG) and write their status, instead of --config.
    #[arg(long)]
    pub kubernetes: bool,
    /// Interface the XDP datapath attaches to (default: spec.interface with --config, the
    /// interface holding --interface-of with --kubernetes).
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// Without --interface: the interface that holds this local address (the node's
    /// InternalIP; the DaemonSet sets HOST_IP from the downward API).
    #[arg(long, value_name = "ADDR", env = "HOST_IP")]
    pub interface_of: Option<IpAddr>,
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
    match args.config.clone() {
        Some(config) => run_file(args, config).await,
        None => crate::kubernetes::run(args).await,
    }
}

/// Opens the node engine on `interface` with the command line's settings.
pub(crate) async fn open_node(
    args: &RunArgs,
    interface: String,
    initial_marks: MarkPolicy,
) -> Result<Node> {
    Node::open(NodeOptions {
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
    .await
}

/// What runs beside the source loop: the HTTP endpoints and the new-flow event consumer.
pub(crate) struct Surfaces {
    http: JoinHandle<Result<()>>,
    events: JoinHandle<()>,
    metrics_addr: SocketAddr,
}

impl Surfaces {
    pub(crate) fn start(node: &mut Node, metrics: &Arc<Metrics>, addr: SocketAddr) -> Self {
        let http = tokio::spawn(crate::http::serve(
            addr,
            node.handle().clone(),
            metrics.clone(),
        ));
        let events = node.take_events().expect("event reader taken once");
        let histogram = metrics.clone();
        let events = tokio::spawn(node::consume_events(
            events,
            node.handle().clone(),
            move |backend, latency| {
                histogram
                    .event_to_mark
                    .with_label_values(&[backend])
                    .observe(latency.as_secs_f64())
            },
        ));
        Self {
            http,
            events,
            metrics_addr: addr,
        }
    }

    /// Fails when the HTTP server stopped (it only stops on an error).
    pub(crate) fn check(&self) -> Result<()> {
        if self.http.is_finished() {
            bail!(
                "the metrics server stopped (is {} in use?)",
                self.metrics_addr
            );
        }
        Ok(())
    }

    pub(crate) fn stop(self) {
        self.events.abort();
        self.http.abort();
    }
}

/// SIGTERM and SIGINT, which end the agent.
pub(crate) struct Stop {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Stop {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            sigterm: tokio::signal::unix::signal(SignalKind::terminate())?,
            sigint: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    pub(crate) async fn requested(&mut self) {
        tokio::select! {
            _ = self.sigterm.recv() => {}
            _ = self.sigint.recv() => {}
        }
    }
}

/// Standalone mode: the manifests at `config`.
async fn run_file(args: RunArgs, config: PathBuf) -> Result<()> {
    let first = file_source::load(&config);
    let interface = match (
        &args.interface,
        first.as_ref().ok().and_then(|l| l.interface()),
        args.interface_of,
    ) {
        (Some(i), _, _) => i.clone(),
        (None, Some(i), _) => i,
        (None, None, Some(addr)) => crate::decap::interface_holding(addr)
            .with_context(|| format!("finding the interface that holds {addr}"))?,
        (None, None, None) => bail!("no interface: pass --interface or set spec.interface"),
    };
    let initial_marks = first
        .as_ref()
        .ok()
        .and_then(|l| l.mark_policy())
        .unwrap_or_else(node::default_mark_policy);
    let mut node = open_node(&args, interface, initial_marks).await?;
    let metrics = Arc::new(Metrics::new());
    let mut source = FileSource::new(config);

    // Program the VIPs before attaching, so the first packet meets a configured datapath.
    source.reload(&mut node, &metrics, true).await;
    node.attach().await?;
    let surfaces = Surfaces::start(&mut node, &metrics, args.metrics_addr);

    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut stop = Stop::new()?;
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
            _ = stop.requested() => break,
        }
        surfaces.check()?;
    }
    surfaces.stop();
    node.finish(args.remove_on_exit)
}

/// `marklb-agent cleanup`: removes what the agent put on the node for an interface.
pub fn cleanup(bpffs: &std::path::Path, iface: &str) -> Result<bool> {
    let pins = attach::remove_pins(&PinLayout::new(bpffs, iface))?;
    let rules = crate::marks::mellanox::remove_rules(iface).map_err(anyhow::Error::msg)?;
    Ok(pins || rules > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        Cmd::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|c| c.run)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_daemonsets_command_line_is_accepted() {
        // As the operator's DaemonSet writes it (the kubelet expands $(HOST_IP)).
        let a = parse(&[
            "--kubernetes",
            "--hw-backend=auto",
            "--mark-delivery=xdp-metadata",
            "--xdp-mode=generic",
            "--metrics-addr=10.0.0.5:9464",
            "--bpffs=/sys/fs/bpf",
        ])
        .unwrap();
        assert!(a.kubernetes && a.config.is_none());
        assert_eq!(a.hw_backend, HwBackendKind::Auto);
        assert_eq!(a.mark_delivery, MarkDelivery::XdpMetadata);
        assert_eq!(a.xdp_mode, ModePref::Generic);
    }

    #[test]
    fn exactly_one_source() {
        let e = parse(&["--interface", "eth0"]).unwrap_err();
        assert!(e.contains("--config"), "{e}");
        let e = parse(&["--config", "lb.yaml", "--kubernetes"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let a = parse(&["--config", "lb.yaml"]).unwrap();
        assert!(!a.kubernetes);
        assert_eq!(a.mark_delivery, MarkDelivery::XdpMetadata);
    }
}
