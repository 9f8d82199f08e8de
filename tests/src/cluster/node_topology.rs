//! A network-namespace topology around a veth on the node, where a host-network pod (the agent)
//! attaches to it; and manifest templating for the tests.

use std::{fs, io, sync::atomic::AtomicUsize};

use anyhow::{Result, bail};

use crate::netns::{Topology, TopologyOptions, ip};

static NODE_TOPO_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A [`Topology`] whose load-balancer end sits on the node (the host's network namespace),
/// where a host-network pod can attach to it: client and reals in namespaces, the router
/// routing the VIPs to the node's veth. The veth has no address on the node (the router knows
/// its MAC statically), so the node's routing is unchanged. Dropping it removes the
/// namespaces, which destroys the veth too.
pub struct NodeTopology {
    /// The node's end of the load balancer's link (the interface the agent attaches to).
    pub iface: String,
    pub mac: [u8; 6],
    pub topo: Topology,
}

impl NodeTopology {
    pub fn build(opts: TopologyOptions) -> io::Result<Self> {
        let topo = Topology::build(opts)?;
        let iface = format!(
            "mlbk{}x{}",
            std::process::id() % 100_000,
            NODE_TOPO_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let lb_ns = topo.lb.ns.clone();
        let old = topo.lb.port.iface.clone();
        ip(Some(&lb_ns), &["link", "set", &old, "down"])?;
        ip(Some(&lb_ns), &["link", "set", &old, "name", &iface])?;
        ip(
            Some(&lb_ns),
            &[
                "link",
                "set",
                &iface,
                "netns",
                &std::process::id().to_string(),
            ],
        )?;
        let me = NodeTopology {
            mac: topo.lb.port.mac,
            iface,
            topo,
        };
        // No addresses of our own on the node's side (not even IPv6 link-local).
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", me.iface),
            "1",
        );
        ip(None, &["link", "set", &me.iface, "up"])?;
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
        xdp_prog_id(&self.iface)
    }
}

/// The XDP program id on a node interface (`ip -d -j link`), if one is attached.
pub fn xdp_prog_id(iface: &str) -> Option<u64> {
    let out = ip(None, &["-d", "-j", "link", "show", "dev", iface]).ok()?;
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
