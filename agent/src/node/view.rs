//! What the node engine publishes for readers that must never wait for it: `/metrics`,
//! `/readyz`, status reports.
//!
//! The engine's lock (datapath, model, marks) is the one the new-flow event consumer needs;
//! a reader that took it would delay marks by however long it reads. So the engine publishes
//! a [`NodeView`] (what is programmed, replaced whole after every change) and a
//! [`MarkSnapshot`] (mark counters, after every event batch), and readers take those plus
//! their own handle on the statistics maps ([`StatsReader`]): no reader holds the engine's
//! lock, and no reader makes a syscall under any lock the consumer needs.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
};

use crate::{
    attach::Attached,
    datapath::StatsReader,
    desired::{Owner, OwnerVerdict},
    marks::{MarkManager, MarkStats},
    vip::VipId,
};

/// One programmed VIP, for metrics and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewVip {
    pub id: VipId,
    pub label: String,
    pub owner: Owner,
    /// The VIP's statistics slot.
    pub stats_id: u32,
    /// Backend addresses.
    pub reals: Vec<IpAddr>,
}

/// What the node serves, as of the last change.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub interface: String,
    pub attached: Option<Attached>,
    pub hw_backend: &'static str,
    pub hw_backend_reason: String,
    /// `xdp-metadata` or `skb-mark` (empty before the engine opens).
    pub mark_delivery: &'static str,
    /// Whether marks really reach packets (a NIC or the emulated NIC).
    pub offloaded: bool,
    pub vips: Vec<ViewVip>,
    /// Programmed reals: address and slot.
    pub reals: Vec<(IpAddr, u32)>,
    /// A desired state has been applied (the datapath serves a known configuration).
    pub applied: bool,
    /// Why the last desired state was not applied, if it was not.
    pub last_error: Option<String>,
    pub owners: BTreeMap<Owner, OwnerVerdict>,
    /// Why the datapath is not pinned (a restarted agent could not adopt it), if it is not.
    pub pin_problem: Option<String>,
}

/// Mark counters, as of the last event batch, aging round or apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MarkSnapshot {
    pub stats: MarkStats,
    pub in_use: usize,
    pub capacity: u32,
    pub rules: usize,
}

impl MarkSnapshot {
    pub fn of(m: &MarkManager) -> Self {
        Self {
            stats: m.stats.clone(),
            in_use: m.in_use(),
            capacity: m.capacity(),
            rules: m.rules(),
        }
    }
}

/// The published state; shared by the engine (writer) and its readers.
pub struct Published {
    stats: StatsReader,
    view: RwLock<Arc<NodeView>>,
    marks: Mutex<MarkSnapshot>,
}

impl Published {
    pub fn new(stats: StatsReader, view: NodeView) -> Self {
        Self {
            stats,
            view: RwLock::new(Arc::new(view)),
            marks: Mutex::new(MarkSnapshot::default()),
        }
    }

    /// The current view (a cheap clone of a pointer).
    pub fn view(&self) -> Arc<NodeView> {
        self.view.read().expect("view lock").clone()
    }

    pub fn marks(&self) -> MarkSnapshot {
        self.marks.lock().expect("marks lock").clone()
    }

    pub fn stats(&self) -> &StatsReader {
        &self.stats
    }

    /// Replaces the view with `f` applied to a copy of it.
    pub fn update(&self, f: impl FnOnce(&mut NodeView)) {
        let mut guard = self.view.write().expect("view lock");
        let mut next = (**guard).clone();
        f(&mut next);
        *guard = Arc::new(next);
    }

    pub fn set_marks(&self, m: MarkSnapshot) {
        *self.marks.lock().expect("marks lock") = m;
    }
}
