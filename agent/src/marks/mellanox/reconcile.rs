//! What a starting backend does with the flower rules it finds in its priorities: keep the
//! ones a previous agent installed whose mark the pinned mark map still sends somewhere,
//! delete the other ones marklb owns, and never touch a rule it does not own (no owner
//! cookie): those belong to someone else, whatever priority they sit in.
//!
//! Pure: the decisions are tested with dump messages built as the kernel sends them.

use std::collections::HashSet;

use marklb_common::{FlowKey, addr_words};

use crate::tc::{
    dump::DumpedFilter,
    flower::{MAX_FLOW_TAG, Match},
};

/// What to do with one dumped filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours and still valid: adopt it (its flow, its mark).
    Keep,
    /// Ours but not to be kept; why.
    Delete(&'static str),
    /// Not ours: left alone.
    Foreign,
}

/// Where marklb's rules live: chain and (priority, IPv6) pairs.
#[derive(Clone, Copy, Debug)]
pub struct Owned<'a> {
    pub chain: u32,
    pub prios: &'a [(u16, bool)],
}

/// The flow key a rule's match stands for (the inverse of `flow_match`).
pub fn flow_key(m: &Match) -> FlowKey {
    FlowKey {
        src_be: addr_words(m.src),
        dst_be: addr_words(m.dst),
        sport_be: m.sport.to_be(),
        dport_be: m.dport.to_be(),
        proto: m.proto,
        _pad: [0; 3],
    }
}

/// One verdict per filter, in order. `live(mark)`: the pinned mark map still sends packets
/// carrying `mark` to a real that is there (same generation).
pub fn reconcile(
    filters: &[DumpedFilter],
    owned: Owned<'_>,
    live: impl Fn(u32) -> bool,
) -> Vec<Verdict> {
    let mut seen = HashSet::new();
    filters
        .iter()
        .map(|f| {
            let ours_where = f.chain == owned.chain
                && owned.prios.contains(&(f.prio, f.v6))
                && f.kind == "flower";
            if !(ours_where && f.owned) {
                return Verdict::Foreign;
            }
            let Some(m) = f.matched else {
                return Verdict::Delete("not an exact 5-tuple match");
            };
            if m.src.is_ipv6() != f.v6 {
                return Verdict::Delete("address family differs from the filter's protocol");
            }
            let Some(mark) = f.mark.filter(|m| (1..=MAX_FLOW_TAG).contains(m)) else {
                return Verdict::Delete("no 16-bit mark action");
            };
            if !live(mark) {
                return Verdict::Delete("the pinned mark map no longer has its mark");
            }
            if !seen.insert(flow_key(&m)) {
                return Verdict::Delete("a second rule for the same flow");
            }
            Verdict::Keep
        })
        .collect()
}
