//! The configuration files of the node's components, as text: containerd (own root, state,
//! sockets; CRI settings this machine needs), the CNI network, kubelet and kube-proxy. Pure
//! functions of their inputs; the reasons for each setting are in the comments and the README.

use std::path::Path;

use super::{CNI_BRIDGE, NODE_IP, NODE_NAME, POD_CIDR};

/// What a containerd configuration names.
pub(crate) struct ContainerdPaths<'a> {
    /// The node's directory (containerd's root, state, opt, runc root, CNI config under it).
    pub dir: &'a Path,
    pub socket: &'a Path,
    pub runc: &'a Path,
    pub cni_bin: &'a Path,
}

/// containerd's configuration. The sandbox image is set here (kubelet's
/// `--pod-infra-container-image` is ignored for remote runtimes); `restrict_oom_score_adj`
/// because root here cannot lower `oom_score_adj` (every sandbox fails otherwise, with the
/// misleading "can't get final child's PID from pipe: EOF").
pub(crate) fn containerd(p: &ContainerdPaths, pause: &str) -> String {
    let d = p.dir;
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{d}/cni/net.d"
"#,
        root = d.join("containerd/root").display(),
        state = d.join("containerd/state").display(),
        sock = p.socket.display(),
        d = d.display(),
        runc = p.runc.display(),
        cni_bin = p.cni_bin.display(),
    )
}

/// The CNI network (bridge + host-local + portmap). Required even when every pod uses the
/// host's network: without one the node stays NotReady.
pub(crate) fn cni(ipam_dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "marklb-test",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{CNI_BRIDGE}",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{data}",
        "ranges": [[{{"subnet": "{POD_CIDR}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
        data = ipam_dir.display()
    )
}

/// kubelet's configuration file: cgroupfs, no swap check, a fast status loop (Ready in about
/// 13 s instead of 21 s), eviction thresholds that never fire on a test machine.
pub(crate) fn kubelet(port: u16, healthz: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{NODE_IP}"
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
cgroupDriver: cgroupfs
failSwapOn: false
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 3s
fileCheckFrequency: 20s
configMapAndSecretChangeDetectionStrategy: Watch
serializeImagePulls: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
clusterDomain: cluster.local
clusterDNS: ["10.96.0.10"]
"#
    )
}

/// kube-proxy's configuration file: iptables mode; conntrack left as the machine has it.
pub(crate) fn kube_proxy(kubeconfig: &Path, healthz: u16, metrics: u16) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: "{kc}"
mode: iptables
hostnameOverride: {NODE_NAME}
bindAddress: "{NODE_IP}"
healthzBindAddress: "127.0.0.1:{healthz}"
metricsBindAddress: "127.0.0.1:{metrics}"
clusterCIDR: "{POD_CIDR}"
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kc = kubeconfig.display(),
    )
}
