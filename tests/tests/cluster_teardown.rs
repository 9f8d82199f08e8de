//! The one-node cluster leaves nothing behind on the host: not when it is stopped, not when
//! the process that runs it is interrupted (SIGINT), and not when that process is killed
//! (SIGKILL: `marklb-cluster down`, i.e. `make cluster-down`, undoes it from the record).
//!
//! Each test captures [`HostState`] (iptables of both families, the sysctls kubelet,
//! kube-proxy and CNI change, host directories, mounts, cgroups, processes, links, addresses
//! on lo, the bpffs) before the cluster starts, checks that the running cluster with workloads
//! (a pod on the CNI bridge with a host port, a Service, the agent DaemonSet pinning its
//! datapath) changed it in all those places (so the comparison can fail), and that it is
//! back to the same after.
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
        self, Availability, CNI_BRIDGE, Cluster, ClusterOptions, HostState, MachineLock, NODE_IP,
        NodeTopology, Record, render,
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
                "SKIP {test}: one-node cluster not available: {why}"
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

/// What a running cluster must have changed, so the before/after comparison means something.
fn assert_changed(diff: &[String], pins: Option<&str>) {
    let has = |needle: &str| diff.iter().any(|d| d.contains(needle));
    let mut want = vec![
        "KUBE-SERVICES",
        "KUBE-FIREWALL",
        "CNI-HOSTPORT-DNAT",
        "\"/var/log/pods\"",
        "\"/var/lib/cni\"",
        "\"kubepods\"",
        "containerd-shim-runc-v2",
        "kubelet",
        CNI_BRIDGE,
        "10.203.255.1/32",
        "mount: new",
        "net/ipv4/ip_forward",
        "route_localnet",
    ];
    if let Some(p) = pins {
        want.push(p);
    }
    let missing: Vec<&&str> = want.iter().filter(|w| !has(w)).collect();
    assert!(
        missing.is_empty(),
        "the running cluster should show {missing:?} in the host state; the diff was:\n{}",
        diff.join("\n")
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
            detached: false,
        },
        lock,
    )
    .expect("starting the cluster");
    start_workload(c.kubeconfig(), &images.pause.name);

    // The agent DaemonSet on a veth of the node: its datapath is pinned in the bpffs.
    let topo = NodeTopology::build(TopologyOptions::default()).expect("topology");
    let client = c.client().await.expect("client");
    let vars = [
        ("NAMESPACE", "teardown".to_string()),
        ("IMAGE", images.agent.name.clone()),
        ("INTERFACE", topo.iface.clone()),
        (
            "METRICS_PORT",
            TcpListener::bind((NODE_IP, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .to_string(),
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
        apply_value(&client, &v, "teardown-test").await.expect(f);
    }
    let pins = Path::new(cluster::BPFFS).join("marklb").join(&topo.iface);
    let deadline = Instant::now() + Duration::from_secs(60);
    while topo.xdp_prog_id().is_none() || !pins.join("xdp_link").exists() {
        assert!(Instant::now() < deadline, "the agent pod did not attach");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(topo);

    let running = HostState::capture().diff(&before);
    assert_changed(&running, Some(&pins.display().to_string()));
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

/// `marklb-cluster up --foreground`, started; returns it and its kubeconfig once READY.
fn cli_up() -> (Child, PathBuf) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_marklb-cluster"))
        .args(["up", "--foreground"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("marklb-cluster up --foreground");
    let out = child.stdout.take().unwrap();
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
    assert_changed(&running, None);
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let st = wait_exit(&mut child, Duration::from_secs(120));
    report(&format!("{test}: marklb-cluster after SIGINT: {st}"));
    assert_same(&before, "after SIGINT");

    // SIGKILL: nothing runs the undo; the record stays, `marklb-cluster down` undoes it.
    wait_unlocked();
    let before = HostState::capture();
    let (mut child, kc) = cli_up();
    start_workload(&kc, &pause);
    child.kill().unwrap();
    wait_exit(&mut child, Duration::from_secs(30));
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
