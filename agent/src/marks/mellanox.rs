//! The mellanox backend: hardware flow marks on Mellanox/NVIDIA ConnectX NICs (mlx5) through
//! the kernel's tc flower offload. One flower rule per marked flow on the device's clsact
//! ingress: exact 5-tuple, `skip_sw` (hardware only: the software path is marklb's own),
//! action `skbedit mark M`, which the kernel hands to the driver as FLOW_ACTION_MARK and mlx5
//! programs as the flow tag (NIC/legacy eswitch mode, 16 bits). The NIC delivers the tag in
//! `skb->mark`, where the TC balancer (`--mark-delivery skb-mark`) reads it.
//!
//! Rules live at chain 0, priority 1 (IPv4) or 2 (IPv6: one priority holds one protocol),
//! each with its own handle; a rule is deleted by (priority, handle). Those two priorities of
//! the device's ingress flower filters are marklb's: a starting backend empties them (rules
//! a previous agent left would carry marks the new one hands out again), and nothing else on
//! the device is touched.

use std::collections::HashMap;

use marklb_common::{FlowKey, words_addr};
use netlink_packet_core::NetlinkMessage;
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcActionAttribute, TcAttribute, TcFilterFlowerOption, TcOption, TcStats2},
};

use super::{HwBackend, HwBackendError, nic_probe::Capability};
use crate::tc::{
    TcError, TcSocket,
    flower::{self, MAX_FLOW_TAG, Match, RuleId},
};

const CHAIN: u32 = 0;
const PRIO_V4: u16 = 1;
const PRIO_V6: u16 = 2;

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

pub struct Mellanox {
    ifindex: i32,
    sock: TcSocket,
    rules: HashMap<FlowKey, (RuleId, u32)>,
    by_handle: HashMap<(u16, u32), FlowKey>,
    free_handles: Vec<u32>,
    next_handle: u32,
}

impl Mellanox {
    /// The backend for `iface` if the device can offload mark rules; else why not. Makes sure
    /// the clsact qdisc is there.
    pub fn open(iface: &str) -> Result<Self, String> {
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
        for (prio, v6) in [(PRIO_V4, false), (PRIO_V6, true)] {
            let seq = sock.next_seq();
            match sock.request(seq, &flower::delete_priority(seq, ifindex, CHAIN, prio, v6)) {
                Ok(()) => {
                    tracing::info!(iface, prio, "removed the flow rules a previous agent left")
                }
                Err(TcError { errno, .. }) if errno == libc::ENOENT => {}
                Err(e) => return Err(format!("clearing priority {prio} on {iface}: {e}")),
            }
        }
        Ok(Self {
            ifindex,
            sock,
            rules: HashMap::new(),
            by_handle: HashMap::new(),
            free_handles: Vec::new(),
            next_handle: 1,
        })
    }

    fn handle(&mut self) -> u32 {
        self.free_handles.pop().unwrap_or_else(|| {
            self.next_handle += 1;
            self.next_handle - 1
        })
    }

    fn delete(&mut self, id: &RuleId) -> Result<(), HwBackendError> {
        let seq = self.sock.next_seq();
        match self.sock.request(seq, &flower::delete_rule(seq, id)) {
            Ok(()) => {}
            Err(TcError { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(HwBackendError::Device(format!("deleting rule: {e}"))),
        }
        self.by_handle.remove(&(id.prio, id.handle));
        self.free_handles.push(id.handle);
        Ok(())
    }
}

/// Deletes every rule of marklb's two priorities; returns how many priorities held some.
fn clear_priorities(sock: &mut TcSocket, ifindex: i32) -> Result<usize, TcError> {
    let mut cleared = 0;
    for (prio, v6) in [(PRIO_V4, false), (PRIO_V6, true)] {
        let seq = sock.next_seq();
        match sock.request(seq, &flower::delete_priority(seq, ifindex, CHAIN, prio, v6)) {
            Ok(()) => cleared += 1,
            Err(TcError { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(cleared)
}

/// `marklb-agent cleanup`: on an mlx5 device, removes the flow rules of marklb's priorities
/// (nothing on any other device). Returns whether there were any.
pub fn remove_rules(iface: &str) -> Result<bool, String> {
    let Ok(cap) = Capability::probe(iface) else {
        return Ok(false);
    };
    if cap.driver != super::nic_probe::MLX5_DRIVER {
        return Ok(false);
    }
    let ifindex = ifindex(iface).map_err(|e| format!("{iface}: {e}"))?;
    let mut sock = TcSocket::open().map_err(|e| format!("netlink: {e}"))?;
    let n = clear_priorities(&mut sock, ifindex).map_err(|e| format!("{iface}: {e}"))?;
    Ok(n > 0)
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
        if let Some((old, _)) = self.rules.remove(flow) {
            self.delete(&old)?;
        }
        let v6 = is_v6(flow);
        let id = RuleId {
            ifindex: self.ifindex,
            chain: CHAIN,
            prio: if v6 { PRIO_V6 } else { PRIO_V4 },
            handle: self.handle(),
            v6,
        };
        let seq = self.sock.next_seq();
        let msg = flower::add_rule(seq, &id, &flow_match(flow), mark)
            .map_err(|e| HwBackendError::Device(e.to_string()))?;
        if let Err(e) = self.sock.request(seq, &msg) {
            self.free_handles.push(id.handle);
            return Err(match e.errno {
                libc::ENOSPC | libc::E2BIG | libc::ENOMEM => HwBackendError::Full,
                _ => HwBackendError::Device(format!("installing the flower rule: {e}")),
            });
        }
        self.by_handle.insert((id.prio, id.handle), *flow);
        self.rules.insert(*flow, (id, mark));
        Ok(())
    }

    fn remove(&mut self, flow: &FlowKey) -> Result<(), HwBackendError> {
        match self.rules.remove(flow) {
            Some((id, _)) => self.delete(&id),
            None => Ok(()),
        }
    }

    /// Packets each rule matched in hardware: a dump of the ingress filters, the skbedit
    /// action's statistics of each rule this backend installed.
    fn hits(&mut self) -> Result<HashMap<FlowKey, u64>, HwBackendError> {
        let seq = self.sock.next_seq();
        let msgs = self
            .sock
            .dump(seq, &flower::dump_rules(seq, self.ifindex))
            .map_err(|e| HwBackendError::Device(format!("dumping rules: {e}")))?;
        let mut out = HashMap::new();
        for m in msgs {
            let Some((prio, handle, packets)) = rule_stats(&m) else {
                continue;
            };
            if let Some(flow) = self.by_handle.get(&(prio, handle)) {
                out.insert(*flow, packets);
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
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).ok()?;
    let netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(
        tc,
    )) = msg.payload
    else {
        return None;
    };
    let prio = (tc.header.info >> 16) as u16;
    let handle = tc.header.handle.into();
    let mut packets = 0u64;
    for attr in &tc.attributes {
        let TcAttribute::Options(opts) = attr else {
            continue;
        };
        for o in opts {
            let TcOption::Flower(TcFilterFlowerOption::Actions(actions)) = o else {
                continue;
            };
            for a in actions {
                for aa in &a.attributes {
                    if let TcActionAttribute::Stats(stats) = aa {
                        for s in stats {
                            if let TcStats2::Basic(b) = s {
                                packets = packets.max(b.packets as u64);
                            }
                        }
                    }
                }
            }
        }
    }
    Some((prio, handle, packets))
}
