//! The mellanox backend: hardware flow marks on Mellanox/NVIDIA ConnectX NICs (mlx5) through
//! the kernel's tc flower offload. One flower rule per marked flow on the device's clsact
//! ingress: exact 5-tuple, `skip_sw` (hardware only: the software path is marklb's own),
//! action `skbedit mark M` with marklb's owner cookie, which the kernel hands to the driver
//! as FLOW_ACTION_MARK and mlx5 programs as the flow tag (legacy/NIC eswitch mode, 16 bits).
//! The NIC delivers the tag in `skb->mark`, where the TC balancer (`--mark-delivery
//! skb-mark`) reads it.
//!
//! Rules live at chain 0, priority 1 (IPv4) or 2 (IPv6: one priority holds one protocol),
//! each with its own handle; a rule is deleted by (priority, handle). A starting backend
//! dumps those two priorities and adopts what a previous agent left ([`reconcile`]): rules
//! whose mark the pinned mark map still has stay (packets keep their fast path across a
//! restart), other rules with marklb's cookie go, rules without it are never touched.
//!
//! Installs are batched: between `begin_batch` and `end_batch` (one batch of new-flow
//! events) requests queue and go out up to [`MAX_BATCH`] per datagram; the kernel acks each.
//! A refused rule is counted by reason ([`counters`]); table full or unsupported starts a
//! backoff; the manager is told which flows failed, releases their marks, and those flows
//! stay on the software path.

mod adopt;
mod batch;
pub mod counters;
pub mod reconcile;

use std::{collections::HashMap, time::Instant};

use marklb_common::{FlowKey, words_addr};

pub use self::adopt::{Adoption, remove_rules};
use self::{
    batch::Pending,
    counters::{Backoff, Rejection, RuleCounts},
    reconcile::Owned,
};
use super::{HwBackend, HwBackendError, nic_probe::Capability};
use crate::{
    datapath::Datapath,
    tc::{
        TcError, TcSocket, TcTransport, dump,
        flower::{self, MAX_FLOW_TAG, Match, RuleId},
    },
};

const CHAIN: u32 = 0;
const PRIO_V4: u16 = 1;
const PRIO_V6: u16 = 2;
/// marklb's priorities on the device's ingress: (priority, IPv6).
const PRIOS: [(u16, bool); 2] = [(PRIO_V4, false), (PRIO_V6, true)];
const OWNED: Owned<'static> = Owned {
    chain: CHAIN,
    prios: &PRIOS,
};

/// Whether a flow key holds IPv6 addresses (IPv4 keeps words 1..3 zero). An IPv6 client
/// and VIP both ending in 96 zero bits would read as IPv4: neither occurs in practice.
fn is_v6(flow: &FlowKey) -> bool {
    flow.src_be[1..]
        .iter()
        .chain(&flow.dst_be[1..])
        .any(|w| *w != 0)
}

/// The rule's match for a flow.
pub fn flow_match(flow: &FlowKey) -> Match {
    let v6 = is_v6(flow);
    Match {
        src: words_addr(&flow.src_be, v6),
        dst: words_addr(&flow.dst_be, v6),
        proto: flow.proto,
        sport: u16::from_be(flow.sport_be),
        dport: u16::from_be(flow.dport_be),
    }
}

/// Whether the pinned mark map sends `mark` to a real that is still there (same
/// generation): the rule carrying it can be adopted.
pub fn mark_is_live(dp: &Datapath, mark: u32) -> bool {
    dp.mark(mark)
        .ok()
        .filter(|e| e.real_id != 0)
        .and_then(|e| {
            dp.real(e.real_id)
                .ok()
                .filter(|r| r.generation == e.real_gen && r.generation != 0)
        })
        .is_some()
}

/// The clock backoff is measured with (tests step their own).
pub type Clock = Box<dyn Fn() -> Instant + Send>;

pub struct Mellanox {
    ifindex: i32,
    link: Box<dyn TcTransport>,
    rules: HashMap<FlowKey, (RuleId, u32)>,
    by_handle: HashMap<(u16, u32), FlowKey>,
    free_handles: Vec<u32>,
    next_handle: u32,
    /// Between `begin_batch` and `end_batch`: installs queue here.
    batching: bool,
    pending: Vec<Pending>,
    /// Index of each queued flow in `pending` (a flow re-picked or removed before the
    /// batch goes out is found without a scan).
    pending_at: HashMap<FlowKey, usize>,
    /// Flows whose rule the device refused during the batch (reported by `end_batch`).
    failed: Vec<(FlowKey, HwBackendError)>,
    backoff: Backoff,
    clock: Clock,
    counts: RuleCounts,
}

impl Mellanox {
    /// The backend for `iface` if the device can offload mark rules; else why not. Makes sure
    /// the clsact qdisc is there and adopts the rules a previous agent left (`live`: the
    /// pinned mark map still has the mark).
    pub fn open(iface: &str, live: &dyn Fn(u32) -> bool) -> Result<(Self, Capability), String> {
        let cap = Capability::probe(iface).map_err(|e| format!("probing {iface}: {e}"))?;
        cap.check(iface)?;
        let ifindex = ifindex(iface).map_err(|e| format!("{iface}: {e}"))?;
        let mut sock = TcSocket::open().map_err(|e| format!("netlink: {e}"))?;
        let seq = sock.next_seq();
        match sock.request(seq, &flower::qdisc_clsact(seq, ifindex)) {
            Ok(()) => {}
            Err(TcError { errno, .. }) if errno == libc::EEXIST => {}
            Err(e) => return Err(format!("clsact qdisc on {iface}: {e}")),
        }
        let (nic, adoption) =
            Self::with_transport(Box::new(sock), ifindex, live, Box::new(Instant::now))
                .map_err(|e| format!("reading the flow rules on {iface}: {e}"))?;
        tracing::info!(
            iface,
            kept = adoption.kept,
            deleted = adoption.deleted,
            foreign = adoption.foreign,
            delete_failed = adoption.delete_failed,
            "flow rules a previous agent left"
        );
        Ok((nic, cap))
    }

    /// Backoff delays (tests use short ones).
    pub fn set_backoff(&mut self, backoff: Backoff) {
        self.backoff = backoff;
    }

    /// What happened to this backend's rule requests so far.
    pub fn counts(&self) -> &RuleCounts {
        &self.counts
    }

    /// Rules installed now (flow, rule, mark).
    pub fn installed(&self) -> impl Iterator<Item = (&FlowKey, &RuleId, u32)> {
        self.rules.iter().map(|(f, (id, m))| (f, id, *m))
    }

    fn handle(&mut self) -> u32 {
        self.free_handles.pop().unwrap_or_else(|| {
            self.next_handle += 1;
            self.next_handle - 1
        })
    }

    fn delete(&mut self, id: &RuleId) -> Result<(), HwBackendError> {
        let seq = self.link.next_seq();
        match self.link.request(seq, &flower::delete_rule(seq, id)) {
            Ok(()) => {}
            Err(TcError { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(HwBackendError::Device(format!("deleting rule: {e}"))),
        }
        self.by_handle.remove(&(id.prio, id.handle));
        self.free_handles.push(id.handle);
        Ok(())
    }
}

fn ifindex(iface: &str) -> std::io::Result<i32> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i as i32)
}

impl HwBackend for Mellanox {
    fn name(&self) -> &'static str {
        "mellanox"
    }

    fn max_mark(&self) -> u32 {
        MAX_FLOW_TAG
    }

    fn install(&mut self, flow: &FlowKey, mark: u32) -> Result<(), HwBackendError> {
        if mark == 0 || mark > MAX_FLOW_TAG {
            return Err(HwBackendError::Device(format!(
                "mark {mark} does not fit the 16-bit mlx5 flow tag"
            )));
        }
        if self.backoff.active((self.clock)()) {
            self.counts.rejected(Rejection::Backoff);
            return Err(HwBackendError::Device(format!(
                "flower rule not sent: backing off after the NIC refused rules (next delay {:?})",
                self.backoff.next_delay()
            )));
        }
        self.remove(flow)?;
        self.queue(flow, mark)
    }

    fn remove(&mut self, flow: &FlowKey) -> Result<(), HwBackendError> {
        if let Some(i) = self.pending_at.remove(flow) {
            // Not sent yet: drop it from the queue (the last one takes its place).
            let p = self.pending.swap_remove(i);
            if let Some(moved) = self.pending.get(i) {
                self.pending_at.insert(moved.flow, i);
            }
            self.free_handles.push(p.id.handle);
            return Ok(());
        }
        match self.rules.remove(flow) {
            Some((id, _)) => self.delete(&id),
            None => Ok(()),
        }
    }

    fn begin_batch(&mut self) {
        self.batching = true;
    }

    fn end_batch(&mut self) -> Vec<(FlowKey, HwBackendError)> {
        self.batching = false;
        self.flush();
        std::mem::take(&mut self.failed)
    }

    /// Packets each rule matched in hardware: a dump of marklb's priorities, the skbedit
    /// action's statistics of each rule this backend installed.
    fn hits(&mut self) -> Result<HashMap<FlowKey, u64>, HwBackendError> {
        let filters = adopt::dump_owned_priorities(self.link.as_mut(), self.ifindex)
            .map_err(|e| HwBackendError::Device(format!("dumping rules: {e}")))?;
        let mut out = HashMap::new();
        for f in filters.iter().filter(|f| f.owned) {
            if let Some(flow) = self.by_handle.get(&(f.prio, f.handle)) {
                out.insert(*flow, f.packets);
            }
        }
        Ok(out)
    }

    fn rules(&mut self) -> Result<Vec<(FlowKey, u32)>, HwBackendError> {
        Ok(self.rules.iter().map(|(f, (_, m))| (*f, *m)).collect())
    }
}

/// (priority, handle, packets) of a flower filter in a dump message.
pub fn rule_stats(bytes: &[u8]) -> Option<(u16, u32, u64)> {
    let f = dump::parse_filter(bytes).ok()?;
    Some((f.prio, f.handle, f.packets))
}
