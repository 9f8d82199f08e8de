//! The node engine: one XDP datapath on one interface, whatever feeds it.
//!
//! A source of desired state (the standalone file source, or the Kubernetes mode) opens a
//! [`Node`], applies [`Merged`] states to it, attaches it, and ticks it; the engine does the
//! rest: attach or adopt a pinned datapath, apply a state as a diff, turn new-flow events into
//! marks, age them, keep its own hold on the XDP link (pinning it again if the pins vanish),
//! tell the truth about readiness, and report what is programmed per owner.
//!
//! Invariants:
//! - one lock ([`Core`]) guards the datapath, its model and the mark manager; the event
//!   consumer, aging and applies take it, readers never do (they read [`Published`]);
//! - a state that cannot be applied changes nothing it can check first (capacity, next hop),
//!   and the last good state keeps serving;
//! - nothing the node programs depends on where the state came from.

mod events;
mod readiness;
mod report;
mod view;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use events::consume_events;
pub use readiness::readiness;
pub use report::{NodeReport, OwnerReport};
pub use view::{MarkSnapshot, NodeView, Published, ViewVip};

use crate::{
    apply::{self, ApplyReport},
    attach::{self, ModePref, PinLayout},
    datapath::{Datapath, EventReader, LoadOptions},
    desired::{Desired, MarkPolicy, Merged},
    marks::{self, Entry, HwBackendKind, MarkDelivery, MarkManager},
    model::DatapathModel,
    netlink::Netlink,
    owner_record::OwnerRecord,
    plan, rx_offloads, tc_attach,
    xdp_link::KeptLink,
};
use marklb_common::DEFAULT_NIC_FLOWS;
use marklb_crds::loadbalancer::MarkScope;

/// How the engine sets up its datapath.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub interface: String,
    /// bpffs mount under which maps and the XDP link are pinned (mounted if needed).
    pub bpffs: PathBuf,
    pub xdp_mode: ModePref,
    /// Replace an XDP program on the interface that is not marklb's.
    pub replace_foreign_xdp: bool,
    /// Turn GRO/LRO off (they are only reported otherwise).
    pub disable_offloads: bool,
    pub ring_capacity: u32,
    pub conn_table_size: u32,
    pub hw_backend: HwBackendKind,
    /// XDP balancer (mark in metadata) or TC balancer (mark in `skb->mark`).
    pub mark_delivery: MarkDelivery,
    /// Mark policy until a state says otherwise (adopted marks are kept under it).
    pub initial_marks: MarkPolicy,
    /// For logs.
    pub node_name: Option<String>,
}

/// The default mark policy of a LoadBalancer spec.
pub fn default_mark_policy() -> MarkPolicy {
    MarkPolicy {
        scope: MarkScope::PerFlow,
        capacity: 65_535,
        idle_timeout: Duration::from_secs(30),
    }
}

/// What the event consumer, aging and applies share, under one lock.
pub struct Core {
    pub dp: Datapath,
    pub model: DatapathModel,
    pub marks: MarkManager,
}

/// The engine's shared parts: the locked core and what it publishes. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    core: Arc<Mutex<Core>>,
    published: Arc<Published>,
}

impl NodeHandle {
    pub fn new(core: Core, published: Published) -> Self {
        Self {
            core: Arc::new(Mutex::new(core)),
            published: Arc::new(published),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("node engine lock")
    }

    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    /// A report of what is programmed, per owner.
    pub fn report(&self) -> NodeReport {
        report::report(self)
    }

    /// Turns a batch of new-flow events into marks; returns the event-to-mark latency of
    /// every mark installed. The lock is held for the batch only; the mark counters are
    /// published after it.
    pub fn handle_events(
        &self,
        batch: &mut Vec<marklb_common::NewFlowEvent>,
    ) -> Vec<std::time::Duration> {
        let mut lat = Vec::with_capacity(batch.len());
        let snapshot = {
            let mut core = self.lock();
            let core = &mut *core;
            core.marks.begin_batch();
            for ev in batch.drain(..) {
                if let Some(d) = core.marks.on_event(&mut core.dp, &ev) {
                    lat.push(d);
                }
            }
            // The batch's rules reach the NIC here: their latency includes the send.
            let sent = std::time::Instant::now();
            core.marks.end_batch(&mut core.dp);
            let send = sent.elapsed();
            lat.iter_mut().for_each(|d| *d += send);
            MarkSnapshot::of(&core.marks)
        };
        self.published.set_marks(snapshot);
        lat
    }
}

/// The engine.
pub struct Node {
    opts: NodeOptions,
    netlink: Netlink,
    pins: PinLayout,
    handle: NodeHandle,
    events: Option<EventReader>,
    /// What is attached to the interface (XDP: the emulated NIC or the balancer; TC: the
    /// balancer, behind the emulated NIC's TC program).
    entry: Entry,
    /// The agent's own hold on the attached links, with where each is pinned.
    links: Vec<(PathBuf, KeptLink)>,
    /// The maps the attached programs use (what must stay pinned), with their own
    /// descriptors.
    pinned_maps: Vec<(String, aya::maps::MapData)>,
    next_hop_mac: Option<[u8; 6]>,
    /// Which LoadBalancer owns each VIP, pinned for `marklb-agent status` (None: it could
    /// not be created; status then shows owners as unknown).
    owners: Option<OwnerRecord>,
}

impl Node {
    /// Loads the datapath for `opts.interface`, adopting a pinned one (a previous agent's)
    /// with its flows and marks; refuses an interface carrying another XDP program unless
    /// told to replace it. Nothing is attached yet (see [`Node::attach`]).
    pub async fn open(opts: NodeOptions) -> Result<Self> {
        let iface = opts.interface.clone();
        let netlink = Netlink::connect()?;
        netlink
            .link(&iface)
            .await
            .with_context(|| format!("interface {iface}"))?;
        attach::ensure_bpffs(&opts.bpffs)?;
        let pins = PinLayout::new(&opts.bpffs, &iface);
        let adopting = pins.exists();
        let xdp = opts.mark_delivery == MarkDelivery::XdpMetadata;
        if xdp
            && !adopting
            && let Some(foreign) = netlink.xdp_attachment(&iface).await?
        {
            if !opts.replace_foreign_xdp {
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
        check_rx_offloads(&iface, opts.disable_offloads)?;

        std::fs::create_dir_all(pins.maps())?;
        let owners = OwnerRecord::open_or_create(&pins.owners())
            .inspect_err(|e| tracing::warn!(error = %e, "no pinned owner record; status will not name owners"))
            .ok();
        let mut dp = Datapath::load(&LoadOptions {
            ring_capacity: opts.ring_capacity,
            conn_table_size: opts.conn_table_size,
            nic_flows: DEFAULT_NIC_FLOWS,
            pin_dir: Some(pins.maps()),
        })?;
        let model = if adopting {
            DatapathModel::adopt(&dp)?
        } else {
            DatapathModel::new(&dp)
        };
        let selected = marks::select(opts.hw_backend, opts.mark_delivery, &mut dp, &iface)
            .with_context(|| format!("hardware backend {:?}", opts.hw_backend))?;
        let mut marks = MarkManager::new(selected.backend, opts.initial_marks);
        if adopting {
            let n = marks.adopt(&mut dp)?;
            tracing::info!(
                vips = model.vip_count(),
                reals = model.real_count(),
                marks = n,
                "adopted the pinned datapath"
            );
        }
        let events = dp.take_events().context("event ring")?;
        let view = NodeView {
            interface: iface.clone(),
            hw_backend: marks.backend(),
            hw_backend_reason: selected.reason,
            mark_delivery: opts.mark_delivery.name(),
            offloaded: marks.offloaded(),
            ..NodeView::default()
        };
        let published = Published::new(dp.stats_reader()?, view);
        published.set_marks(MarkSnapshot::of(&marks));
        let handle = NodeHandle::new(Core { dp, model, marks }, published);
        Ok(Self {
            opts,
            netlink,
            pins,
            handle,
            events: Some(events),
            entry: selected.entry,
            links: Vec::new(),
            pinned_maps: Vec::new(),
            next_hop_mac: None,
            owners,
        })
    }

    pub fn interface(&self) -> &str {
        &self.opts.interface
    }

    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// Applies a merged desired state as a diff. On error nothing checkable was changed and
    /// the last good state keeps serving; the error is published (`last_error`).
    pub async fn apply(&mut self, merged: &Merged) -> Result<ApplyReport> {
        let result = self.try_apply(merged).await;
        let published = self.handle.published();
        match &result {
            Ok(_) => {}
            Err(e) => {
                let e = format!("{e:#}");
                published.update(|v| v.last_error = Some(e));
            }
        }
        result
    }

    async fn try_apply(&mut self, merged: &Merged) -> Result<ApplyReport> {
        let desired = &merged.desired;
        let mac = self.next_hop_mac(desired).await?;
        let (report, vips, reals, snapshot) = {
            let mut core = self.handle.lock();
            let core = &mut *core;
            plan::check_capacity(&core.model, desired).map_err(anyhow::Error::msg)?;
            let report = apply::apply(&mut core.dp, &mut core.model, &mut core.marks, desired)?;
            core.marks.set_policy(&mut core.dp, desired.settings.marks);
            core.dp.set_config(&desired.lb_config(mac))?;
            let vips = view_vips(&core.model, desired);
            let reals = core.model.real_ids().map(|(a, id)| (*a, id)).collect();
            (report, vips, reals, MarkSnapshot::of(&core.marks))
        };
        self.next_hop_mac = Some(mac);
        self.record_owners(&vips);
        let published = self.handle.published();
        published.set_marks(snapshot);
        published.update(|v| {
            v.vips = vips;
            v.reals = reals;
            v.applied = true;
            v.last_error = None;
            v.owners = merged.owners.clone();
        });
        Ok(report)
    }

    /// Writes the VIPs' owners to the pinned record (pinned again if its pin went). A
    /// failure only costs `status` the owners' names, so it is logged, not returned.
    fn record_owners(&self, vips: &[ViewVip]) {
        let Some(record) = &self.owners else { return };
        let owners: Vec<_> = vips
            .iter()
            .map(|v| (v.id.key(), v.owner.to_string()))
            .collect();
        let path = self.pins.owners();
        if let Err(e) = record.repin(&path).and_then(|()| record.write(&owners)) {
            tracing::warn!(error = %e, path = %path.display(), "writing the owner record");
        }
    }

    /// The MAC of the next hop: given, or resolved through the neighbour table. A state
    /// without VIPs forwards nothing and needs none.
    async fn next_hop_mac(&self, desired: &Desired) -> Result<[u8; 6]> {
        let hop = desired.settings.next_hop;
        if let Some(mac) = hop.mac {
            return Ok(mac);
        }
        if desired.vips.is_empty() {
            return Ok(self.next_hop_mac.unwrap_or_default());
        }
        self.netlink
            .resolve_next_hop(&self.opts.interface, hop.address)
            .await
    }

    /// Attaches the datapath to the interface (or swaps the new program into a pinned
    /// link), keeping the agent's own hold on the link.
    pub async fn attach(&mut self) -> Result<()> {
        // The mode an adopted XDP link is in: an explicit --xdp-mode other than it re-attaches.
        let current_mode = match self.entry {
            Entry::Xdp(_) if self.pins.link().exists() => self
                .netlink
                .xdp_attachment(&self.opts.interface)
                .await
                .ok()
                .flatten()
                .map(|x| x.mode),
            _ => None,
        };
        let (mut attached, links, maps) = {
            let mut core = self.handle.lock();
            let dp = &mut core.dp;
            let iface = &self.opts.interface;
            match self.entry {
                Entry::Xdp(entry) => {
                    let (attached, link) = attach::attach(
                        dp,
                        entry,
                        iface,
                        &self.pins,
                        self.opts.xdp_mode,
                        current_mode,
                    )?;
                    let links = vec![(self.pins.link(), link)];
                    (attached, links, attach::pinned_maps(&self.pins)?)
                }
                Entry::Tc { nic } => {
                    let (attached, links) = tc_attach::attach_tc(dp, nic, iface, &self.pins)?;
                    (attached, links, attach::pinned_maps(&self.pins)?)
                }
            }
        };
        self.pinned_maps = maps;
        if matches!(self.entry, Entry::Xdp(_))
            && let Ok(Some(x)) = self.netlink.xdp_attachment(&self.opts.interface).await
        {
            attached.mode = x.mode.to_string();
        }
        let view = self.handle.published().view();
        tracing::info!(
            iface = self.opts.interface,
            mode = attached.mode,
            prog_id = attached.prog_id,
            adopted = attached.adopted,
            hw_backend = view.hw_backend,
            node = self.opts.node_name.as_deref().unwrap_or(""),
            "datapath attached"
        );
        self.links = links;
        self.handle
            .published()
            .update(|v| v.attached = Some(attached));
        Ok(())
    }

    /// Hands out the new-flow event reader for [`consume_events`] (once).
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.events.take()
    }

    /// Periodic upkeep (about once a second): ages idle marks, and pins the datapath again
    /// if its pins went missing.
    pub fn tick(&mut self) {
        let snapshot = {
            let mut core = self.handle.lock();
            let core = &mut *core;
            if let Err(e) = core.marks.age(&mut core.dp) {
                tracing::warn!(error = %e, "aging flow marks failed");
            }
            MarkSnapshot::of(&core.marks)
        };
        self.handle.published().set_marks(snapshot);
        self.keep_pinned();
    }

    /// Puts back pins that vanished (bpffs unmounted, files removed), so a restarted agent
    /// can still adopt the datapath; says loudly, once per problem, when it cannot.
    fn keep_pinned(&mut self) {
        if self.links.is_empty() || attach::pinned(&self.pins, &self.links, &self.pinned_maps) {
            return;
        }
        let problem = match attach::repin(
            &self.links,
            &self.pinned_maps,
            &self.opts.bpffs,
            &self.pins,
        ) {
            Ok(again) => {
                if again.is_empty() {
                    return;
                }
                tracing::warn!(
                    pins = %self.pins.dir.display(),
                    pinned = again.join(", "),
                    "the datapath's pins had vanished (bpffs unmounted or files removed); pinned again"
                );
                None
            }
            Err(e) => Some(format!(
                "the datapath is not pinned at {} and pinning it again failed: {e:#}; it keeps \
                 serving while this agent runs, but a restarted agent could not adopt it",
                self.pins.dir.display()
            )),
        };
        let published = self.handle.published();
        if published.view().pin_problem != problem {
            if let Some(p) = &problem {
                tracing::error!("{p}");
            }
            published.update(|v| v.pin_problem = problem);
        }
    }

    /// Stops the engine: with `remove`, detaches the datapath and removes its pins; else
    /// leaves it serving (pinned) for the next agent.
    pub fn finish(mut self, remove: bool) -> Result<()> {
        let iface = self.opts.interface.clone();
        if remove {
            for (_, link) in self.links.drain(..) {
                link.detach().context("detaching the datapath's link")?;
            }
            attach::remove_pins(&self.pins)?;
            tracing::info!(iface, "datapath removed");
        } else if self.pins.exists() {
            tracing::info!(iface, "exiting; the datapath keeps serving (pinned)");
        } else {
            tracing::error!(
                iface,
                "exiting without pins: the datapath goes with this agent"
            );
        }
        Ok(())
    }
}

/// The programmed VIPs of `desired`, with their owners and statistics slots.
pub(crate) fn view_vips(model: &DatapathModel, desired: &Desired) -> Vec<ViewVip> {
    desired
        .vips
        .iter()
        .filter_map(|(id, p)| {
            Some(ViewVip {
                id: *id,
                label: p.label.clone(),
                owner: p.owner.clone(),
                stats_id: model.vip_stats_id(id)?,
                reals: p.backends.iter().map(|b| b.addr).collect(),
            })
        })
        .collect()
}

/// Reports GRO/LRO (they merge packets the encapsulation must not see) and turns them off
/// when asked.
fn check_rx_offloads(iface: &str, disable: bool) -> Result<()> {
    match rx_offloads::read(iface) {
        Ok(o) if o.gro || o.lro => {
            if disable {
                rx_offloads::disable(iface)
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
    Ok(())
}
