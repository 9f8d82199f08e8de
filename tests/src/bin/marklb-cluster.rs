//! `marklb-cluster`: the tests' Kubernetes cluster, by hand (`make cluster-up NODES=3`,
//! `make cluster-down`).
//!
//! ```text
//! marklb-cluster up [--nodes N] [--node-labels [I:]K=V[,K=V...]]... [--foreground]
//!         start it (N nodes, default 2) and leave it running (detached); print how to use it.
//!         --node-labels without I labels every node, with I (1-based) node I only.
//!         --foreground: stop it on SIGINT/SIGTERM instead (prints READY <kubeconfig>)
//! marklb-cluster down     stop it and undo everything it changed on the host
//! marklb-cluster status   say whether one runs
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use marklb_tests::cluster::{
    self, Cluster, ClusterOptions, DEFAULT_NODES, MAX_NODES, MachineLock, NodeOptions, Record,
    images,
};

fn usage() -> ! {
    eprintln!(
        "usage: marklb-cluster up [--nodes N] [--node-labels [I:]K=V[,K=V...]]... [--foreground] | down | status"
    );
    std::process::exit(2)
}

/// What `up` was asked for.
#[derive(Debug, PartialEq, Eq)]
struct Up {
    nodes: Vec<NodeOptions>,
    foreground: bool,
}

/// Parses the arguments after `up`.
fn parse_up(args: &[String]) -> Result<Up> {
    let mut count = DEFAULT_NODES;
    let mut labels: Vec<(Option<usize>, String, String)> = Vec::new();
    let mut foreground = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--foreground" => foreground = true,
            "--nodes" => {
                let v = it.next().context("--nodes needs a number")?;
                count = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_NODES).contains(n))
                    .with_context(|| format!("--nodes takes 1 to {MAX_NODES}, not {v:?}"))?;
            }
            "--node-labels" => {
                let v = it.next().context("--node-labels needs [I:]K=V[,K=V...]")?;
                let (node, list) = match v.split_once(':') {
                    Some((i, rest)) if i.chars().all(|c| c.is_ascii_digit()) => {
                        (Some(i.parse::<usize>()?), rest)
                    }
                    _ => (None, v.as_str()),
                };
                for kv in list.split(',') {
                    let (k, v) = kv
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .with_context(|| format!("--node-labels: {kv:?} is not KEY=VALUE"))?;
                    labels.push((node, k.to_string(), v.to_string()));
                }
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let mut nodes = vec![NodeOptions::default(); count];
    for (node, k, v) in labels {
        match node {
            None => nodes.iter_mut().for_each(|n| {
                n.labels.insert(k.clone(), v.clone());
            }),
            Some(i) if (1..=count).contains(&i) => {
                nodes[i - 1].labels.insert(k, v);
            }
            Some(i) => bail!("--node-labels names node {i}, the cluster has {count}"),
        }
    }
    Ok(Up { nodes, foreground })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => up(parse_up(&args[1..]).unwrap_or_else(|e| {
            eprintln!("marklb-cluster: {e:#}");
            usage()
        })),
        Some("down") if args.len() == 1 => down(),
        Some("status") if args.len() == 1 => status(),
        _ => usage(),
    }
}

fn up(opts: Up) -> Result<()> {
    if let cluster::Availability::Unavailable(why) = cluster::availability()? {
        bail!("the test cluster cannot run on this machine: {why}");
    }
    eprintln!("building the images (scripts/image/build.sh) ...");
    let images = images()?;
    eprintln!("starting the cluster ({} nodes) ...", opts.nodes.len());
    let c = Cluster::start(ClusterOptions {
        pause: images.pause.clone(),
        images: vec![images.agent.clone()],
        nodes: opts.nodes,
        detached: !opts.foreground,
    })?;
    let kubectl = c.binaries().kubectl.display().to_string();
    println!(
        "marklb test cluster: {} nodes {} (Kubernetes v1.20.2, {})",
        c.nodes().len(),
        c.times(),
        c.api_url()
    );
    println!("  export KUBECONFIG={}", c.kubeconfig().display());
    println!("  alias kubectl={kubectl}    # kubectl 1.20.2, matching the server");
    println!("  kubectl get nodes -o wide");
    for n in c.nodes() {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  {}: {} on {} in network namespace {} (ip netns exec {} ...); bpffs {}{}",
            n.name,
            n.ip,
            n.iface,
            n.netns,
            n.netns,
            n.bpffs.display(),
            if labels.is_empty() {
                String::new()
            } else {
                format!("; labels {}", labels.join(","))
            }
        );
    }
    println!(
        "  images in every node's containerd (use imagePullPolicy: Never): {} {}",
        images.agent.name, images.pause.name
    );
    println!("  logs: {}/logs/", c.dir().display());
    if opts.foreground {
        println!("READY {}", c.kubeconfig().display());
        println!("  stop: Ctrl-C (or SIGTERM)");
        // The signal handlers stop the cluster and end the process.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("  stop: make cluster-down");
    std::mem::forget(c);
    Ok(())
}

fn down() -> Result<()> {
    let Some(rec) = Record::load()? else {
        println!("no marklb cluster is recorded on this machine");
        return Ok(());
    };
    if let Some(owner) = &rec.owner
        && cluster::proc_alive(owner)
    {
        bail!(
            "the cluster in {} belongs to the running process {} (a test): it stops it itself",
            rec.dir.display(),
            owner.pid
        );
    }
    let _lock = MachineLock::acquire(Duration::from_secs(10))?;
    let problems = cluster::teardown(&rec);
    let _ = std::fs::remove_file(cluster::base_dir().join("current.json"));
    if problems.is_empty() {
        println!(
            "stopped the cluster in {} ({} nodes) and undid its changes",
            rec.dir.display(),
            rec.nodes.len()
        );
        Ok(())
    } else {
        bail!("stopped the cluster, but these were left: {problems:#?}")
    }
}

fn status() -> Result<()> {
    match Record::load()? {
        None => println!("no marklb cluster is recorded on this machine"),
        Some(rec) => {
            let alive = rec.procs.iter().filter(|p| cluster::proc_alive(p)).count();
            let nodes: Vec<&str> = rec.nodes.iter().map(|n| n.name.as_str()).collect();
            println!(
                "cluster in {}: nodes {}; {alive} of {} processes running; {}; export KUBECONFIG={}",
                rec.dir.display(),
                nodes.join(", "),
                rec.procs.len(),
                match &rec.owner {
                    Some(o) if cluster::proc_alive(o) => format!("owned by pid {}", o.pid),
                    Some(o) => format!(
                        "its owner (pid {}) is gone: `make cluster-down` undoes it",
                        o.pid
                    ),
                    None => "detached (make cluster-up)".into(),
                },
                rec.kubeconfig.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn up_takes_a_node_count_and_labels_for_all_or_one_node() {
        let u = parse_up(&args(
            "--nodes 3 --node-labels zone=a --node-labels 2:marklb.io/lb=true,x=y",
        ))
        .unwrap();
        assert_eq!(u.nodes.len(), 3);
        assert!(!u.foreground);
        assert_eq!(u.nodes[0], NodeOptions::labelled(&[("zone", "a")]));
        assert_eq!(
            u.nodes[1],
            NodeOptions::labelled(&[("zone", "a"), ("marklb.io/lb", "true"), ("x", "y")])
        );
        assert_eq!(parse_up(&[]).unwrap().nodes.len(), DEFAULT_NODES);
    }

    #[test]
    fn bad_up_arguments_are_refused() {
        for bad in [
            "--nodes 0",
            "--nodes 99",
            "--nodes",
            "--node-labels 4:a=b",
            "--node-labels novalue",
            "--node-labels =v",
            "--what",
        ] {
            assert!(parse_up(&args(bad)).is_err(), "{bad}");
        }
    }
}
