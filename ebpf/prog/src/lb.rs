// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The normal path: parse, pick the real (`pick`), encapsulate; ICMP goes to `icmp`.

use marklb_common::{
    Counter, IPPROTO_TCP, LbConfig, TCP_EVENT_PACKETS, event_due, hash::flow_hash64,
};

use crate::hdr::{TCP_ACK, TCP_RST, TCP_SYN};
use crate::{
    encap::{self, Inner},
    events, icmp,
    parse::{self, Verdict, frame_len},
    pick::{Learn, established_packet, ring_pick, vip_lookup},
    pkt::{Action, Packet},
    stats::{account, count, drop, pass},
    vip_addrs::is_vip_addr,
};

/// The whole normal path for one packet.
#[inline(always)]
pub fn process(ctx: &impl Packet, cfg: &LbConfig) -> Action {
    let verdict = parse::parse(ctx, is_vip_addr);
    let p = match verdict {
        Verdict::Flow(p) => p,
        Verdict::Icmp(p) => return icmp::handle(ctx, cfg, &p),
        Verdict::Pass(c) => return pass(c),
        Verdict::Drop(c) => return drop(c),
    };
    let bytes = frame_len(ctx);
    // A SYN starts a new connection: the ring decides even if the 5-tuple was seen before.
    let syn = p.flow.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A reset earns nothing either: it ends the flow, and it is what the owners of spoofed
    // addresses answer to the SYN-ACKs of a flood (their second packet of the "flow").
    let earns = !syn && p.tcp_flags & TCP_RST == 0;
    // One hash for the connection table's set and the Maglev slot.
    let hash = flow_hash64(&p.flow);
    let known = if syn {
        None
    } else {
        established_packet(&p.flow, hash)
    };
    let pick = match known {
        Some(pick) => pick,
        None => {
            let Some(vip) = vip_lookup(&p.flow) else {
                return pass(Counter::PassNotVip);
            };
            let learn = if syn { Learn::Syn } else { Learn::Insert };
            match ring_pick(&p.flow, hash, vip, learn) {
                Ok(pick) => pick,
                Err(c) => return drop(c),
            }
        }
    };
    if p.ip_len + encap::overhead(pick.real) > cfg.mtu && !ctx.is_gso() {
        return icmp::too_big(ctx, cfg, &p, pick.real);
    }
    let inner = Inner {
        v6: p.v6,
        ip_len: p.ip_len,
        tos: p.tos,
        client_be: p.flow.src_be,
        sport_be: p.flow.sport_be,
    };
    match encap::encapsulate(ctx, cfg, pick.real, &inner) {
        Ok(action) => {
            account(pick.vip_id, pick.real_id, bytes);
            count(if pick.new {
                Counter::NewFlow
            } else {
                Counter::ConnHit
            });
            // The flow earns a mark by its packets, not by its first one (see
            // `marklb_common::event_due`): TCP after the SYN, UDP after a threshold.
            let threshold = if p.flow.proto == IPPROTO_TCP {
                TCP_EVENT_PACKETS
            } else {
                events::udp_threshold(cfg)
            };
            if earns && event_due(pick.seen, threshold) {
                events::notify(cfg, &p.flow, hash, &pick);
            }
            action
        }
        Err(c) => drop(c),
    }
}
