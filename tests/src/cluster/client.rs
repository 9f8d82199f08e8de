//! A client outside the cluster, on the nodes' network: a named network namespace with one
//! veth (`eth0`, [`client_ip`]) on the host's node bridge, as a machine on the same L2
//! network as the nodes would be. Tests route the addresses they want to reach through a
//! node (`ip -n <netns> route add <pool> via <node address>`), e.g. a Service's ingress
//! address through the balancer node; replies come from whichever node sends them, straight
//! over the bridge.
//!
//! Recorded before it is made ([`super::Record::clients`]) and removed with the cluster (or
//! with [`Cluster::remove_client`]), also after a SIGKILL (`make cluster-down`).

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::{Cluster, NODE_IFACE, NODES_BRIDGE, host::link_exists};
use crate::netns::{ip, ip_batch, netns_exec, netns_path};

/// Client indexes run from 1 to this.
pub const MAX_CLIENTS: u8 = 8;

/// A client namespace, as recorded and as tests see it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClientInfo {
    pub index: u8,
    /// The named network namespace (`marklb-client-<index>`).
    pub netns: String,
    /// Its address on the node network.
    pub ip: Option<Ipv4Addr>,
    /// The interface inside the namespace ([`NODE_IFACE`]).
    pub iface: String,
    /// The host end of its veth, on the node bridge.
    pub host_veth: String,
    /// The MAC of `iface`.
    pub mac: String,
}

/// The address of client `index` on the node network (`10.203.0.<200 + index>`).
pub fn client_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 203, 0, 200 + index)
}

impl Cluster {
    /// Adds client namespace `index` (1..=[`MAX_CLIENTS`]) on the node bridge.
    pub fn add_client(&self, index: u8) -> Result<ClientInfo> {
        if index == 0 || index > MAX_CLIENTS {
            bail!("client indexes run from 1 to {MAX_CLIENTS}, not {index}");
        }
        let c = ClientInfo {
            index,
            netns: format!("marklb-client-{index}"),
            ip: Some(client_ip(index)),
            iface: NODE_IFACE.to_string(),
            host_veth: format!("mlbcl{index}"),
            mac: format!("02:cb:00:00:01:{index:02x}"),
        };
        if netns_path(&c.netns).exists() {
            bail!(
                "the network namespace {} exists already: a client of another cluster? (`make cluster-down`)",
                c.netns
            );
        }
        self.ctx.update(|r| r.clients.push(c.clone()))?;
        ip(None, &["netns", "add", &c.netns])?;
        ip_batch(
            None,
            &[
                format!(
                    "link add {} type veth peer name {} address {} netns {}",
                    c.host_veth, c.iface, c.mac, c.netns
                ),
                format!("link set {} master {NODES_BRIDGE} up", c.host_veth),
            ],
        )?;
        ip_batch(
            Some(&c.netns),
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev {}", client_ip(index), c.iface),
                format!("link set {} up", c.iface),
            ],
        )?;
        // Full checksums on what it sends: an XDP balancer on the way sees final bytes.
        netns_exec(&c.netns, &["ethtool", "-K", &c.iface, "tx", "off"])?;
        Ok(c)
    }

    /// Removes a client namespace added by [`add_client`](Self::add_client).
    pub fn remove_client(&self, index: u8) -> Result<()> {
        let rec = self.ctx.record();
        let Some(c) = rec.clients.iter().find(|c| c.index == index) else {
            bail!("no client {index}");
        };
        let problems = remove_client(c);
        self.ctx
            .update(|r| r.clients.retain(|x| x.index != index))?;
        if !problems.is_empty() {
            bail!("removing client {index} left: {problems:?}");
        }
        Ok(())
    }
}

/// Removes a client's namespace (its veth goes with it); what could not be removed.
pub(crate) fn remove_client(c: &ClientInfo) -> Vec<String> {
    let mut problems = Vec::new();
    if netns_path(&c.netns).exists()
        && let Err(e) = ip(None, &["netns", "del", &c.netns])
    {
        problems.push(format!("deleting the network namespace {}: {e}", c.netns));
    }
    if !c.host_veth.is_empty() && link_exists(&c.host_veth) {
        let _ = ip(None, &["link", "del", &c.host_veth]);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_sit_above_the_nodes_on_the_node_network() {
        assert_eq!(client_ip(1), Ipv4Addr::new(10, 203, 0, 201));
        assert_eq!(client_ip(MAX_CLIENTS), Ipv4Addr::new(10, 203, 0, 208));
        // Node addresses are 10.203.0.11..=26 (MAX_NODES 16): no overlap.
        assert!(super::super::node_ip(super::super::MAX_NODES) < client_ip(1));
    }
}
