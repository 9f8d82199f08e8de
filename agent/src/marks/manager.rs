//! The mark manager: turns new-flow events into marks and NIC rules, ages idle ones, and
//! invalidates marks of reals that leave.
//!
//! Ordering that keeps packets correct at every step:
//! - install: allocate a mark, write `MARKS[mark]`, and only then install the NIC rule, so
//!   no packet carries a mark the datapath does not know;
//! - remove (idle): remove the NIC rule, then clear `MARKS[mark]` and free the mark;
//! - a real leaves: clear `MARKS[mark]` first (its packets fall back to the normal path at
//!   once), then remove the rules; the caller retires the real afterwards.
//!
//! Which flows earn a mark is decided before an event arrives: the datapath raises a flow's
//! event only once it has shown it is real (TCP: the first packet after the SYN; UDP: a few
//! packets; see `marklb_common::event_due`). When marks run out, the idlest flows give way
//! to the flow that just earned one ([`MarkManager::make_room`]).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use marklb_common::{FlowKey, MAX_MARKS, MarkEntry, NewFlowEvent};
use marklb_crds::loadbalancer::MarkScope;

use super::{HwBackend, HwBackendError};
use crate::{datapath::Datapath, desired::MarkPolicy};

/// Where a mark sends packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Target {
    real_id: u32,
    real_gen: u32,
    vip_id: u32,
}

#[derive(Clone, Debug)]
struct FlowRule {
    mark: u32,
    target: Target,
    hits: u64,
    last_active: Instant,
}

#[derive(Clone, Debug)]
struct MarkUse {
    target: Target,
    /// Flows whose rule carries this mark (1 for per-flow marks).
    flows: u32,
}

/// Counters the metrics expose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MarkStats {
    pub installed: u64,
    pub install_failures: u64,
    /// Events for flows that had no free mark.
    pub capacity_exhausted: u64,
    /// Events naming a real that has since left.
    pub stale_events: u64,
    pub aged_out: u64,
    pub invalidated: u64,
    /// Idle flows whose marks went to flows that earned one while none was free.
    pub evicted: u64,
}

/// Evictions one event may cause at most (per-real marks are shared: freeing one may take
/// several idle flows; a bound keeps one event from emptying the table).
const MAX_EVICTIONS_PER_EVENT: usize = 16;

pub struct MarkManager {
    policy: MarkPolicy,
    nic: Box<dyn HwBackend>,
    free: Vec<u32>,
    marks: HashMap<u32, MarkUse>,
    flows: HashMap<FlowKey, FlowRule>,
    /// Per-real scope: the mark of each (VIP, real).
    by_target: HashMap<Target, u32>,
    /// Flows whose rules matched no packet between the last two aging samples, with their
    /// `last_active`, idlest at the end: who gives way when marks run short. Rebuilt by
    /// every [`MarkManager::age`]; an entry whose flow went or was seen since is skipped.
    evictable: Vec<(FlowKey, Instant)>,
    /// When [`MarkManager::age`] last sampled the rules' hits.
    last_sample: Option<Instant>,
    pub stats: MarkStats,
}

impl MarkManager {
    pub fn new(nic: Box<dyn HwBackend>, policy: MarkPolicy) -> Self {
        let mut m = Self {
            policy,
            nic,
            free: Vec::new(),
            marks: HashMap::new(),
            flows: HashMap::new(),
            by_target: HashMap::new(),
            evictable: Vec::new(),
            last_sample: None,
            stats: MarkStats::default(),
        };
        m.reset_free_list();
        m
    }

    fn limit(&self) -> u32 {
        if self.policy.scope == MarkScope::Disabled {
            return 0;
        }
        self.policy
            .capacity
            .min(self.nic.max_mark())
            .min(MAX_MARKS - 1)
    }

    fn reset_free_list(&mut self) {
        let limit = self.limit();
        self.free = (1..=limit)
            .rev()
            .filter(|m| !self.marks.contains_key(m))
            .collect();
    }

    pub fn backend(&self) -> &'static str {
        self.nic.name()
    }

    /// Whether installed marks really reach packets (a NIC or the emulated NIC).
    pub fn offloaded(&self) -> bool {
        self.nic.offloaded()
    }

    pub fn capacity(&self) -> u32 {
        self.limit()
    }

    pub fn in_use(&self) -> usize {
        self.marks.len()
    }

    pub fn rules(&self) -> usize {
        self.flows.len()
    }

    /// Marks in use per VIP stats slot (status attributes marks to their LoadBalancer).
    pub fn in_use_by_vip(&self) -> HashMap<u32, u32> {
        let mut by_vip = HashMap::new();
        for u in self.marks.values() {
            *by_vip.entry(u.target.vip_id).or_insert(0) += 1;
        }
        by_vip
    }

    pub fn policy(&self) -> MarkPolicy {
        self.policy
    }

    /// Applies a new policy; a different scope or a smaller capacity starts over.
    pub fn set_policy(&mut self, dp: &mut Datapath, policy: MarkPolicy) {
        let restart = policy.scope != self.policy.scope || policy.capacity < self.policy.capacity;
        if restart {
            self.flush(dp);
        }
        self.policy = policy;
        self.reset_free_list();
    }

    /// Removes every rule and mark.
    pub fn flush(&mut self, dp: &mut Datapath) {
        let flows: Vec<FlowKey> = self.flows.keys().copied().collect();
        for f in flows {
            self.remove_flow(dp, &f);
        }
        self.reset_free_list();
    }

    /// Handles one new-flow event; returns the time from the packet to the installed rule.
    pub fn on_event(&mut self, dp: &mut Datapath, ev: &NewFlowEvent) -> Option<Duration> {
        if self.limit() == 0 {
            return None;
        }
        let target = Target {
            real_id: ev.real_id,
            real_gen: ev.real_gen,
            vip_id: ev.vip_id,
        };
        match dp.real(ev.real_id) {
            Ok(r) if r.generation == ev.real_gen && r.generation != 0 => {}
            _ => {
                self.stats.stale_events += 1;
                return None;
            }
        }
        if let Some(rule) = self.flows.get(&ev.flow) {
            if rule.target == target {
                // Duplicate: another CPU, or the datapath raising the event again because
                // packets still took the normal path before the rule was in place.
                return None;
            }
            // The flow was re-picked (a new connection reusing the 5-tuple): start it over.
            let flow = ev.flow;
            self.remove_flow(dp, &flow);
        }
        let mark = match self.mark_for(dp, target) {
            Some(m) => m,
            None => match self
                .make_room(dp)
                .then(|| self.mark_for(dp, target))
                .flatten()
            {
                Some(m) => m,
                None => {
                    self.stats.capacity_exhausted += 1;
                    return None;
                }
            },
        };
        match self.nic.install(&ev.flow, mark) {
            Ok(()) => {
                self.marks.get_mut(&mark).expect("mark allocated").flows += 1;
                self.flows.insert(
                    ev.flow,
                    FlowRule {
                        mark,
                        target,
                        hits: 0,
                        last_active: Instant::now(),
                    },
                );
                self.stats.installed += 1;
                Some(since_monotonic(ev.ts_ns))
            }
            Err(e) => {
                tracing::debug!(error = %e, "NIC rule install failed");
                self.stats.install_failures += 1;
                self.release_mark(dp, mark);
                None
            }
        }
    }

    /// A mark for `target`: a fresh one per flow, or the target's shared one per real.
    /// The mark map entry is written before any rule can carry the mark.
    fn mark_for(&mut self, dp: &mut Datapath, target: Target) -> Option<u32> {
        let shared = self
            .by_target
            .get(&target)
            .filter(|_| self.policy.scope == MarkScope::PerReal);
        if let Some(&m) = shared {
            return Some(m);
        }
        let mark = self.free.pop()?;
        let entry = MarkEntry {
            real_id: target.real_id,
            real_gen: target.real_gen,
            vip_id: target.vip_id,
            _pad: 0,
        };
        if let Err(e) = dp.set_mark(mark, &entry) {
            tracing::warn!(error = %e, mark, "writing the mark map failed");
            self.free.push(mark);
            return None;
        }
        self.marks.insert(mark, MarkUse { target, flows: 0 });
        if self.policy.scope == MarkScope::PerReal {
            self.by_target.insert(target, mark);
        }
        Some(mark)
    }

    /// No mark is free: the idlest flows give their marks up (up to
    /// [`MAX_EVICTIONS_PER_EVENT`]) until one is. True if one is free now.
    ///
    /// Why the idlest: the flow asking has just proved itself (its event comes from packets
    /// on the normal path, after its handshake or threshold), while a rule that matched
    /// nothing over a whole aging period saves no work at all, and the longer a flow has
    /// been quiet the less likely it is to send again before it would age out anyway.
    /// Taking the newest instead would punish exactly the flows that just earned a mark.
    /// Flows seen in the last aging period (or installed during it) are never taken, so busy
    /// flows do not trade marks back and forth; a flow that gave way and sends again earns
    /// a mark again (the datapath raises its event again after more packets).
    fn make_room(&mut self, dp: &mut Datapath) -> bool {
        let mut evicted = 0;
        while self.free.is_empty() && evicted < MAX_EVICTIONS_PER_EVENT {
            let Some((flow, since)) = self.evictable.pop() else {
                break;
            };
            if self.flows.get(&flow).is_none_or(|r| r.last_active != since) {
                continue; // gone, or active again since the sample
            }
            self.remove_flow(dp, &flow);
            evicted += 1;
        }
        self.stats.evicted += evicted as u64;
        !self.free.is_empty()
    }

    /// Drops a mark with no flows left: clear its map entry, then free it.
    fn release_mark(&mut self, dp: &mut Datapath, mark: u32) {
        let Some(u) = self.marks.get(&mark) else {
            return;
        };
        if u.flows > 0 {
            return;
        }
        let target = u.target;
        if let Err(e) = dp.clear_mark(mark) {
            tracing::warn!(error = %e, mark, "clearing the mark map failed");
        }
        self.marks.remove(&mark);
        if self.by_target.get(&target) == Some(&mark) {
            self.by_target.remove(&target);
        }
        if mark <= self.limit() {
            self.free.push(mark);
        }
    }

    /// Removes one flow's rule, then its mark if no other flow uses it.
    fn remove_flow(&mut self, dp: &mut Datapath, flow: &FlowKey) {
        let Some(rule) = self.flows.remove(flow) else {
            return;
        };
        if let Err(e) = self.nic.remove(flow) {
            tracing::warn!(error = %e, "removing a NIC rule failed");
        }
        if let Some(u) = self.marks.get_mut(&rule.mark) {
            u.flows = u.flows.saturating_sub(1);
        }
        self.release_mark(dp, rule.mark);
    }

    /// Removes rules whose flows saw no packet for the idle timeout, and notes those idle
    /// since the last sample (who gives way when marks run short). Returns how many went.
    pub fn age(&mut self, dp: &mut Datapath) -> Result<usize, HwBackendError> {
        let hits = self.nic.hits()?;
        let now = Instant::now();
        let mut idle = Vec::new();
        for (flow, rule) in self.flows.iter_mut() {
            let h = hits.get(flow).copied().unwrap_or(rule.hits);
            if h != rule.hits {
                rule.hits = h;
                rule.last_active = now;
            } else if now.duration_since(rule.last_active) >= self.policy.idle_timeout {
                idle.push(*flow);
            }
        }
        for f in &idle {
            self.remove_flow(dp, f);
        }
        self.stats.aged_out += idle.len() as u64;
        // Idle over a whole sampling period: no hit since before the previous sample (a rule
        // installed since then has not had a full period to show its packets).
        let evictable_before = self.last_sample.replace(now);
        self.evictable = match evictable_before {
            Some(prev) => self
                .flows
                .iter()
                .filter(|(_, r)| r.last_active <= prev)
                .map(|(f, r)| (*f, r.last_active))
                .collect(),
            None => Vec::new(),
        };
        // Idlest last: `make_room` pops them first.
        self.evictable
            .sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
        Ok(idle.len())
    }

    /// A real is leaving: its marks stop sending packets to it now (map entries cleared
    /// first), then its rules and marks go.
    pub fn invalidate_real(&mut self, dp: &mut Datapath, real_id: u32) {
        self.invalidate_where(dp, |t| t.real_id == real_id);
    }

    /// A VIP went away: the marks of its flows go.
    pub fn invalidate_vip(&mut self, dp: &mut Datapath, vip_id: u32) {
        self.invalidate_where(dp, |t| t.vip_id == vip_id);
    }

    /// A real left one VIP but still serves others: that VIP's marks to it go.
    pub fn invalidate_pair(&mut self, dp: &mut Datapath, vip_id: u32, real_id: u32) {
        self.invalidate_where(dp, |t| t.vip_id == vip_id && t.real_id == real_id);
    }

    fn invalidate_where(&mut self, dp: &mut Datapath, matches: impl Fn(&Target) -> bool) {
        let marks: std::collections::HashSet<u32> = self
            .marks
            .iter()
            .filter(|(_, u)| matches(&u.target))
            .map(|(m, _)| *m)
            .collect();
        if marks.is_empty() {
            return;
        }
        for m in &marks {
            if let Err(e) = dp.clear_mark(*m) {
                tracing::warn!(error = %e, mark = m, "clearing the mark map failed");
            }
        }
        let flows: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, r)| marks.contains(&r.mark))
            .map(|(f, _)| *f)
            .collect();
        for f in &flows {
            self.remove_flow(dp, f);
        }
        // Marks that had no flow left are released by remove_flow; any without flows too.
        for m in marks {
            self.release_mark(dp, m);
        }
        self.stats.invalidated += flows.len() as u64;
    }

    /// Rebuilds the state from what a previous agent left: the NIC's rules and the mark
    /// map. Rules whose mark is unknown or stale are removed.
    pub fn adopt(&mut self, dp: &mut Datapath) -> Result<usize, HwBackendError> {
        let rules = self.nic.rules()?;
        let now = Instant::now();
        let hits = self.nic.hits()?;
        let mut adopted = 0;
        for (flow, mark) in rules {
            let entry = dp.mark(mark).ok().filter(|e| e.real_id != 0);
            let live = entry.and_then(|e| {
                dp.real(e.real_id)
                    .ok()
                    .filter(|r| r.generation == e.real_gen && r.generation != 0)
                    .map(|_| e)
            });
            let Some(e) = live.filter(|_| mark <= self.limit()) else {
                let _ = self.nic.remove(&flow);
                continue;
            };
            let target = Target {
                real_id: e.real_id,
                real_gen: e.real_gen,
                vip_id: e.vip_id,
            };
            let u = self
                .marks
                .entry(mark)
                .or_insert(MarkUse { target, flows: 0 });
            u.flows += 1;
            if self.policy.scope == MarkScope::PerReal {
                self.by_target.insert(target, mark);
            }
            self.flows.insert(
                flow,
                FlowRule {
                    mark,
                    target,
                    hits: hits.get(&flow).copied().unwrap_or(0),
                    last_active: now,
                },
            );
            adopted += 1;
        }
        self.reset_free_list();
        Ok(adopted)
    }
}

/// Batches of new-flow events: the backend may send their rules together.
impl MarkManager {
    /// Rules of the events handled from here to [`end_batch`](Self::end_batch) may go to
    /// the NIC together.
    pub fn begin_batch(&mut self) {
        self.nic.begin_batch();
    }

    /// Sends the batch; a flow whose rule the NIC refused loses its mark again (no packet
    /// ever carried it) and stays on the software path. Returns how many were refused.
    pub fn end_batch(&mut self, dp: &mut Datapath) -> usize {
        let failed = self.nic.end_batch();
        for (flow, e) in &failed {
            tracing::debug!(error = %e, "NIC rule install failed");
            if self.flows.contains_key(flow) {
                self.remove_flow(dp, flow);
                self.stats.installed = self.stats.installed.saturating_sub(1);
                self.stats.install_failures += 1;
            }
        }
        failed.len()
    }
}

/// Time since a `bpf_ktime_get_ns` timestamp (CLOCK_MONOTONIC).
fn since_monotonic(ts_ns: u64) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    Duration::from_nanos(now.saturating_sub(ts_ns))
}
