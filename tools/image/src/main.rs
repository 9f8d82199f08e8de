//! `marklb-image`: writes an OCI image archive holding one executable (see the library docs).
//!
//! ```text
//! marklb-image build --binary target/x86_64-unknown-linux-musl/release/marklb-agent \
//!     --name docker.io/marklb/marklb-agent:0.1.0 --label org.opencontainers.image.version=0.1.0 \
//!     --output target/images/marklb-agent.oci.tar
//! marklb-image inspect target/images/marklb-agent.oci.tar
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "marklb-image", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an archive.
    Build {
        /// The executable to pack (static; see --allow-dynamic).
        #[arg(long)]
        binary: PathBuf,
        /// Its path in the image (default /usr/local/bin/<file name>).
        #[arg(long)]
        path_in_image: Option<String>,
        /// Full image reference, e.g. docker.io/marklb/marklb-agent:0.1.0.
        #[arg(long)]
        name: String,
        /// Label KEY=VALUE (repeatable); also a manifest annotation.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Default argument (repeatable).
        #[arg(long = "arg", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Creation time as a Unix timestamp (default: SOURCE_DATE_EPOCH, else 0).
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        created: Option<i64>,
        /// Copy the libraries of a dynamically linked binary into the layer.
        #[arg(long)]
        allow_dynamic: bool,
        /// Run as this user (`uid[:gid]`) rather than root.
        #[arg(long)]
        user: Option<String>,
        /// Output archive.
        #[arg(long)]
        output: PathBuf,
    },
    /// Check an archive (digests, sizes, diff ID) and print what it holds.
    Inspect { archive: PathBuf },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Build {
            binary,
            path_in_image,
            name,
            labels,
            args,
            created,
            allow_dynamic,
            user,
            output,
        } => {
            let path_in_image = path_in_image.unwrap_or_else(|| {
                format!(
                    "/usr/local/bin/{}",
                    binary
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            });
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow!("label {l:?}: KEY=VALUE"))
                })
                .collect::<Result<BTreeMap<_, _>>>()?;
            let spec = marklb_image::ImageSpec {
                binary,
                path_in_image,
                name,
                args,
                labels,
                created: marklb_image::rfc3339(created.unwrap_or(0)),
                allow_dynamic,
                user,
            };
            let built = marklb_image::build(&spec)?;
            if let Some(dir) = output.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = output.with_extension("tmp~");
            std::fs::write(&tmp, &built.archive)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &output)?;
            println!(
                "{} {} ({} bytes, image id {}, manifest {}; files: {})",
                output.display(),
                spec.name,
                built.archive.len(),
                built.config_digest,
                built.manifest_digest,
                built.files.join(" ")
            );
        }
        Cmd::Inspect { archive } => {
            let data = std::fs::read(&archive)
                .with_context(|| format!("reading {}", archive.display()))?;
            let got = marklb_image::inspect(&data)?;
            println!("name: {}", got.name.as_deref().unwrap_or("-"));
            println!("manifest: {}", got.index.manifests()[0].digest());
            println!("image id: {}", got.manifest.config().digest());
            if let Some(c) = got.config.config() {
                println!(
                    "entrypoint: {:?}",
                    c.entrypoint().clone().unwrap_or_default()
                );
                println!("cmd: {:?}", c.cmd().clone().unwrap_or_default());
                let labels: BTreeMap<_, _> =
                    c.labels().clone().unwrap_or_default().into_iter().collect();
                for (k, v) in labels {
                    println!("label {k}={v}");
                }
            }
            for (path, (mode, data)) in &got.files {
                println!("file {path} {mode:o} {} bytes", data.len());
            }
        }
    }
    Ok(())
}
