//! Several nodes on one machine (`marklb_tests::cluster`): every node is Ready in its own
//! network and mount namespaces; a DaemonSet lands one pod per node and each pod's process
//! works on its own node (the agent on each node's `eth0` reports that node's interface and
//! program, pins in that node's bpffs); node selection runs exactly one pod on the chosen
//! node; a node added to the running cluster gets its pod and a removed node's pods go; a
//! stopped kubelet turns its node NotReady within the configured grace period.
//!
//! One cluster (two nodes, labelled `marklb.io/test-node=<index>` at start) serves the binary.
//! Tests that add nodes select their pods by the labels of the node they add, so the tests run
//! side by side. When the machine cannot run the cluster, they print SKIP with the reason.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use marklb_tests::{
    agent_proc::{Manifest, Scrape, VipSpec, http_get},
    cluster::{
        self, BRIDGE_IP, Cluster, NODE_GRACE, NodeInfo, NodeOptions, TEST_NODE_LABEL,
        node_condition, node_ready, render, xdp_prog_id,
    },
    cluster_or_skip,
    kube_harness::{apply_value, report, yaml_documents},
    netns::{ip, netns_inode},
};
use serde_json::{Value, json};

/// The agents' metrics port in the DaemonSet on every node's `eth0` (each node has its own
/// network namespace, so one port serves all).
const AGENT_PORT: u16 = 19477;

/// The nodes the shared cluster started with (labelled at start), not those other tests add
/// meanwhile.
fn base_nodes(cluster: &Cluster) -> Vec<NodeInfo> {
    cluster
        .nodes()
        .into_iter()
        .filter(|n| n.labels.contains_key(TEST_NODE_LABEL))
        .collect()
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn node_name(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn pods(client: &Client, ns: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing pods")
        .items
}

/// Waits until the pods of `ns` satisfy `done`; the time it took.
async fn wait_pods(
    client: &Client,
    ns: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Pod]) -> bool,
) -> (Vec<Pod>, Duration) {
    let t0 = Instant::now();
    loop {
        let p = pods(client, ns).await;
        if done(&p) {
            return (p, t0.elapsed());
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: not after {timeout:?}: {:#?}",
            p.iter()
                .map(|p| (p.metadata.name.clone(), node_name(p), p.status.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace for one test, deleted when dropped.
struct Namespace<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl<'a> Namespace<'a> {
    async fn new(cluster: &'a Cluster, client: &Client, name: &str) -> Namespace<'a> {
        apply_value(
            client,
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            "cluster-nodes",
        )
        .await
        .expect("namespace");
        // Pods are admitted once the namespace's default service account exists.
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sas
            .get_opt("default")
            .await
            .expect("service accounts")
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "no default service account in {name}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Namespace {
            cluster,
            name: name.to_string(),
        }
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A DaemonSet of the pause image in `ns`, its pods placed by `placement` (merged into the pod
/// spec).
fn pause_daemonset(ns: &str, name: &str, placement: Value) -> Value {
    let image = cluster::images().expect("images").pause.name;
    let mut spec = json!({
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": false,
        "containers": [{"name": "pause", "image": image, "imagePullPolicy": "Never"}]
    });
    if let (Some(s), Some(p)) = (spec.as_object_mut(), placement.as_object()) {
        s.extend(p.clone());
    }
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec}
        }
    })
}

/// The processes whose command line contains `needle`, by the network namespace they run in.
fn processes_by_netns(needle: &str) -> BTreeMap<u64, Vec<u32>> {
    let mut m: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
            && let Some(ino) = netns_inode(&e.path())
        {
            m.entry(ino).or_default().push(pid);
        }
    }
    m
}

#[tokio::test]
async fn every_node_is_ready_in_its_own_namespaces() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.expect("client");
    let nodes = base_nodes(cluster);
    let api: Api<Node> = Api::all(client.clone());
    let host_mnt = std::fs::metadata("/proc/self/ns/mnt")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let mut mount_namespaces = BTreeSet::new();
    for n in &nodes {
        let node = api.get(&n.name).await.expect("the Node object");
        assert!(node_ready(&node), "{} Ready", n.name);
        let addrs = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.clone())
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == n.ip.to_string()),
            "{}: InternalIP {} in {addrs:?}",
            n.name,
            n.ip
        );
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(TEST_NODE_LABEL),
            Some(&n.index.to_string()),
            "{}: the label given at start",
            n.name
        );
        // kubelet runs in the node's network namespace, in a mount namespace of the node's.
        let rec = cluster.record();
        let kubelet = rec
            .procs_of(Some(&n.name), "kubelet")
            .next()
            .expect("kubelet")
            .pid;
        let proc = Path::new("/proc").join(kubelet.to_string());
        assert_eq!(
            netns_inode(&proc),
            n.netns_inode(),
            "{}: kubelet's netns",
            n.name
        );
        let mnt = std::fs::metadata(proc.join("ns/mnt"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        assert_ne!(
            mnt, host_mnt,
            "{}: kubelet has a mount namespace of its own",
            n.name
        );
        mount_namespaces.insert(mnt);
        // Its /var/log/pods is the node's directory; its interfaces are the node's.
        let same = |a: &Path, b: &Path| {
            let ino = |p: &Path| {
                std::fs::metadata(p)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok()
            };
            ino(a).is_some() && ino(a) == ino(b)
        };
        assert!(
            same(&proc.join("root/var/log/pods"), &n.dir.join("log/pods")),
            "{}: /var/log/pods is the node's own",
            n.name
        );
        assert!(proc.join("root/sys/class/net").join(&n.iface).exists());
        // Routes to the node network and the services only: nothing leaves the machine.
        let default = ip(Some(&n.netns), &["route", "show", "default"]).unwrap();
        assert!(
            default.trim().is_empty(),
            "{}: a default route: {default}",
            n.name
        );
        let services = ip(Some(&n.netns), &["route", "show", cluster::SERVICE_CIDR]).unwrap();
        assert!(
            services.contains(&BRIDGE_IP.to_string()),
            "{}: {services}",
            n.name
        );
        // Its pods' cgroups are below its own root.
        assert!(
            Path::new("/sys/fs/cgroup/memory")
                .join(&n.name)
                .join("kubepods")
                .is_dir(),
            "{}: kubepods below the node's cgroup root",
            n.name
        );
    }
    assert_eq!(
        mount_namespaces.len(),
        nodes.len(),
        "one mount namespace per node"
    );
    report(&format!(
        "{} nodes Ready: {}",
        nodes.len(),
        nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

/// The LoadBalancer each node's agent serves on `eth0`: one VIP nobody sends to (the node's
/// own traffic passes the program untouched), next hop the host's bridge.
fn idle_manifest() -> String {
    let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", cluster::NODES_BRIDGE))
        .expect("the node bridge's MAC");
    Manifest {
        name: "nodes".into(),
        vips: vec![VipSpec {
            name: Some("idle".into()),
            address: "10.99.9.1".parse().unwrap(),
            port: 80,
            protocol: "TCP",
            backends: vec![("10.99.9.2".parse().unwrap(), 1)],
        }],
        table_size: None,
        next_hop_mac: Some(mac.trim().to_string()),
        encap_v4: Some("10.202.0.0/16".into()),
        encap_v6: Some("fd00:202::/96".into()),
        mark_idle_timeout: None,
        extra_spec: Vec::new(),
    }
    .to_yaml()
}

#[tokio::test]
async fn a_daemonset_runs_one_pod_per_node_and_each_works_on_its_own_node() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.expect("client");
    let nodes = base_nodes(cluster);
    let ns = Namespace::new(cluster, &client, "nodes-agent").await;
    let image = cluster::images().expect("images").agent.name;
    let vars = [
        ("NAMESPACE", ns.name.clone()),
        ("IMAGE", image),
        ("INTERFACE", cluster::NODE_IFACE.to_string()),
        ("METRICS_PORT", AGENT_PORT.to_string()),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/agent-daemonset");
    for f in ["configmap.yaml", "daemonset.yaml"] {
        let text = render(&std::fs::read_to_string(dir.join(f)).unwrap(), &vars).unwrap();
        let mut v = yaml_documents(&text).unwrap().remove(0);
        if f == "configmap.yaml" {
            v["data"]["lb.yaml"] = Value::from(idle_manifest());
        } else {
            let pod = &mut v["spec"]["template"]["spec"];
            // The shared cluster's nodes only (not nodes other tests add meanwhile).
            pod["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [{"key": TEST_NODE_LABEL, "operator": "Exists"}]}]}}});
            pod["containers"][0]["args"]
                .as_array_mut()
                .unwrap()
                .push("--remove-on-exit".into());
        }
        apply_value(&client, &v, "cluster-nodes").await.expect(f);
    }
    let (running, took) = wait_pods(
        &client,
        &ns.name,
        "one Ready agent pod per node",
        Duration::from_secs(90),
        |p| p.len() == nodes.len() && p.iter().all(pod_ready),
    )
    .await;
    report(&format!(
        "figure: agent DaemonSet on {} nodes: every pod Ready {}",
        nodes.len(),
        secs(took)
    ));
    let on: BTreeSet<String> = running.iter().map(node_name).collect();
    assert_eq!(
        on,
        nodes.iter().map(|n| n.name.clone()).collect(),
        "one pod on each node"
    );

    let agents = processes_by_netns("marklb-agent");
    let mut programs = BTreeSet::new();
    let mut bpffs = BTreeSet::new();
    for n in &nodes {
        // Exactly one agent process runs in the node's network namespace.
        let ino = n.netns_inode().expect("netns");
        assert_eq!(
            agents.get(&ino).map(Vec::len),
            Some(1),
            "{}: agents {agents:?}",
            n.name
        );
        // It attached to the node's own eth0: the program it reports is the one there.
        let addr = SocketAddr::from((n.ip, AGENT_PORT));
        let r = http_get(addr, "/metrics").expect("the agent's /metrics on the node's address");
        let s = Scrape::parse(&r.body).expect("metrics");
        let prog = xdp_prog_id(&n.netns, &n.iface).expect("XDP on the node's eth0");
        assert_eq!(
            s.get(
                "marklb_datapath_info",
                &[
                    ("interface", n.iface.as_str()),
                    ("program_id", prog.to_string().as_str())
                ]
            ),
            1.0,
            "{}: the agent reports the program on the node's own interface",
            n.name
        );
        programs.insert(prog);
        // It pinned in the node's own bpffs (one file system per node), not the host's.
        assert!(
            n.pins(&n.iface).join("xdp_link").exists(),
            "{}: pins",
            n.name
        );
        bpffs.insert(
            std::fs::metadata(&n.bpffs)
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .expect("the node's bpffs"),
        );
        // Its logs are in the node's /var/log/pods only; its containers in the node's containerd.
        let pod = running.iter().find(|p| node_name(p) == n.name).unwrap();
        let uid = pod.metadata.uid.clone().unwrap();
        let container = pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0]
            .container_id
            .clone()
            .unwrap_or_default();
        let id = container.trim_start_matches("containerd://").to_string();
        for m in &nodes {
            let logs: Vec<String> = std::fs::read_dir(m.dir.join("log/pods"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let containers = cluster.ctr(&m.name, &["containers", "ls", "-q"]).unwrap();
            let mine = m.name == n.name;
            assert_eq!(
                logs.iter().any(|l| l.ends_with(&uid)),
                mine,
                "{}'s pod logs on {}: {logs:?}",
                n.name,
                m.name
            );
            assert_eq!(
                containers.lines().any(|c| c == id),
                mine,
                "{}'s container in {}'s containerd",
                n.name,
                m.name
            );
        }
    }
    assert_eq!(
        programs.len(),
        nodes.len(),
        "each node runs its own program"
    );
    assert_eq!(bpffs.len(), nodes.len(), "each node has its own bpffs");
    assert!(
        !Path::new(cluster::BPFFS)
            .join("marklb")
            .join(cluster::NODE_IFACE)
            .exists(),
        "nothing pinned in the host's bpffs"
    );

    // Gone with the DaemonSet (--remove-on-exit): no program on any node's interface.
    Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), &ns.name)
        .delete("marklb-agent", &DeleteParams::default())
        .await
        .expect("deleting the DaemonSet");
    // The agents' part first: each removes its program on SIGTERM, whatever kubelet does next.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        while xdp_prog_id(&n.netns, &n.iface).is_some() {
            assert!(Instant::now() < deadline, "{}: XDP still on eth0", n.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Then the pods. Their deletion is kubelet's business, not the agent's: kubelet 1.20 deletes
    // a pod once its containers, volumes and cgroup are gone, and on a loaded machine it once
    // left an agent pod terminating for over a minute (container status "ContainerStatusUnknown"
    // with the programs already removed). Wait generously, then say what kubelet logged and
    // delete what is left with grace 0, so the namespace goes and the next test starts clean.
    let t0 = Instant::now();
    let mut forced = false;
    loop {
        let left = pods(&client, &ns.name).await;
        if left.is_empty() {
            report(&format!(
                "figure: agent pods gone {} after their programs",
                secs(t0.elapsed())
            ));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(210),
            "pods still listed 60s after deletion with grace 0: {:?}",
            left.iter().map(|p| &p.metadata.name).collect::<Vec<_>>()
        );
        if !forced && t0.elapsed() > Duration::from_secs(150) {
            forced = true;
            for p in &left {
                let (name, node) = (p.metadata.name.clone().unwrap_or_default(), node_name(p));
                let kubelet = cluster.log_tail(&format!("{node}/kubelet"), 4000);
                let lines: Vec<&str> = kubelet.lines().filter(|l| l.contains(&name)).collect();
                report(&format!(
                    "seen: pod {name} on {node} still terminating after {}; containers {:?}; kubelet on it:\n{}",
                    secs(t0.elapsed()),
                    p.status.as_ref().map(|s| &s.container_statuses),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                ));
                Api::<Pod>::namespaced(client.clone(), &ns.name)
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await
                    .expect("force-deleting a stuck pod");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn node_selection_matching_one_node_runs_exactly_one_pod_there() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.expect("client");
    let nodes = base_nodes(cluster);
    let last = nodes.last().unwrap().clone();
    let first = nodes[0].clone();
    let ns = Namespace::new(cluster, &client, "nodes-select").await;
    // A DaemonSet selecting the last node by the label it got at start.
    let ds = pause_daemonset(
        &ns.name,
        "by-label",
        json!({"nodeSelector": {TEST_NODE_LABEL: last.index.to_string()}}),
    );
    apply_value(&client, &ds, "cluster-nodes")
        .await
        .expect("DaemonSet");
    // A pod with a required node affinity for the first node's name.
    let image = cluster::images().expect("images").pause.name;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "by-affinity", "namespace": ns.name, "labels": {"app": "by-affinity"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [first.name]}]}]}}},
            "containers": [{"name": "pause", "image": image, "imagePullPolicy": "Never"}]
        }
    });
    apply_value(&client, &pod, "cluster-nodes")
        .await
        .expect("pod");
    let (p, took) = wait_pods(
        &client,
        &ns.name,
        "both pods Ready",
        Duration::from_secs(60),
        |p| p.len() == 2 && p.iter().all(pod_ready),
    )
    .await;
    let placed: BTreeMap<String, String> = p
        .iter()
        .map(|p| {
            (
                p.metadata.labels.clone().unwrap_or_default()["app"].clone(),
                node_name(p),
            )
        })
        .collect();
    assert_eq!(placed["by-label"], last.name, "{placed:?}");
    assert_eq!(placed["by-affinity"], first.name, "{placed:?}");
    // A few seconds later still exactly one DaemonSet pod.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = pods(&client, &ns.name).await;
    assert_eq!(again.len(), 2, "exactly one pod per selection");
    report(&format!(
        "figure: node selection: both pods Ready {}",
        secs(took)
    ));
}

#[tokio::test]
async fn a_node_added_to_the_running_cluster_gets_its_pod_and_a_removed_nodes_pods_go() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.expect("client");
    let ns = Namespace::new(cluster, &client, "nodes-join").await;
    let ds = pause_daemonset(
        &ns.name,
        "joiner",
        json!({"nodeSelector": {"marklb.io/joined": "yes"}}),
    );
    apply_value(&client, &ds, "cluster-nodes")
        .await
        .expect("DaemonSet");
    assert!(
        pods(&client, &ns.name).await.is_empty(),
        "no node has the label yet"
    );

    let t0 = Instant::now();
    let node = cluster
        .add_node(NodeOptions::labelled(&[("marklb.io/joined", "yes")]))
        .await
        .expect("adding a node");
    let ready = t0.elapsed();
    let obj = Api::<Node>::all(client.clone())
        .get(&node.name)
        .await
        .expect("the new Node");
    assert_eq!(
        obj.metadata
            .labels
            .unwrap_or_default()
            .get("marklb.io/joined")
            .map(String::as_str),
        Some("yes"),
        "the label given at start"
    );
    let (p, to_pod) = wait_pods(
        &client,
        &ns.name,
        "the new node's pod Ready",
        Duration::from_secs(60),
        |p| p.len() == 1 && pod_ready(&p[0]),
    )
    .await;
    assert_eq!(node_name(&p[0]), node.name);
    report(&format!(
        "figure: add_node: {} Ready {} after the call; its DaemonSet pod Ready {} later",
        node.name,
        secs(ready),
        secs(to_pod)
    ));

    let t1 = Instant::now();
    cluster
        .remove_node(&node.name)
        .await
        .expect("removing the node");
    let removed = t1.elapsed();
    assert!(cluster.node(&node.name).is_none());
    assert!(
        Api::<Node>::all(client.clone())
            .get_opt(&node.name)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !marklb_tests::netns::netns_path(&node.netns).exists(),
        "its network namespace is gone"
    );
    assert!(
        !Path::new("/sys/fs/cgroup/memory").join(&node.name).exists(),
        "its cgroups are gone"
    );
    let (_, pods_gone) = wait_pods(
        &client,
        &ns.name,
        "the removed node's pods to go",
        Duration::from_secs(150),
        |p| p.is_empty(),
    )
    .await;
    report(&format!(
        "figure: remove_node {} (processes, namespaces, Node object); its pods deleted {} later (PodGC)",
        secs(removed),
        secs(pods_gone)
    ));
}

#[tokio::test]
async fn a_stopped_kubelet_turns_its_node_not_ready_within_the_grace_period() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.expect("client");
    let node = cluster
        .add_node(NodeOptions::labelled(&[("marklb.io/kubelet-stops", "yes")]))
        .await
        .expect("adding a node");
    let api: Api<Node> = Api::all(client.clone());
    let t0 = Instant::now();
    cluster
        .stop_kubelet(&node.name)
        .expect("stopping the kubelet");
    let limit = NODE_GRACE + Duration::from_secs(10);
    let status = loop {
        let n = api.get(&node.name).await.expect("the Node");
        let s = node_condition(&n, "Ready").unwrap_or_default();
        if s != "True" {
            break s;
        }
        assert!(
            t0.elapsed() < limit,
            "{} still Ready {limit:?} after its kubelet stopped (grace {NODE_GRACE:?})",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = t0.elapsed();
    assert_eq!(
        status, "Unknown",
        "the controller marks a silent node's Ready Unknown"
    );
    for other in base_nodes(cluster) {
        assert!(
            node_ready(&api.get(&other.name).await.unwrap()),
            "{} stays Ready",
            other.name
        );
    }
    report(&format!(
        "figure: kubelet of {} stopped -> node NotReady (Ready=Unknown) {} later (grace period {}s)",
        node.name,
        secs(took),
        NODE_GRACE.as_secs()
    ));
    cluster
        .remove_node(&node.name)
        .await
        .expect("removing the node");
}
