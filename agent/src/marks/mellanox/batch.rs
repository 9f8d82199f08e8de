//! Installs: rules queue between `begin_batch` and `end_batch` and go out [`MAX_BATCH`] per
//! datagram; each request's ack decides its rule (installed, or refused by reason, with
//! backoff); a datagram without a complete answer is undone rule by rule.

use std::time::Instant;

use marklb_common::FlowKey;

use super::{CHAIN, Mellanox, PRIO_V4, PRIO_V6, counters::Rejection, flow_match, is_v6};
use crate::{
    marks::HwBackendError,
    tc::{
        MAX_BATCH, TcError,
        flower::{self, RuleId},
    },
};

/// A rule sent (or about to be) and not yet acknowledged.
pub(super) struct Pending {
    pub(super) flow: FlowKey,
    pub(super) id: RuleId,
    mark: u32,
    seq: u32,
    msg: Vec<u8>,
}

impl Mellanox {
    /// Sends the queued installs, [`MAX_BATCH`] per datagram, and records each outcome.
    pub(super) fn flush(&mut self) {
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
    pub(super) fn queue(&mut self, flow: &FlowKey, mark: u32) -> Result<(), HwBackendError> {
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
