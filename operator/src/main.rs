//! `marklb-operator`: `run` reconciles LoadBalancers (controller + HTTP endpoints, joined; with
//! leader election unless `--no-leader-election`); `manifests` prints the install manifests
//! (RBAC, ServiceAccounts, Deployment) for the given flags.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Toleration;
use marklb_operator::http::Shared;
use marklb_operator::leader::{LeaseSettings, run_when_leader};
use marklb_operator::manifests::{self, OPERATOR_NAME, OperatorDeployment};
use marklb_operator::services::request::ClassPolicy;
use marklb_operator::{AgentSettings, MetricsBind, ServiceSettings, Settings};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "marklb-operator",
    version,
    about = "marklb operator: LoadBalancers to node states, agents and conditions"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile LoadBalancers (in a cluster, or with the kubeconfig of KUBECONFIG).
    Run(RunArgs),
    /// Print the manifests that install the operator (CRDs: crds/yaml).
    Manifests {
        #[command(flatten)]
        common: CommonArgs,
        /// Operator image.
        #[arg(long, default_value = "marklb-operator:dev")]
        image: String,
        /// imagePullPolicy of the operator.
        #[arg(long, default_value = "IfNotPresent")]
        image_pull_policy: String,
        /// Replicas of the operator Deployment.
        #[arg(long, default_value_t = 2)]
        replicas: i32,
        /// Port of the operator's /metrics, /healthz, /readyz.
        #[arg(long, default_value_t = 8080)]
        metrics_port: u16,
    },
}

/// Flags shared by `run` and `manifests` (what the operator's settings are).
#[derive(Args)]
struct CommonArgs {
    /// Namespace of the operator, its Lease and the agent DaemonSet.
    #[arg(long, env = "POD_NAMESPACE", default_value = "marklb-system")]
    namespace: String,
    /// Agent image.
    #[arg(long, default_value = "marklb-agent:dev")]
    agent_image: String,
    /// imagePullPolicy of the agent.
    #[arg(long, default_value = "IfNotPresent")]
    agent_image_pull_policy: String,
    /// Agent --hw-backend.
    #[arg(long, value_parser = ["auto", "mellanox", "emulated", "none"], default_value = "auto")]
    agent_hw_backend: String,
    /// Agent --mark-delivery (default: the agent's).
    #[arg(long, value_parser = ["xdp-metadata", "skb-mark"])]
    agent_mark_delivery: Option<String>,
    /// Agent --xdp-mode (default: the agent's, auto).
    #[arg(long, value_parser = ["auto", "native", "generic"])]
    agent_xdp_mode: Option<String>,
    /// Port of the agents' metrics (host network).
    #[arg(long, default_value_t = 9464)]
    agent_metrics_port: u16,
    /// Address the agents bind /metrics, /healthz, /readyz to: host-ip (the node's InternalIP)
    /// or all (0.0.0.0, every interface of the node, the client-facing one included).
    #[arg(long, value_parser = ["host-ip", "all"], default_value = "host-ip")]
    agent_metrics_bind: String,
    /// Tolerations of the agent pods, as a JSON list of Kubernetes tolerations.
    #[arg(long, value_parser = parse_tolerations, default_value = r#"[{"operator":"Exists"}]"#)]
    agent_tolerations: Tolerations,
    /// RUST_LOG of the agents.
    #[arg(long, default_value = "info")]
    agent_log_level: String,
    /// Seconds a deleted LoadBalancer waits for its agents to remove its VIPs.
    #[arg(long, default_value_t = 30)]
    cleanup_timeout: u64,
    /// Seconds a newly selected node may go without an agent pod before its LoadBalancers say
    /// AgentNotScheduled (the DaemonSet controller creates the pod a moment later).
    #[arg(long, default_value_t = 15)]
    agent_pod_grace: u64,
    /// Do not serve Services of type LoadBalancer.
    #[arg(long)]
    no_services: bool,
    /// The spec.loadBalancerClass (or annotation marklb.io/load-balancer-class on clusters
    /// without the field) of the Services marklb serves.
    #[arg(long, default_value = marklb_operator::services::DEFAULT_CLASS)]
    service_class: String,
    /// Also serve Services of type LoadBalancer without any class (as MetalLB does).
    #[arg(long)]
    serve_unclassed_services: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "marklb-operator")]
    identity: String,
    /// Seconds a leader stays leader without renewing its Lease.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Do not apply the agent and decapsulator DaemonSets (deployed some other way).
    #[arg(long)]
    no_daemonset: bool,
    /// The operator's ServiceAccount (in --namespace), made the owner of the DaemonSets the
    /// operator applies so that uninstalling deletes them (the manifests set it from the
    /// downward API); empty: no owner.
    #[arg(long, env = "OPERATOR_SERVICE_ACCOUNT", default_value = "")]
    owner_service_account: String,
    /// Do not watch agent and decapsulator pods (no AgentNotScheduled reason, every node may
    /// be a real of a Service; no pod permissions needed).
    #[arg(long)]
    no_agent_pods: bool,
}

/// A JSON list of tolerations (a newtype: clap would read a bare `Vec` as a repeated flag).
#[derive(Clone, Debug)]
struct Tolerations(Vec<Toleration>);

fn parse_tolerations(s: &str) -> Result<Tolerations, String> {
    let usage = r#"a JSON list of tolerations, like [{"operator":"Exists"}]"#;
    let given: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("{usage}: {e}"))?;
    let parsed: Vec<Toleration> =
        serde_json::from_value(given.clone()).map_err(|e| format!("{usage}: {e}"))?;
    // serde ignores unknown keys: a misspelt one would silently tolerate nothing it meant to.
    let back = serde_json::to_value(&parsed).expect("tolerations serialize");
    if back != given {
        return Err(format!(
            "{usage}: unknown or misspelt fields in {given} (understood as {back})"
        ));
    }
    Ok(Tolerations(parsed))
}

impl CommonArgs {
    fn settings(&self) -> Settings {
        Settings {
            namespace: self.namespace.clone(),
            agent: AgentSettings {
                image: self.agent_image.clone(),
                image_pull_policy: self.agent_image_pull_policy.clone(),
                hw_backend: self.agent_hw_backend.clone(),
                mark_delivery: self.agent_mark_delivery.clone(),
                xdp_mode: self.agent_xdp_mode.clone(),
                metrics_port: self.agent_metrics_port,
                metrics_bind: MetricsBind::parse(&self.agent_metrics_bind)
                    .expect("clap checked the value"),
                tolerations: self.agent_tolerations.0.clone(),
                log_level: self.agent_log_level.clone(),
                ..AgentSettings::default()
            },
            cleanup_timeout: Duration::from_secs(self.cleanup_timeout),
            agent_pod_grace: Duration::from_secs(self.agent_pod_grace),
            services: ServiceSettings {
                enabled: !self.no_services,
                class: ClassPolicy {
                    class: self.service_class.clone(),
                    serve_unclassed: self.serve_unclassed_services,
                },
                ..ServiceSettings::default()
            },
            ..Settings::default()
        }
    }
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Colour only on a terminal (logs to files and pipes stay plain).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(ansi).init();
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client (in-cluster or KUBECONFIG)")?;
    let mut settings = args.common.settings();
    settings.manage_daemonset = !args.no_daemonset;
    settings.install_owner = Some(args.owner_service_account.clone()).filter(|n| !n.is_empty());
    settings.watch_agent_pods = !args.no_agent_pods;
    // The decapsulator DaemonSet and its pods follow the agent's flags.
    settings.services.manage_decap = !args.no_daemonset;
    settings.services.watch_decap_pods = !args.no_agent_pods;
    let shared = Arc::new(Shared::default());
    let http = marklb_operator::http::serve(args.metrics_addr, shared.clone());
    let work = async {
        if args.no_leader_election {
            shared.metrics.leader.set(1);
            marklb_operator::controller::run(
                client,
                settings,
                shared.clone(),
                args.identity.clone(),
                shutdown_signal(),
            )
            .await;
            Ok(())
        } else {
            let lease = LeaseSettings {
                name: OPERATOR_NAME.into(),
                identity: args.identity.clone(),
                duration_seconds: args.lease_duration,
                grace_seconds: (args.lease_duration / 3).max(1),
            };
            tokio::select! {
                r = run_when_leader(client, settings, lease, shared.clone()) => r,
                _ = shutdown_signal() => Ok(()),
            }
        }
    };
    tokio::select! {
        r = http => r.with_context(|| format!("serving on {}", args.metrics_addr)),
        r = work => r,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Manifests {
            common,
            image,
            image_pull_policy,
            replicas,
            metrics_port,
        } => {
            let objects = manifests::manifests(
                &common.settings(),
                &OperatorDeployment {
                    image,
                    image_pull_policy,
                    replicas,
                    metrics_port,
                },
            );
            print!("{}", manifests::to_yaml(&objects));
            Ok(())
        }
    }
}
