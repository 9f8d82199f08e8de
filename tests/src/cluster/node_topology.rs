//! A network-namespace topology around a veth on a node, where a host-network pod of that node
//! (the agent) attaches to it; and manifest templating for the tests.

use std::{fs, io, sync::atomic::AtomicUsize};

use anyhow::{Result, bail};

use super::NodeInfo;
use crate::netns::{Topology, TopologyOptions, in_netns, ip};

static NODE_TOPO_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A [`Topology`] whose load-balancer end sits on a node (in the node's network namespace),
/// where a host-network pod of that node can attach to it: client and reals in namespaces, the
/// router routing the VIPs to the node's veth. The veth has no address on the node (the router
/// knows its MAC statically), so the node's routing is unchanged. Dropping it removes the
/// namespaces, which destroys the veth too.
pub struct NodeTopology {
    /// The node's end of the load balancer's link (the interface the agent attaches to).
    pub iface: String,
    pub mac: [u8; 6],
    /// The node's network namespace.
    pub node_netns: String,
    pub topo: Topology,
}

impl NodeTopology {
    /// Builds the topology with its load balancer's end on `node`.
    pub fn build(node: &NodeInfo, opts: TopologyOptions) -> io::Result<Self> {
        let iface = format!(
            "mlbk{}x{}",
            std::process::id() % 100_000,
            NODE_TOPO_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        Self::build_named(node, opts, &iface)
    }

    /// Builds the topology with the node's end named `iface`: one LoadBalancer (one interface
    /// name) served by several nodes needs the same name on each (every node is its own
    /// network namespace; the reals' addresses and the gateway's MAC are the same in every
    /// topology, so one spec fits all of them).
    pub fn build_named(node: &NodeInfo, opts: TopologyOptions, iface: &str) -> io::Result<Self> {
        let topo = Topology::build(opts)?;
        let iface = iface.to_string();
        let lb_ns = topo.lb.ns.clone();
        let old = topo.lb.port.iface.clone();
        ip(Some(&lb_ns), &["link", "set", &old, "down"])?;
        ip(Some(&lb_ns), &["link", "set", &old, "name", &iface])?;
        ip(Some(&lb_ns), &["link", "set", &iface, "netns", &node.netns])?;
        let me = NodeTopology {
            mac: topo.lb.port.mac,
            iface,
            node_netns: node.netns.clone(),
            topo,
        };
        // No addresses of our own on the node's side (not even IPv6 link-local).
        let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", me.iface);
        let _ = in_netns(&me.node_netns, || fs::write(&sysctl, "1"));
        ip(Some(&me.node_netns), &["link", "set", &me.iface, "up"])?;
        let mac = me.topo.lb.port.mac_string();
        let gw = me.topo.lb.gateway.iface.clone();
        let router = me.topo.router_ns.clone();
        for addr in [
            me.topo.lb.port.v4.to_string(),
            me.topo.lb.port.v6.to_string(),
        ] {
            ip(
                Some(&router),
                &[
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    &gw,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(me)
    }

    /// The XDP program id on the node's interface, if one is attached.
    pub fn xdp_prog_id(&self) -> Option<u64> {
        xdp_prog_id(&self.node_netns, &self.iface)
    }
}

/// The XDP program id on interface `iface` of network namespace `netns` (`ip -d -j link`), if
/// one is attached.
pub fn xdp_prog_id(netns: &str, iface: &str) -> Option<u64> {
    let out = ip(Some(netns), &["-d", "-j", "link", "show", "dev", iface]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v[0]["xdp"]["prog"]["id"].as_u64()
}

impl std::ops::Deref for NodeTopology {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topo
    }
}

/// Substitutes `${NAME}` placeholders in a manifest template; fails on any left over.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    if let Some(i) = s.find("${") {
        bail!(
            "unsubstituted placeholder at {:?}",
            &s[i..(i + 30).min(s.len())]
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(
            render("a: ${X}\nb: ${Y}", &[("X", "1".into()), ("Y", "2".into())]).unwrap(),
            "a: 1\nb: 2"
        );
        assert!(render("a: ${X}", &[]).is_err());
    }
}
