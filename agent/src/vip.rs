//! A VIP's identity: address, port (0 = every port) and protocol, as the datapath keys it.

use std::{fmt, net::IpAddr};

use marklb_common::{IPPROTO_TCP, IPPROTO_UDP, VipKey, addr_words};

/// A VIP's identity: address, port (0 = all ports) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipId {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl VipId {
    pub fn tcp(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            proto: IPPROTO_TCP,
        }
    }

    pub fn udp(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            proto: IPPROTO_UDP,
        }
    }

    /// The datapath's key of this VIP.
    pub fn key(&self) -> VipKey {
        VipKey {
            addr_be: addr_words(self.addr),
            port_be: self.port.to_be(),
            proto: self.proto,
            _pad: 0,
        }
    }
}

/// `10.0.0.1:80/TCP`, `[2001:db8::1]:53/UDP`; port 0 prints as `*` (as the spec's
/// `Vip::endpoint` does).
impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            IPPROTO_TCP => "TCP".to_string(),
            IPPROTO_UDP => "UDP".to_string(),
            p => format!("proto{p}"),
        };
        let port = match self.port {
            0 => "*".to_string(),
            p => p.to_string(),
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{port}/{proto}"),
            IpAddr::V6(a) => write!(f, "[{a}]:{port}/{proto}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_the_spec_endpoint() {
        let v4 = VipId::tcp("10.0.0.1".parse().unwrap(), 80);
        assert_eq!(v4.to_string(), "10.0.0.1:80/TCP");
        let v6 = VipId::udp("2001:db8::1".parse().unwrap(), 0);
        assert_eq!(v6.to_string(), "[2001:db8::1]:*/UDP");
    }
}
