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

pub mod counters;
pub mod reconcile;

use std::{collections::HashMap, time::Instant};

use marklb_common::{FlowKey, words_addr};

use self::{
    counters::{Backoff, Rejection, RuleCounts},
    reconcile::{Owned, Verdict, flow_key, reconcile},
};
use super::{HwBackend, HwBackendError, nic_probe::Capability};
use crate::{
    datapath::Datapath,
    tc::{
        MAX_BATCH, TcError, TcSocket, TcTransport,
        dump::{self, DumpedFilter},
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

/// What a starting backend found in its priorities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Rules adopted (their marks are live in the pinned map).
    pub kept: usize,
    /// marklb's rules deleted (stale mark, malformed, duplicate).
    pub deleted: usize,
    /// Rules without marklb's cookie, left alone.
    pub foreign: usize,
    /// Deletions the kernel refused (logged; the rule stays, its mark is not reused).
    pub delete_failed: usize,
}

/// A rule sent (or about to be) and not yet acknowledged.
struct Pending {
    flow: FlowKey,
    id: RuleId,
    mark: u32,
    seq: u32,
    msg: Vec<u8>,
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

    /// The backend over any transport: dumps marklb's priorities, keeps what [`reconcile`]
    /// keeps, deletes what it deletes.
    pub fn with_transport(
        mut link: Box<dyn TcTransport>,
        ifindex: i32,
        live: &dyn Fn(u32) -> bool,
        clock: Clock,
    ) -> Result<(Self, Adoption), TcError> {
        let filters = dump_owned_priorities(link.as_mut(), ifindex)?;
        let verdicts = reconcile(&filters, OWNED, live);
        let mut nic = Self {
            ifindex,
            link,
            rules: HashMap::new(),
            by_handle: HashMap::new(),
            free_handles: Vec::new(),
            next_handle: 1,
            batching: false,
            pending: Vec::new(),
            pending_at: HashMap::new(),
            failed: Vec::new(),
            backoff: Backoff::default(),
            clock,
            counts: RuleCounts::default(),
        };
        let mut adoption = Adoption::default();
        for (f, v) in filters.iter().zip(verdicts) {
            let id = RuleId {
                ifindex,
                chain: f.chain,
                prio: f.prio,
                handle: f.handle,
                v6: f.v6,
            };
            match v {
                Verdict::Foreign => adoption.foreign += 1,
                Verdict::Keep => {
                    let (m, mark) = (f.matched.expect("kept"), f.mark.expect("kept"));
                    let flow = flow_key(&m);
                    nic.by_handle.insert((id.prio, id.handle), flow);
                    nic.rules.insert(flow, (id, mark));
                    adoption.kept += 1;
                }
                Verdict::Delete(why) => {
                    let seq = nic.link.next_seq();
                    match nic.link.request(seq, &flower::delete_rule(seq, &id)) {
                        Ok(()) => adoption.deleted += 1,
                        Err(TcError { errno, .. }) if errno == libc::ENOENT => {
                            adoption.deleted += 1
                        }
                        Err(e) => {
                            tracing::warn!(prio = id.prio, handle = id.handle, reason = why, error = %e, "could not delete a stale flow rule");
                            adoption.delete_failed += 1;
                        }
                    }
                }
            }
            // Handles of every filter in our priorities stay taken (a foreign filter or a
            // rule we failed to delete must not collide with a new one).
            if OWNED.prios.contains(&(f.prio, f.v6)) && f.chain == CHAIN {
                nic.next_handle = nic.next_handle.max(f.handle.saturating_add(1));
            }
        }
        Ok((nic, adoption))
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

    /// Sends the queued installs, [`MAX_BATCH`] per datagram, and records each outcome.
    fn flush(&mut self) {
        self.pending_at.clear();
        let pending = std::mem::take(&mut self.pending);
        let mut chunks = pending.into_iter().peekable();
        while chunks.peek().is_some() {
            let chunk: Vec<Pending> = chunks.by_ref().take(MAX_BATCH).collect();
            if self.backoff.active((self.clock)()) {
                // An earlier datagram of this flush was refused: do not send the rest.
                for p in chunk {
                    self.refuse(p, Rejection::Backoff, "backing off".into());
                }
                continue;
            }
            self.send_chunk(chunk);
        }
    }

    fn send_chunk(&mut self, chunk: Vec<Pending>) {
        let msgs: Vec<(u32, Vec<u8>)> = chunk.iter().map(|p| (p.seq, p.msg.clone())).collect();
        let sent = Instant::now();
        let outcome = self.link.batch(&msgs);
        let round_trip = sent.elapsed();
        self.counts.batches += 1;
        match outcome {
            Ok(results) => {
                let mut ok = 0;
                for (p, r) in chunk.into_iter().zip(results) {
                    match r {
                        Ok(()) => {
                            self.commit(p);
                            ok += 1;
                        }
                        Err(e) => {
                            let why = Rejection::of_errno(e.errno);
                            if why.backs_off() {
                                self.backoff.failed((self.clock)());
                            }
                            self.refuse(p, why, e.to_string());
                        }
                    }
                }
                if ok > 0 {
                    self.counts.installed(ok, round_trip);
                    if !self.backoff.active((self.clock)()) {
                        self.backoff.succeeded();
                    }
                }
            }
            Err(e) => {
                // No (complete) answer: any of these rules may be in the device. Delete
                // each to be sure; one that cannot be deleted is kept as installed, so its
                // mark is not handed to another flow while the device may still set it.
                tracing::warn!(error = %e, rules = chunk.len(), "a batch of flow rules got no complete answer");
                for p in chunk {
                    self.counts.unknown += 1;
                    let seq = self.link.next_seq();
                    match self.link.request(seq, &flower::delete_rule(seq, &p.id)) {
                        Ok(()) => self.refuse(p, Rejection::Other, e.to_string()),
                        Err(TcError { errno, .. }) if errno == libc::ENOENT => {
                            self.refuse(p, Rejection::Other, e.to_string())
                        }
                        Err(_) => self.commit(p),
                    }
                }
            }
        }
    }

    fn commit(&mut self, p: Pending) {
        self.by_handle.insert((p.id.prio, p.id.handle), p.flow);
        self.rules.insert(p.flow, (p.id, p.mark));
    }

    fn refuse(&mut self, p: Pending, why: Rejection, text: String) {
        self.free_handles.push(p.id.handle);
        self.counts.rejected(why);
        let err = match why {
            Rejection::TableFull => HwBackendError::Full,
            _ => HwBackendError::Device(format!("flower rule {}: {text}", why.label())),
        };
        self.failed.push((p.flow, err));
    }

    /// Queues the rule for `flow`; sends at once unless batching.
    fn queue(&mut self, flow: &FlowKey, mark: u32) -> Result<(), HwBackendError> {
        let v6 = is_v6(flow);
        let id = RuleId {
            ifindex: self.ifindex,
            chain: CHAIN,
            prio: if v6 { PRIO_V6 } else { PRIO_V4 },
            handle: self.handle(),
            v6,
        };
        let seq = self.link.next_seq();
        let msg = match flower::add_rule(seq, &id, &flow_match(flow), mark) {
            Ok(m) => m,
            Err(e) => {
                self.free_handles.push(id.handle);
                self.counts.rejected(Rejection::Other);
                return Err(HwBackendError::Device(e.to_string()));
            }
        };
        self.pending_at.insert(*flow, self.pending.len());
        self.pending.push(Pending {
            flow: *flow,
            id,
            mark,
            seq,
            msg,
        });
        if self.batching {
            if self.pending.len() >= MAX_BATCH {
                self.flush();
            }
            return Ok(());
        }
        self.flush();
        match self.failed.pop() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// Every filter in marklb's priorities (one dump per priority, chain 0).
fn dump_owned_priorities(
    link: &mut dyn TcTransport,
    ifindex: i32,
) -> Result<Vec<DumpedFilter>, TcError> {
    let mut out = Vec::new();
    for (prio, v6) in PRIOS {
        let seq = link.next_seq();
        let msgs = match link.dump(seq, &flower::dump_priority(seq, ifindex, CHAIN, prio, v6)) {
            Ok(m) => m,
            // No filter chain there yet.
            Err(TcError { errno, .. }) if errno == libc::ENOENT || errno == libc::EINVAL => {
                continue;
            }
            Err(e) => return Err(e),
        };
        for m in msgs {
            match dump::parse_filter(&m) {
                Ok(f) => out.push(f),
                // A message netlink-packet-route cannot read is left alone (not ours to
                // judge), but said; its handle stays taken.
                Err(e) => {
                    tracing::warn!(prio, error = %e, "unreadable filter in a dump");
                    out.extend(
                        DumpedFilter::unreadable(&m).map(|f| DumpedFilter { chain: CHAIN, ..f }),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// `marklb-agent cleanup`: on an mlx5 device, removes the flow rules marklb installed (its
/// cookie, its priorities; nothing else, nothing on any other device). Returns how many.
pub fn remove_rules(iface: &str) -> Result<usize, String> {
    let Ok(cap) = Capability::probe(iface) else {
        return Ok(0);
    };
    if cap.driver != super::nic_probe::MLX5_DRIVER {
        return Ok(0);
    }
    let ifindex = ifindex(iface).map_err(|e| format!("{iface}: {e}"))?;
    let sock = TcSocket::open().map_err(|e| format!("netlink: {e}"))?;
    let (_, adoption) =
        Mellanox::with_transport(Box::new(sock), ifindex, &|_| false, Box::new(Instant::now))
            .map_err(|e| format!("{iface}: {e}"))?;
    if adoption.delete_failed > 0 {
        return Err(format!(
            "{iface}: {} of marklb's flow rules could not be deleted",
            adoption.delete_failed
        ));
    }
    Ok(adoption.deleted)
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
        let filters = dump_owned_priorities(self.link.as_mut(), self.ifindex)
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
