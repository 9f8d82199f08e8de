//! The project's container images for the cluster: OCI archives built by
//! `scripts/image/build.sh` (static musl release binaries, no container engine), imported into a
//! node's containerd with `ctr images import`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Images to import into the node's containerd.
#[derive(Clone, Debug)]
pub struct ImageRef {
    /// Full reference, e.g. `docker.io/marklb/marklb-agent:0.1.0`.
    pub name: String,
    /// The OCI archive.
    pub archive: PathBuf,
}

/// The project's images, built by `scripts/image/build.sh`.
#[derive(Clone, Debug)]
pub struct Images {
    pub agent: ImageRef,
    pub pause: ImageRef,
    /// The echo server of the Services tests (`tools/image/src/bin/echo.rs`): answers with
    /// its pod and node. Not imported at start: tests that need it import it.
    pub echo: ImageRef,
    /// How long the build (usually a no-op) took.
    pub build_time: Duration,
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds (or finds up to date) the images with `scripts/image/build.sh`: release binaries for
/// x86_64-unknown-linux-musl packed as OCI archives. Cached per process.
pub fn images() -> Result<Images> {
    static IMAGES: OnceLock<std::result::Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_images() -> Result<Images> {
    let t0 = Instant::now();
    let script = repo_root().join("scripts/image/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let found = parse_image_lines(&String::from_utf8_lossy(&out.stdout));
    let take = |n: &str| {
        found
            .get(n)
            .cloned()
            .ok_or_else(|| anyhow!("{} did not report the image {n}", script.display()))
    };
    Ok(Images {
        agent: take("marklb-agent")?,
        pause: take("marklb-pause")?,
        echo: take("marklb-echo")?,
        build_time: t0.elapsed(),
    })
}

/// The `IMAGE <reference> <archive>` lines of the build script, by short name.
fn parse_image_lines(stdout: &str) -> BTreeMap<String, ImageRef> {
    let mut found = BTreeMap::new();
    for line in stdout.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["IMAGE", name, archive] = w[..] {
            let short = name
                .rsplit('/')
                .next()
                .and_then(|n| n.split(':').next())
                .unwrap_or("")
                .to_string();
            found.insert(
                short,
                ImageRef {
                    name: name.to_string(),
                    archive: PathBuf::from(archive),
                },
            );
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_lines_by_short_name() {
        let f = parse_image_lines(
            "noise\nIMAGE docker.io/marklb/marklb-agent:0.1.0 /t/a.oci.tar\nIMAGE x/y/p:1 /t/p.tar\n",
        );
        assert_eq!(
            f["marklb-agent"].name,
            "docker.io/marklb/marklb-agent:0.1.0"
        );
        assert_eq!(f["marklb-agent"].archive, Path::new("/t/a.oci.tar"));
        assert_eq!(f["p"].name, "x/y/p:1");
        assert_eq!(f.len(), 2);
    }
}
