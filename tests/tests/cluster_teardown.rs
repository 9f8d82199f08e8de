//! The cluster (two nodes, a third added and removed while it runs) leaves nothing behind on
//! the host: not when it is stopped, not when the process that runs it is interrupted
//! (SIGINT), and not when that process is killed (SIGKILL: `marklb-cluster down`, i.e.
//! `make cluster-down`, undoes it from the record); nor does a node removed from a running
//! cluster.
//!
//! Each test captures [`HostState`] (iptables of both families, sysctls, the host directories
//! kubelet and containerd use, named network namespaces, mounts, cgroups, processes, links,
//! addresses on lo, the host's bpffs and its pins) before the cluster starts, checks that the
//! running cluster with workloads (a pod on a node's CNI bridge with a host port, a Service,
//! the agent DaemonSet pinning its datapath) changed the host where a node must (its network
//! namespace, cgroup root, veth, processes, kubelet's machine-wide sysctls: so the comparison
//! can fail) and nowhere a node must not (iptables, the contents of `/var/log/pods` and the
//! other node-private directories, the host's pins), and that it is back to the same after.
//!
//! Needs root; prints SKIP with the reason when the machine cannot run the cluster.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use marklb_tests::{
    agent_proc::Manifest,
    cluster::{
        self, Availability, Cluster, ClusterOptions, HOST_PATHS, HostState, MachineLock,
        NODES_BRIDGE, NodeOptions, NodeTopology, Record, node::PRIVATE_DIRS, render,
    },
    kube_harness::{apply_value, report, yaml_documents},
    netns::TopologyOptions,
};
use serde_json::Value;

/// One test at a time: each compares the whole host before and after.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn can_run(test: &str) -> bool {
    match cluster::availability().unwrap_or_else(|e| panic!("{e:#}")) {
        Availability::Available(_) => true,
        Availability::Unavailable(why) => {
            if std::env::var(cluster::REQUIRED_ENV).as_deref() == Ok("1") {
                panic!("{test}: the cluster cannot run here: {why}");
            }
            report(&format!(
                "SKIP {test}: the test cluster is not available: {why}"
            ));
            false
        }
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let kc = cluster::availability()
        .ok()
        .and_then(|a| match a {
            Availability::Available(b) => Some(b.kubectl),
            Availability::Unavailable(_) => None,
        })
        .expect("kubectl");
    let mut cmd = Command::new(kc);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    marklb_tests::netns::run_command(&mut cmd, stdin, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
  labels: {app: web}
spec:
  containers:
    - name: web
      image: ${PAUSE}
      imagePullPolicy: Never
      ports:
        - containerPort: 8080
          hostPort: ${HOST_PORT}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector: {app: web}
  ports:
    - port: 80
      targetPort: 8080
"#;

/// A pod on the CNI bridge (with a host port: portmap), a Service (kube-proxy's chains);
/// waits until the pod runs.
fn start_workload(kubeconfig: &Path, pause: &str) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let yaml = render(
        WORKLOAD,
        &[
            ("PAUSE", pause.to_string()),
            ("HOST_PORT", port.to_string()),
        ],
    )
    .unwrap();
    kubectl(kubeconfig, &["apply", "-f", "-"], Some(&yaml));
    kubectl(
        kubeconfig,
        &["wait", "--for=condition=Ready", "pod/web", "--timeout=60s"],
        None,
    );
}

/// What a running cluster of `nodes` nodes must have changed on the host, so the before/after
/// comparison means something; and what it must not have changed (each node's own network and
/// mount namespaces keep it off the host).
fn assert_changed(diff: &[String], nodes: usize) {
    let has = |needle: &str| diff.iter().any(|d| d.contains(needle));
    let mut want = vec![
        "containerd-shim-runc-v2".to_string(),
        "kubelet".into(),
        "kube-proxy".into(),
        format!("link: new \"{NODES_BRIDGE}\""),
        "sysctl /proc/sys/".into(),
    ];
    for i in 1..=nodes {
        want.push(format!("netns: new \"marklb-node-{i}\""));
        want.push(format!("link: new \"mlbh{i}\""));
        want.push(format!("new \"marklb-node-{i}\"")); // the cgroup root
    }
    let missing: Vec<&String> = want.iter().filter(|w| !has(w)).collect();
    assert!(
        missing.is_empty(),
        "the running cluster should show {missing:?} in the host state; the diff was:\n{}",
        diff.join("\n")
    );
    // The node-private directories' mount points may be made (empty) on the host; nothing may
    // appear below them or elsewhere in the host directories.
    let mount_point = |d: &str| {
        PRIVATE_DIRS
            .iter()
            .any(|(target, _)| d == format!("path: new \"{target}\""))
    };
    let private = |d: &&String| {
        d.starts_with("iptables")
            || d.starts_with("pin:")
            || d.starts_with("bpffs")
            || d.starts_with("address on lo")
            || (HOST_PATHS.iter().any(|p| d.contains(&format!("\"{p}/"))) && !mount_point(d))
            || (d.starts_with("sysctl /proc/sys/net/"))
            || (d.starts_with("link:") && d.contains("mlbcni"))
    };
    let leaked: Vec<&String> = diff.iter().filter(private).collect();
    assert!(
        leaked.is_empty(),
        "the nodes' own namespaces should keep these off the host: {leaked:#?}"
    );
}

fn assert_same(before: &HostState, what: &str) {
    let diff = HostState::capture().diff(before);
    assert!(
        diff.is_empty(),
        "{what}: the host differs from before the cluster started:\n{}",
        diff.join("\n")
    );
}

#[tokio::test]
async fn stopping_the_cluster_leaves_nothing_behind() {
    let test = "cluster_teardown::stopping_the_cluster_leaves_nothing_behind";
    if !can_run(test) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let images = cluster::images().expect("images");
    let lock = MachineLock::acquire(Duration::from_secs(900)).expect("machine lock");
    let before = HostState::capture();
    let c = Cluster::start_with_lock(
        ClusterOptions {
            pause: images.pause.clone(),
            images: vec![images.agent.clone()],
            nodes: vec![NodeOptions::default(); 2],
            detached: false,
        },
        lock,
    )
    .expect("starting the cluster");
    start_workload(&c.kubeconfig(), &images.pause.name);

    // A third node joins and leaves: nothing of it may stay on the host.
    let with_two = HostState::capture();
    let third = c
        .add_node(NodeOptions::default())
        .await
        .expect("adding a node");
    let grown = HostState::capture().diff(&with_two);
    assert!(
        grown
            .iter()
            .any(|d| d.contains(&format!("netns: new \"{}\"", third.name))),
        "the added node shows on the host: {grown:#?}"
    );
    c.remove_node(&third.name).await.expect("removing the node");
    let left = HostState::capture().diff(&with_two);
    assert!(
        left.iter()
            .all(|d| !d.contains(&third.name) && !d.contains("mlbh3")),
        "the removed node left: {left:#?}"
    );

    // The agent DaemonSet on a veth of node 2: its datapath is pinned in node 2's bpffs.
    let node = c.nth_node(2);
    let topo = NodeTopology::build(&node, TopologyOptions::default()).expect("topology");
    let client = c.client().await.expect("client");
    let vars = [
        ("NAMESPACE", "teardown".to_string()),
        ("IMAGE", images.agent.name.clone()),
        ("INTERFACE", topo.iface.clone()),
        (
            "METRICS_PORT",
            node.free_port().expect("a port").to_string(),
        ),
    ];
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/agent-daemonset"
    ));
    for f in ["namespace.yaml", "configmap.yaml", "daemonset.yaml"] {
        let text = render(&std::fs::read_to_string(dir.join(f)).unwrap(), &vars).unwrap();
        let mut v = yaml_documents(&text).unwrap().remove(0);
        if f == "configmap.yaml" {
            v["data"]["lb.yaml"] = Value::from(Manifest::for_topology(&topo, 80, 53).to_yaml());
        }
        if f == "daemonset.yaml" {
            v["spec"]["template"]["spec"]["nodeSelector"] =
                serde_json::json!({ "kubernetes.io/hostname": node.name });
        }
        apply_value(&client, &v, "teardown-test").await.expect(f);
    }
    let pins = node.pins(&topo.iface);
    let deadline = Instant::now() + Duration::from_secs(60);
    while topo.xdp_prog_id().is_none() || !pins.join("xdp_link").exists() {
        assert!(Instant::now() < deadline, "the agent pod did not attach");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(topo);

    let running = HostState::capture().diff(&before);
    assert_changed(&running, 2);
    report(&format!(
        "{test}: the running cluster changed {} things on the host",
        running.len()
    ));

    let t0 = Instant::now();
    let (problems, lock) = c.stop_keep_lock();
    report(&format!(
        "figure: cluster stop and undo {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    assert!(problems.is_empty(), "stopping left: {problems:#?}");
    assert_same(&before, "after stop");
    assert!(Record::load().unwrap().is_none(), "the record is removed");
    drop(lock);
}

/// `marklb-cluster up --foreground` as a child process. Dropped while it still runs (a failed
/// assertion), it is interrupted and waited for, so the cluster it runs is stopped and undone
/// before the next test wants the machine.
struct CliCluster(Child);

impl Drop for CliCluster {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of our child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(120);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `marklb-cluster up --foreground`, started; returns it and its kubeconfig once READY.
fn cli_up() -> (CliCluster, PathBuf) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_marklb-cluster"))
        .args(["up", "--foreground"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("marklb-cluster up --foreground");
    let out = child.stdout.take().unwrap();
    let child = CliCluster(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(kc) = line.strip_prefix("READY ") {
                let _ = tx.send(PathBuf::from(kc));
            }
        }
    });
    let kc = rx
        .recv_timeout(Duration::from_secs(600))
        .expect("marklb-cluster did not report READY");
    (child, kc)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "marklb-cluster did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_unlocked() {
    drop(MachineLock::acquire(Duration::from_secs(900)).expect("machine lock"));
}

#[test]
fn an_interrupted_or_killed_cluster_is_undone() {
    let test = "cluster_teardown::an_interrupted_or_killed_cluster_is_undone";
    if !can_run(test) {
        return;
    }
    let _serial = SERIAL.blocking_lock();
    let pause = cluster::images().expect("images").pause.name;

    // SIGINT (Ctrl-C): the process stops the cluster and undoes everything, then exits.
    wait_unlocked();
    let before = HostState::capture();
    let (mut child, kc) = cli_up();
    start_workload(&kc, &pause);
    let running = HostState::capture().diff(&before);
    assert_changed(&running, cluster::DEFAULT_NODES);
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    let st = wait_exit(&mut child.0, Duration::from_secs(120));
    report(&format!("{test}: marklb-cluster after SIGINT: {st}"));
    assert_same(&before, "after SIGINT");

    // SIGKILL: nothing runs the undo; the record stays, `marklb-cluster down` undoes it.
    wait_unlocked();
    let before = HostState::capture();
    let (mut child, kc) = cli_up();
    start_workload(&kc, &pause);
    child.0.kill().unwrap();
    wait_exit(&mut child.0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let left = HostState::capture().diff(&before);
    assert!(
        left.iter().any(|d| d.contains("containerd-shim-runc-v2")),
        "after SIGKILL the shims and pods outlive the cluster's process (else this checks nothing): {left:#?}"
    );
    let rec = Record::load()
        .unwrap()
        .expect("the record survives SIGKILL");
    assert!(rec.owner_gone());
    let out = Command::new(env!("CARGO_BIN_EXE_marklb-cluster"))
        .arg("down")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "marklb-cluster down: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&before, "after SIGKILL + marklb-cluster down");
}
