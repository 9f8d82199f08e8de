// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The normal path: VIP lookup, connection table, Maglev ring, encapsulation.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use marklb_common::{
    ConnEntry, Counter, FlowKey, IPPROTO_TCP, LbConfig, RealDef, VipKey, VipMeta, hash::flow_hash,
};

use crate::hdr::{TCP_ACK, TCP_SYN};
use crate::{
    encap::{self, Inner},
    events, icmp,
    maps::{CONN_TABLE, REALS, RINGS, VIP_ADDRS, VIP_GENS, VIPS},
    parse::{self, Verdict, frame_len},
    stats::{account, count},
};

/// The VIP serving `flow`: an exact (address, port, protocol) entry, else the address's
/// all-ports entry.
#[inline(always)]
pub fn vip_lookup(flow: &FlowKey) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        addr_be: flow.dst_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        _pad: 0,
    };
    if let Some(m) = unsafe { VIPS.get(key) } {
        return Some(m);
    }
    key.port_be = 0;
    unsafe { VIPS.get(key) }
}

/// A real chosen for a flow.
pub struct Pick {
    pub real_id: u32,
    pub real: &'static RealDef,
    /// Stats slot of the VIP.
    pub vip_id: u32,
    /// Chosen from the Maglev ring (a new flow) rather than the connection table.
    pub new: bool,
}

/// The real a live slot holds, if the slot is in use.
#[inline(always)]
fn live_real(real_id: u32) -> Option<&'static RealDef> {
    if real_id == 0 {
        return None;
    }
    match REALS.get(real_id) {
        Some(r) if r.generation != 0 => Some(r),
        _ => None,
    }
}

/// An established flow: the connection table names its real and VIP. No VIP lookup is
/// needed; an entry whose real or VIP has left (generation changed) does not count.
#[inline(always)]
pub fn established(flow: &FlowKey) -> Option<Pick> {
    let c = unsafe { CONN_TABLE.get(flow) }?;
    let real = live_real(c.real_id)?;
    if real.generation != c.real_gen {
        return None;
    }
    match VIP_GENS.get(c.vip_id) {
        Some(&g) if g != 0 && g == c.vip_gen => {}
        _ => return None,
    }
    Some(Pick {
        real_id: c.real_id,
        real,
        vip_id: c.vip_id,
        new: false,
    })
}

/// A new flow: the VIP's Maglev ring chooses; `learn` records the choice in the
/// connection table.
#[inline(always)]
pub fn ring_pick(flow: &FlowKey, vip: &VipMeta, learn: bool) -> Result<Pick, Counter> {
    if vip.ring_size == 0 {
        return Err(Counter::DropNoReal);
    }
    let idx = vip.ring_off.wrapping_add(flow_hash(flow) % vip.ring_size);
    let Some(&pair) = RINGS.get(idx >> 1) else {
        return Err(Counter::DropNoReal);
    };
    let real_id = (pair >> ((idx & 1) << 5)) as u32;
    let Some(real) = live_real(real_id) else {
        return Err(Counter::DropNoReal);
    };
    if learn {
        let entry = ConnEntry {
            real_id,
            real_gen: real.generation,
            vip_id: vip.vip_id,
            vip_gen: vip.generation,
        };
        // Failure only means the flow is picked from the ring again next time.
        let _ = CONN_TABLE.insert(flow, &entry, 0);
    }
    Ok(Pick {
        real_id,
        real,
        vip_id: vip.vip_id,
        new: true,
    })
}

#[inline(always)]
fn pass(c: Counter) -> u32 {
    count(c);
    xdp_action::XDP_PASS
}

#[inline(always)]
pub fn drop(c: Counter) -> u32 {
    count(c);
    xdp_action::XDP_DROP
}

/// The whole normal path for one packet.
#[inline(always)]
pub fn process(ctx: &XdpContext, cfg: &LbConfig) -> u32 {
    let verdict = parse::parse(ctx, |addr| unsafe { VIP_ADDRS.get(addr) }.is_some());
    let p = match verdict {
        Verdict::Flow(p) => p,
        Verdict::Icmp(p) => return icmp::handle(ctx, cfg, &p),
        Verdict::Pass(c) => return pass(c),
        Verdict::Drop(c) => return drop(c),
    };
    let bytes = frame_len(ctx);
    // A SYN starts a new connection: the ring decides even if the 5-tuple was seen before.
    let syn = p.flow.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let known = if syn { None } else { established(&p.flow) };
    let pick = match known {
        Some(pick) => pick,
        None => {
            let Some(vip) = vip_lookup(&p.flow) else {
                return pass(Counter::PassNotVip);
            };
            match ring_pick(&p.flow, vip, true) {
                Ok(pick) => pick,
                Err(c) => return drop(c),
            }
        }
    };
    if p.ip_len + encap::overhead(pick.real) > cfg.mtu {
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
            if pick.new {
                count(Counter::NewFlow);
                events::notify(
                    cfg,
                    &p.flow,
                    pick.vip_id,
                    pick.real_id,
                    pick.real.generation,
                );
            } else {
                count(Counter::ConnHit);
            }
            action
        }
        Err(c) => drop(c),
    }
}
