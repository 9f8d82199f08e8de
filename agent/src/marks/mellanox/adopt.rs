//! A starting backend: what it finds in marklb's priorities (one dump each), what
//! [`reconcile`] decides about each filter, and the deletions that follow; `cleanup` is the
//! same with no mark live.

use std::{collections::HashMap, time::Instant};

use super::{
    CHAIN, Clock, Mellanox, OWNED, PRIOS,
    counters::{Backoff, RuleCounts},
    ifindex,
    reconcile::{Verdict, flow_key, reconcile},
};
use crate::{
    marks::nic_probe::{Capability, MLX5_DRIVER},
    tc::{
        TcError, TcSocket, TcTransport,
        dump::{self, DumpedFilter},
        flower::{self, RuleId},
    },
};

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

impl Mellanox {
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
}

/// Every filter in marklb's priorities (one dump per priority, chain 0).
pub(super) fn dump_owned_priorities(
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
    if cap.driver != MLX5_DRIVER {
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
