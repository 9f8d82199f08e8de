//! Building test and benchmark frames (etherparse does the header and checksum work).

use std::net::IpAddr;

use etherparse::PacketBuilder;
use marklb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

/// Transport of a crafted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with a SYN (new connection) or an ACK (established).
    Tcp {
        syn: bool,
    },
    Udp,
}

/// One TCP/UDP frame from a client to a VIP.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl FrameSpec {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, syn: bool) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src,
            dst,
            sport,
            dport,
            l4: L4::Tcp { syn },
            payload: Vec::new(),
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            l4: L4::Udp,
            ..Self::tcp(src, sport, dst, dport, false)
        }
    }

    pub fn with_payload(mut self, len: usize) -> Self {
        self.payload = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        self
    }

    /// The frame's bytes (checksums valid).
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => panic!("mixed address families in a frame"),
        };
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { syn } => {
                let b = ip.tcp(self.sport, self.dport, 1000, 64_000);
                let b = if syn { b.syn() } else { b.ack(1) };
                b.write(&mut out, &self.payload).expect("frame");
            }
            L4::Udp => {
                ip.udp(self.sport, self.dport)
                    .write(&mut out, &self.payload)
                    .expect("frame");
            }
        }
        out
    }

    /// The 5-tuple the datapath sees for this frame.
    pub fn flow(&self) -> FlowKey {
        let proto = match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        };
        FlowKey::new(self.src, self.sport, self.dst, self.dport, proto)
    }
}
