//! The standalone source of desired state: LoadBalancer manifests (the YAML a user would
//! `kubectl apply`) in one file, which may hold several documents, or in a directory (every
//! `*.yaml` / `*.yml` file, in name order). Re-read when the content changes and on SIGHUP.
//!
//! - The manifests are one unit: a bad document, a LoadBalancer defined twice, one asking
//!   for another interface, or none at all, and the whole read is rejected; the last good
//!   state keeps serving. A read that changes is acted on only once two reads a moment apart
//!   agree (a file written in place may be caught half-way).
//! - Several LoadBalancers are merged in the order they appear (files by name, documents in
//!   file order): the earlier one keeps a contested VIP or node-wide setting, the later one is
//!   left out whole and reported (log, `marklb_loadbalancers{state="conflict"}`, `/status`).
//!   `metadata.creationTimestamp` is not used: order in the files is what the user controls.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use marklb_crds::manifest::from_yaml_manifests;

use crate::{
    desired::{MarkPolicy, Owner, OwnerDesired, OwnerVerdict, merge},
    metrics::Metrics,
    node::Node,
};

/// The text of every manifest file, by path: what is compared to notice a change.
type Snapshot = Vec<(PathBuf, String)>;

/// Manifests read and resolved, in merge order.
#[derive(Debug)]
pub struct Loaded {
    pub parts: Vec<OwnerDesired>,
}

impl Loaded {
    /// The interface the manifests ask for (the first that names one).
    pub fn interface(&self) -> Option<String> {
        self.parts.iter().find_map(|p| p.settings.interface.clone())
    }

    /// The mark policy of the first LoadBalancer that would be served.
    pub fn mark_policy(&self) -> Option<MarkPolicy> {
        self.parts
            .iter()
            .find(|p| !p.vips.is_empty())
            .or(self.parts.first())
            .map(|p| p.settings.marks)
    }
}

fn is_manifest(p: &Path) -> bool {
    p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Every manifest file's text (a file, or a directory's manifests by name).
fn read_snapshot(path: &Path) -> Result<Snapshot> {
    if !path.is_dir() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(vec![(path.to_path_buf(), text)]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            Ok((f, text))
        })
        .collect()
}

/// Parses, validates and resolves every LoadBalancer of `snapshot`.
fn resolve(path: &Path, snapshot: &Snapshot) -> Result<Loaded> {
    let mut parts: Vec<OwnerDesired> = Vec::new();
    for (file, text) in snapshot {
        let lbs = from_yaml_manifests(text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        for lb in lbs {
            let owner = Owner::new(
                lb.metadata.namespace.clone().unwrap_or_default(),
                lb.metadata.name.clone().unwrap_or_default(),
            );
            if parts.iter().any(|p| p.owner == owner) {
                bail!(
                    "{}: LoadBalancer {owner} is defined more than once",
                    file.display()
                );
            }
            let part = OwnerDesired::from_spec(owner, &lb.spec)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            parts.push(part);
        }
    }
    if parts.is_empty() {
        bail!(
            "no LoadBalancer in {} (to serve nothing, write one with `spec: {{}}`)",
            path.display()
        );
    }
    Ok(Loaded { parts })
}

/// Reads and resolves the manifests at `path` now.
pub fn load(path: &Path) -> Result<Loaded> {
    resolve(path, &read_snapshot(path)?)
}

/// Polls the manifests and applies them to the node.
pub struct FileSource {
    path: PathBuf,
    /// What was read last (applied or rejected; `None`: unreadable), to notice changes.
    seen: Option<Option<Snapshot>>,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    /// Reads, validates and applies the manifests if they changed (always with `force`).
    /// Bad input changes nothing, and is reported once, not on every poll.
    pub async fn reload(&mut self, node: &mut Node, metrics: &Metrics, force: bool) {
        let snapshot = read_snapshot(&self.path).ok();
        if !force && self.seen.as_ref() == Some(&snapshot) {
            return;
        }
        // A file being written in place may be caught half-way: act on it only once two
        // reads a moment apart agree (ConfigMap volumes are swapped atomically anyway).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if read_snapshot(&self.path).ok() != snapshot {
            return; // still changing: the next poll looks again
        }
        self.seen = Some(snapshot.clone());
        match self.apply(node, snapshot).await {
            Ok(summary) => {
                metrics.reloads.with_label_values(&["success"]).inc();
                metrics.config_valid.set(1);
                tracing::info!(%summary, "configuration applied");
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                metrics.config_valid.set(0);
                tracing::error!(
                    error = format!("{e:#}"),
                    "configuration rejected; the last good state keeps serving"
                );
            }
        }
    }

    async fn apply(&mut self, node: &mut Node, snapshot: Option<Snapshot>) -> Result<String> {
        let loaded = match snapshot {
            Some(s) => resolve(&self.path, &s)?,
            // Unreadable: say why.
            None => load(&self.path)?,
        };
        let merged = merge(&loaded.parts, Some(node.interface()));
        let refused: Vec<String> = merged
            .order
            .iter()
            .filter_map(|o| match &merged.owners[o] {
                OwnerVerdict::Refused { reason } => Some(format!("LoadBalancer {o}: {reason}")),
                _ => None,
            })
            .collect();
        if !refused.is_empty() {
            bail!("{}", refused.join("; "));
        }
        let report = node.apply(&merged).await?;
        for o in &merged.order {
            if let Some(problem) = merged.owners[o].problem() {
                tracing::warn!(loadbalancer = %o, "not served: {problem}");
            }
        }
        Ok(report.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(name: &str, vip: &str) -> String {
        format!(
            "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata:\n  name: {name}\nspec:\n  \
             vips:\n    - address: \"{vip}\"\n      port: 80\n      backends:\n        - address: \"10.1.0.1\"\n"
        )
    }

    fn dir() -> tempfile_dir::Dir {
        tempfile_dir::Dir::new()
    }

    /// A scratch directory removed on drop (std only).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "marklb-file-source-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn owners(l: &Loaded) -> Vec<String> {
        l.parts.iter().map(|p| p.owner.to_string()).collect()
    }

    #[test]
    fn a_directory_is_read_in_name_order_and_other_files_are_ignored() {
        let d = dir();
        std::fs::write(d.0.join("b.yaml"), lb("second", "10.0.0.2")).unwrap();
        std::fs::write(d.0.join("a.yml"), lb("first", "10.0.0.1")).unwrap();
        std::fs::write(d.0.join("README"), "not yaml: [").unwrap();
        std::fs::create_dir(d.0.join("sub.yaml")).unwrap();
        let l = load(&d.0).unwrap();
        assert_eq!(owners(&l), ["first", "second"]);
    }

    #[test]
    fn a_file_may_hold_several_loadbalancers_in_order() {
        let d = dir();
        let f = d.0.join("lbs.yaml");
        let text = format!("{}---\n{}", lb("web", "10.0.0.1"), lb("dns", "10.0.0.53"));
        std::fs::write(
            &f,
            text.replace("name: dns", "name: dns\n  namespace: infra"),
        )
        .unwrap();
        let l = load(&f).unwrap();
        assert_eq!(owners(&l), ["web", "infra/dns"]);
    }

    #[test]
    fn bad_input_is_refused_whole_and_named() {
        let d = dir();
        let f = d.0.join("lbs.yaml");
        let twice = format!("{}---\n{}", lb("web", "10.0.0.1"), lb("web", "10.0.0.2"));
        std::fs::write(&f, twice).unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(
            e.contains("LoadBalancer web is defined more than once"),
            "{e}"
        );
        let bad = format!("{}---\n{}", lb("a", "10.0.0.1"), lb("b", "10.0.0.300"));
        std::fs::write(&f, bad).unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(
            e.contains("lbs.yaml: document 2") && e.contains("10.0.0.300"),
            "{e}"
        );
        std::fs::write(&f, "# nothing here\n").unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(e.contains("no LoadBalancer in"), "{e}");
        let empty = dir();
        assert!(format!("{:#}", load(&empty.0).unwrap_err()).contains("no LoadBalancer in"));
        let e = format!("{:#}", load(&d.0.join("missing.yaml")).unwrap_err());
        assert!(e.contains("missing.yaml"), "{e}");
    }

    #[test]
    fn the_interface_and_mark_policy_come_from_the_first_that_says() {
        let d = dir();
        let f = d.0.join("lbs.yaml");
        let second = lb("b", "10.0.0.2").replace("spec:\n", "spec:\n  interface: eth3\n");
        std::fs::write(&f, format!("{}---\n{second}", lb("a", "10.0.0.1"))).unwrap();
        let l = load(&f).unwrap();
        assert_eq!(l.interface().as_deref(), Some("eth3"));
        assert_eq!(l.mark_policy().unwrap().capacity, 65_535);
    }
}
