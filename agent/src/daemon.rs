//! `marklb-agent run`: the node agent in standalone mode. It programs the datapath from a
//! LoadBalancer manifest, keeps it in step with the file (reload on change and SIGHUP,
//! applied as a diff, bad input rejected while the last good state keeps serving), runs the
//! flow-mark manager, and serves metrics. The datapath is pinned: a restarted agent, even
//! after `kill -9`, adopts it without losing flows or marks.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    attach::{self, ModePref, PinLayout},
    balancer::Balancer,
    datapath::{Datapath, LoadOptions},
    desired::{Desired, MarkPolicy},
    marks::{self, HwBackendKind, MarkManager},
    metrics::Metrics,
    netlink::Netlink,
    offload, reconcile,
    state::{Shared, SharedRef},
};
use marklb_common::{DEFAULT_CONN_TABLE_SIZE, DEFAULT_NIC_FLOWS, DEFAULT_RING_CAPACITY};
use marklb_crds::{loadbalancer::LoadBalancerSpec, manifest::from_yaml_manifest};

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// LoadBalancer manifest (apiVersion marklb.io/v1alpha1, kind LoadBalancer) to serve;
    /// re-read when it changes and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Interface the XDP datapath attaches to (default: spec.interface).
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// Hardware backend that marks packets of known flows.
    #[arg(long, value_enum, default_value = "emulated")]
    pub hw_backend: HwBackendKind,
    /// Address for /metrics, /healthz and /readyz.
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
    /// How often the configuration file is checked for changes.
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

/// A configuration file read and validated.
struct Loaded {
    text: String,
    spec: LoadBalancerSpec,
    desired: Desired,
}

fn load_config(path: &PathBuf) -> Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lb = from_yaml_manifest(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let desired =
        Desired::from_spec(&lb.spec).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Loaded {
        text,
        spec: lb.spec,
        desired,
    })
}

fn default_policy() -> MarkPolicy {
    MarkPolicy {
        scope: marklb_crds::loadbalancer::MarkScope::PerFlow,
        capacity: 65_535,
        idle_timeout: Duration::from_secs(30),
    }
}

struct Agent {
    args: RunArgs,
    iface: String,
    shared: SharedRef,
    metrics: Arc<Metrics>,
    netlink: Netlink,
    /// Text of the file last seen (applied or rejected), to notice changes.
    seen: Option<String>,
}

impl Agent {
    /// Reads, validates and applies the configuration file. Bad input changes nothing.
    async fn reload(&mut self, force: bool) {
        // An unreadable file is reported once, not on every poll.
        let text = std::fs::read_to_string(&self.args.config).ok();
        if !force && text == self.seen {
            return;
        }
        // A file being written in place may be caught half-way: act on it only once two
        // reads a moment apart agree (ConfigMap volumes are swapped atomically anyway).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if std::fs::read_to_string(&self.args.config).ok() != text {
            return; // still changing: the next poll looks again
        }
        self.seen = text;
        match self.try_reload().await {
            Ok(summary) => {
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.metrics.config_valid.set(1);
                tracing::info!(%summary, "configuration applied");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                self.metrics.config_valid.set(0);
                tracing::error!(
                    error = format!("{e:#}"),
                    "configuration rejected; the last good state keeps serving"
                );
            }
        }
    }

    async fn try_reload(&mut self) -> Result<String> {
        let loaded = load_config(&self.args.config)?;
        self.seen = Some(loaded.text.clone());
        if let Some(want) = loaded.spec.interface.as_ref().filter(|w| **w != self.iface) {
            bail!(
                "spec.interface is {want} but this agent serves {}; restart it to move",
                self.iface
            );
        }
        let next_hop_ip = loaded.spec.next_hop.as_ref().and_then(|n| n.ip());
        let mac = match loaded.spec.next_hop.as_ref().and_then(|n| n.mac_bytes()) {
            Some(mac) => mac,
            None => {
                self.netlink
                    .resolve_next_hop(&self.iface, next_hop_ip)
                    .await?
            }
        };
        let mut guard = self.shared.lock().expect("agent state lock");
        let s = &mut *guard;
        reconcile::check_capacity(&s.lb, &loaded.desired).map_err(anyhow::Error::msg)?;
        let report = reconcile::apply(&mut s.dp, &mut s.lb, &mut s.marks, &loaded.desired)?;
        s.marks.set_policy(&mut s.dp, loaded.desired.marks);
        s.dp.set_config(&loaded.desired.lb_config(mac))?;
        s.vip_labels = loaded
            .desired
            .vips
            .iter()
            .map(|(k, v)| (*k, v.label.clone()))
            .collect();
        s.next_hop_mac = Some(mac);
        s.applied = Some(loaded.desired);
        Ok(format!(
            "{} VIPs added, {} changed, {} adopted, {} removed, {} unchanged, {} reals retired",
            report.added.len(),
            report.changed.len(),
            report.adopted.len(),
            report.removed.len(),
            report.unchanged,
            report.reals_retired
        ))
    }
}

/// Sets up the datapath and runs until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let first = load_config(&args.config);
    let iface = match (
        &args.interface,
        first.as_ref().ok().and_then(|l| l.spec.interface.clone()),
    ) {
        (Some(i), _) => i.clone(),
        (None, Some(i)) => i,
        (None, None) => bail!("no interface: pass --interface or set spec.interface"),
    };
    let netlink = Netlink::connect()?;
    netlink
        .link(&iface)
        .await
        .with_context(|| format!("interface {iface}"))?;

    attach::ensure_bpffs(&args.bpffs)?;
    let pins = PinLayout::new(&args.bpffs, &iface);
    let adopting = pins.exists();
    let foreign = if adopting {
        None
    } else {
        netlink.xdp_attachment(&iface).await?
    };
    {
        if let Some(foreign) = foreign {
            if !args.replace_foreign_xdp {
                bail!(
                    "{iface} already carries an XDP program that is not marklb's (id {}, {} mode); \
                     leaving it alone. Remove it, or pass --replace-foreign-xdp",
                    foreign.prog_id,
                    foreign.mode
                );
            }
            tracing::warn!(prog_id = foreign.prog_id, "replacing a foreign XDP program");
            netlink.detach_xdp(&iface).await?;
        }
    }
    match offload::read(&iface) {
        Ok(o) if o.gro || o.lro => {
            if args.disable_offloads {
                offload::disable(&iface)
                    .with_context(|| format!("turning GRO/LRO off on {iface}"))?;
                tracing::info!(iface, "GRO/LRO turned off");
            } else {
                tracing::warn!(
                    iface,
                    gro = o.gro,
                    lro = o.lro,
                    "receive offloads are on: encapsulated forwarding may see merged packets (use --disable-offloads)"
                );
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(iface, error = %e, "could not read receive offloads"),
    }

    std::fs::create_dir_all(pins.maps())?;
    let mut dp = Datapath::load(&LoadOptions {
        ring_capacity: args.ring_capacity,
        conn_table_size: args.conn_table_size,
        nic_flows: DEFAULT_NIC_FLOWS,
        pin_dir: Some(pins.maps()),
    })?;
    let lb = if adopting {
        Balancer::adopt(&dp)?
    } else {
        Balancer::new(&dp)
    };
    let selected = marks::select(args.hw_backend, &mut dp, &iface)
        .with_context(|| format!("hardware backend {:?}", args.hw_backend))?;
    let entry = selected.entry;
    let policy = first
        .as_ref()
        .map(|l| l.desired.marks)
        .unwrap_or_else(|_| default_policy());
    let mut marks = MarkManager::new(selected.backend, policy);
    if adopting {
        let n = marks.adopt(&mut dp)?;
        tracing::info!(
            vips = lb.vip_count(),
            reals = lb.real_count(),
            marks = n,
            "adopted the pinned datapath"
        );
    }
    let events = dp.take_events().context("event ring")?;
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        dp,
        lb,
        marks,
        interface: iface.clone(),
        vip_labels: Default::default(),
        attached: None,
        applied: None,
        next_hop_mac: None,
        not_ready: None,
    }));
    let metrics = Arc::new(Metrics::new());
    let mut agent = Agent {
        args: args.clone(),
        iface: iface.clone(),
        shared: shared.clone(),
        metrics: metrics.clone(),
        netlink,
        seen: None,
    };

    // Program the VIPs before attaching, so the first packet meets a configured datapath.
    agent.reload(true).await;
    let mut attached = {
        let mut s = shared.lock().expect("agent state lock");
        attach::attach(&mut s.dp, entry, &iface, &pins, args.xdp_mode)?
    };
    if let Ok(Some(x)) = agent.netlink.xdp_attachment(&iface).await {
        attached.mode = x.mode.to_string();
    }
    {
        let mut s = shared.lock().expect("agent state lock");
        tracing::info!(
            iface,
            mode = attached.mode,
            prog_id = attached.prog_id,
            adopted = attached.adopted,
            hw_backend = s.marks.backend(),
            node = args.node_name.as_deref().unwrap_or(""),
            "datapath attached"
        );
        s.attached = Some(attached);
    }

    let http = tokio::spawn(crate::http::serve(
        args.metrics_addr,
        shared.clone(),
        metrics.clone(),
    ));
    let events_task = tokio::spawn(consume_events(events, shared.clone(), metrics.clone()));

    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut reload_tick = tokio::time::interval(args.reload_interval);
    let mut age_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = reload_tick.tick() => agent.reload(false).await,
            _ = sighup.recv() => { tracing::info!("SIGHUP: reloading"); agent.reload(true).await }
            _ = age_tick.tick() => {
                let mut s = shared.lock().expect("agent state lock");
                let s = &mut *s;
                if let Err(e) = s.marks.age(&mut s.dp) {
                    tracing::warn!(error = %e, "aging flow marks failed");
                }
            }
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
    if args.remove_on_exit {
        attach::remove_pins(&pins)?;
        tracing::info!(iface, "datapath removed");
    } else {
        tracing::info!(iface, "exiting; the datapath keeps serving (pinned)");
    }
    Ok(())
}

/// Drains new-flow events into the mark manager as they arrive.
async fn consume_events(
    reader: crate::datapath::EventReader,
    shared: SharedRef,
    metrics: Arc<Metrics>,
) {
    // SAFETY: the reader owns the ring buffer's map fd, which stays open and the same for
    // as long as the AsyncFd owns the reader.
    let mut fd = match unsafe { AsyncFd::register(reader) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring; no marks will be installed");
            return;
        }
    };
    let mut batch = Vec::with_capacity(1024);
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        while let Some(ev) = guard.get_inner_mut().next_event() {
            batch.push(ev);
            if batch.len() == 1024 {
                break;
            }
        }
        if batch.is_empty() {
            guard.clear_ready();
            continue;
        }
        let mut s = shared.lock().expect("agent state lock");
        let s = &mut *s;
        let backend = s.marks.backend();
        for ev in batch.drain(..) {
            if let Some(latency) = s.marks.on_event(&mut s.dp, &ev) {
                metrics
                    .event_to_mark
                    .with_label_values(&[backend])
                    .observe(latency.as_secs_f64());
            }
        }
    }
}

/// `marklb-agent cleanup`: removes what the agent put on the node for an interface.
pub fn cleanup(bpffs: &std::path::Path, iface: &str) -> Result<bool> {
    attach::remove_pins(&PinLayout::new(bpffs, iface))
}
