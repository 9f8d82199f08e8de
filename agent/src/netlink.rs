//! Interface facts through rtnetlink: index and MAC of an interface, and the MAC of the
//! next hop (explicit address or the interface's default gateway) from the neighbour
//! table, resolving it when the cache has no entry yet.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::Handle;

pub struct Netlink {
    handle: Handle,
}

/// An interface's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: Option<[u8; 6]>,
}

fn mac6(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl Netlink {
    /// Opens a netlink connection in the calling thread's network namespace.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The kernel's link message for an interface.
    async fn link_message(&self, name: &str) -> Result<netlink_packet_route::link::LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .with_context(|| format!("interface {name} not found"))?
            .ok_or_else(|| anyhow!("interface {name} not found"))
    }

    pub async fn link(&self, name: &str) -> Result<Link> {
        let msg = self.link_message(name).await?;
        let mac = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => mac6(b),
            _ => None,
        });
        Ok(Link {
            index: msg.header.index,
            mac,
        })
    }

    /// The gateway of the default route that leaves through `ifindex`.
    async fn default_gateway(&self, ifindex: u32, v6: bool) -> Result<Option<IpAddr>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut routes = self.handle.route().get(msg).execute();
        while let Some(r) = routes.try_next().await? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if oif != Some(ifindex) {
                continue;
            }
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if gw.is_some() {
                return Ok(gw);
            }
        }
        Ok(None)
    }

    async fn neighbour_mac(&self, ifindex: u32, addr: IpAddr) -> Result<Option<[u8; 6]>> {
        let family = if addr.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut neigh = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(n) = neigh.try_next().await? {
            if n.header.ifindex != ifindex
                || matches!(
                    n.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed
                )
            {
                continue;
            }
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if dst != Some(addr) {
                continue;
            }
            if let Some(mac) = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(b) => mac6(b),
                _ => None,
            }) {
                return Ok(Some(mac));
            }
        }
        Ok(None)
    }

    /// The MAC to send forwarded packets to: the neighbour entry of `next_hop`, or of the
    /// interface's default gateway. Sends a datagram to provoke ARP/ND when the neighbour
    /// is not cached yet.
    pub async fn resolve_next_hop(&self, iface: &str, next_hop: Option<IpAddr>) -> Result<[u8; 6]> {
        let link = self.link(iface).await?;
        let gw = match next_hop {
            Some(a) => a,
            None => match self.default_gateway(link.index, false).await? {
                Some(a) => a,
                None => self
                    .default_gateway(link.index, true)
                    .await?
                    .ok_or_else(|| {
                        anyhow!("no next hop: {iface} has no default route; set spec.nextHop")
                    })?,
            },
        };
        for attempt in 0..20 {
            if let Some(mac) = self.neighbour_mac(link.index, gw).await? {
                return Ok(mac);
            }
            if attempt % 5 == 0 {
                provoke_resolution(iface, gw);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("next hop {gw} on {iface} did not resolve to a MAC address (ARP/ND)")
    }
}

/// A datagram to the discard port makes the kernel resolve the neighbour.
fn provoke_resolution(iface: &str, addr: IpAddr) {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .expect("addr");
    if let Ok(sock) = UdpSocket::bind(bind) {
        let _ = bind_to_device(&sock, iface);
        let _ = sock.send_to(b"marklb", SocketAddr::new(addr, 9));
    }
}

fn bind_to_device(sock: &UdpSocket, iface: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            iface.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The XDP program on an interface, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    pub prog_id: u32,
    pub mode: &'static str,
}

impl Netlink {
    pub async fn xdp_attachment(&self, name: &str) -> Result<Option<XdpAttachment>> {
        use netlink_packet_route::link::{LinkXdp, XdpAttached};
        let msg = self.link_message(name).await?;
        let Some(xdp) = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(x) => Some(x),
            _ => None,
        }) else {
            return Ok(None);
        };
        let mut prog_id = 0;
        let mut mode = "none";
        for x in xdp {
            match x {
                LinkXdp::ProgId(id) => prog_id = *id,
                LinkXdp::Attached(XdpAttached::Driver) => mode = "native",
                LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = "generic",
                LinkXdp::Attached(XdpAttached::Hardware) => mode = "offload",
                LinkXdp::Attached(XdpAttached::Multiple) => mode = "multiple",
                _ => {}
            }
        }
        Ok((prog_id != 0).then_some(XdpAttachment { prog_id, mode }))
    }

    /// Removes whatever XDP program is attached through netlink (not a pinned bpf_link).
    pub async fn detach_xdp(&self, name: &str) -> Result<()> {
        use netlink_packet_route::link::LinkXdp;
        let link = self.link(name).await?;
        // XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE: clear both attachment kinds.
        for flags in [1u32 << 1, 1u32 << 2] {
            let mut msg = rtnetlink::LinkUnspec::new_with_index(link.index).build();
            msg.attributes.push(LinkAttribute::Xdp(vec![
                LinkXdp::Fd(-1),
                LinkXdp::Flags(flags),
            ]));
            let _ = self.handle.link().set(msg).execute().await;
        }
        Ok(())
    }
}
