//! `marklb-cluster`: the tests' one-node Kubernetes cluster, by hand (`make cluster-up`,
//! `make cluster-down`).
//!
//! ```text
//! marklb-cluster up               start it and leave it running (detached); print how to use it
//! marklb-cluster up --foreground  start it, stop it on SIGINT/SIGTERM (prints READY <kubeconfig>)
//! marklb-cluster down             stop it and undo everything it changed on the host
//! marklb-cluster status           say whether one runs
//! ```

use std::time::Duration;

use anyhow::{Result, bail};
use marklb_tests::cluster::{
    self, Cluster, ClusterOptions, MachineLock, NODE_IP, NODE_NAME, Record, images,
};

fn usage() -> ! {
    eprintln!("usage: marklb-cluster up [--foreground] | down | status");
    std::process::exit(2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["up"] => up(false),
        ["up", "--foreground"] => up(true),
        ["down"] => down(),
        ["status"] => status(),
        _ => usage(),
    }
}

fn up(foreground: bool) -> Result<()> {
    if let cluster::Availability::Unavailable(why) = cluster::availability()? {
        bail!("the one-node cluster cannot run on this machine: {why}");
    }
    eprintln!("building the images (scripts/image/build.sh) ...");
    let images = images()?;
    eprintln!("starting the cluster ...");
    let c = Cluster::start(ClusterOptions {
        pause: images.pause.clone(),
        images: vec![images.agent.clone()],
        detached: !foreground,
    })?;
    let kubectl = c.binaries().kubectl.display().to_string();
    println!(
        "marklb one-node cluster: node {NODE_NAME} Ready in {:.1}s (Kubernetes v1.20.2, {})",
        c.times().total.as_secs_f64(),
        c.api_url()
    );
    println!("  export KUBECONFIG={}", c.kubeconfig().display());
    println!("  alias kubectl={kubectl}    # kubectl 1.20.2, matching the server");
    println!("  kubectl get nodes -o wide");
    println!(
        "  images in the node's containerd (use imagePullPolicy: Never): {} {}",
        images.agent.name, images.pause.name
    );
    println!(
        "  node address {NODE_IP} (on lo); host network pods see the host's interfaces; bpffs {}",
        cluster::BPFFS
    );
    println!("  logs: {}/logs/", c.dir().display());
    if foreground {
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
            "stopped the cluster in {} and undid its changes",
            rec.dir.display()
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
            println!(
                "cluster in {}: {alive} of {} processes running; {}; export KUBECONFIG={}",
                rec.dir.display(),
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
