//! A load-balancer node of the real cluster with clients and reals around it (shared by
//! `operator_cluster` and `install_cluster`): a test topology on the node (client and router
//! in namespaces, two reals decapsulating IP-in-IP and answering the client directly) around a
//! veth named [`IFACE`]. Every node's topology names its veth alike and has the same addresses,
//! so one LoadBalancer spec ([`loadbalancer_yaml`]) serves all of them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use marklb_agent::decap::Decap;

use crate::agent_proc::{Scrape, attach_decaps, http_get};
use crate::cluster::{NodeInfo, NodeTopology};
use crate::netns::{Servers, TcpConn, TopologyOptions, tally, tcp_connect_many};

/// The interface name of the test veth on every node.
pub const IFACE: &str = "mlbop0";
/// The VIP of the `web` LoadBalancer.
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The port every VIP of the tests serves.
pub const PORT: u16 = 80;
/// Timeout of one connection or request.
pub const T: Duration = Duration::from_secs(3);
/// How long the tests wait for anything the cluster does (generous: 2 shared cores).
pub const WAIT: Duration = Duration::from_secs(90);
/// The node label the tests' LoadBalancers select.
pub const NODE_LABEL: &str = "marklb.io/loadbalancer-node";
/// The agent's metrics port (operator flag `--agent-metrics-port`, bound to the node address).
pub const AGENT_METRICS_PORT: u16 = 9464;
/// The label selector of the agent pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=marklb-agent";

/// A node with a topology on it: the client reaches the VIPs through this node's agent.
pub struct Side {
    pub node: NodeInfo,
    // Drop order: servers and decapsulators before the topology.
    _servers: Servers,
    _decaps: Vec<Decap>,
    pub topo: NodeTopology,
}

impl Side {
    /// The topology on `node`, its reals routing `vips` to themselves (decapsulated).
    pub fn build(node: NodeInfo, vips: Vec<Ipv4Addr>) -> Side {
        let topo = NodeTopology::build_named(
            &node,
            TopologyOptions {
                reals: 2,
                vips_v4: vips,
                client_mtu: 1400,
                ..Default::default()
            },
            IFACE,
        )
        .expect("a topology around a veth on the node");
        let decaps = attach_decaps(&topo).expect("decapsulation on the reals");
        let servers = Servers::start(&topo, PORT, 53).expect("servers on the reals");
        Side {
            node,
            _servers: servers,
            _decaps: decaps,
            topo,
        }
    }

    /// `n` connections to `vip` from this node's client, left open.
    pub fn connect(&self, vip: Ipv4Addr, n: usize) -> std::io::Result<Vec<TcpConn>> {
        tcp_connect_many(
            &self.topo.client.ns,
            SocketAddr::new(IpAddr::V4(vip), PORT),
            n,
            T,
        )
    }

    /// `n` new connections to `vip`, one request each: the reals that answered.
    pub fn reals(&self, vip: Ipv4Addr, n: usize) -> std::io::Result<BTreeMap<String, usize>> {
        let mut names = Vec::new();
        for mut c in self.connect(vip, n)? {
            let r = c.request("hello")?;
            assert_eq!(r, c.real, "a connection changed real");
            names.push(r);
            c.close();
        }
        Ok(tally(names.iter().map(String::as_str)))
    }

    /// Polls until new connections to `vip` land on exactly the reals `want`; how long it took.
    pub async fn wait_reals(&self, vip: Ipv4Addr, want: &[&str]) -> Duration {
        let t0 = Instant::now();
        loop {
            let got = self.reals(vip, 12);
            if let Ok(t) = &got
                && t.keys().map(String::as_str).eq(want.iter().copied())
            {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < WAIT,
                "{vip} via {}: not exactly {want:?} after {WAIT:?}: {got:?}",
                self.node.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The agent's `/metrics` on the node address.
    pub fn agent_scrape(&self) -> Scrape {
        let r = http_get(
            SocketAddr::new(IpAddr::V4(self.node.ip), AGENT_METRICS_PORT),
            "/metrics",
        )
        .expect("the agent's /metrics on the node address");
        Scrape::parse(&r.body).expect("parsing the agent's metrics")
    }
}

/// A LoadBalancer as the user writes it (the gateway MAC and the encapsulation prefix are the
/// test topology's; `backends` the YAML of the VIP's reals, [`WEB_BACKENDS`] for example).
pub fn loadbalancer_yaml(name: &str, vip: Ipv4Addr, selector: &str, backends: &str) -> String {
    format!(
        "apiVersion: marklb.io/v1alpha1
kind: LoadBalancer
metadata:
  name: {name}
  namespace: shop
spec:
  interface: {IFACE}
  nodeSelector:
    {selector}
  nextHop:
    mac: \"02:00:00:01:00:01\"
  encap:
    sourcePrefixV4: 10.202.0.0/16
  vips:
    - name: http
      address: {vip}
      port: 80
      protocol: TCP
{backends}"
    )
}

/// The two reals of the topology as a VIP's backends.
pub const WEB_BACKENDS: &str = "      backends:
        - address: 10.201.1.2
        - address: 10.201.2.2
";
