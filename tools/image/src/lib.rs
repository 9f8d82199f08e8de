//! OCI image archives without a container engine.
//!
//! [`build`] packs one executable (plus, when it is dynamically linked, every library `ldd`
//! resolves for it and its loader) into a single gzip layer on an otherwise empty root file
//! system, writes the image configuration (entrypoint, environment, labels), the manifest and
//! an index, and returns an OCI image layout as one tar archive: what `ctr images import`,
//! `skopeo copy oci-archive:...`, `podman load` and `docker load` (23+) accept.
//!
//! The output is reproducible: file times, owners and the gzip header are fixed, JSON is
//! written with sorted keys, and the creation time comes from the caller (`SOURCE_DATE_EPOCH`
//! in `scripts/image/build.sh`). The same inputs give the same bytes and digests.
//!
//! [`inspect`] reads such an archive back and checks every digest and size on the way.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use flate2::{Compression, GzBuilder, read::GzDecoder};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// containerd's annotation naming the image an index entry is imported as.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation naming a reference in an image layout (the tag).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The executable to pack.
    pub binary: PathBuf,
    /// Where it goes in the image (absolute), e.g. `/usr/local/bin/marklb-agent`.
    pub path_in_image: String,
    /// Full reference, e.g. `docker.io/marklb/marklb-agent:0.1.0`.
    pub name: String,
    /// Default arguments (`Cmd`).
    pub args: Vec<String>,
    /// Image labels (also written as manifest annotations).
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 creation time.
    pub created: String,
    /// Copy the libraries a dynamically linked binary needs (else refuse one).
    pub allow_dynamic: bool,
    /// `User` of the image config (`uid[:gid]`); `None`: root, as the agent needs.
    pub user: Option<String>,
}

/// One file of the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerFile {
    /// Absolute path in the image.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// The result of [`build`].
#[derive(Clone, Debug)]
pub struct Built {
    /// The archive (an OCI image layout as a tar).
    pub archive: Vec<u8>,
    /// Digest of the manifest (`sha256:...`): the image's identity.
    pub manifest_digest: String,
    /// Digest of the configuration: the image ID containerd and the kubelet show.
    pub config_digest: String,
    /// Files in the layer (paths).
    pub files: Vec<String>,
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn digest_of(data: &[u8]) -> Result<Sha256Digest> {
    sha256_hex(data)
        .parse()
        .map_err(|e| anyhow!("sha256 digest: {e}"))
}

/// JSON with object keys sorted (stable bytes, hence stable digests).
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                let mut out = serde_json::Map::new();
                for (k, v) in b {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // serde_json's Map keeps insertion order with `preserve_order` (another crate of the
    // workspace may turn it on) and sorts otherwise: inserting in sorted order is right either way.
    serde_json::to_string(&sorted(v)).expect("serializing JSON")
}

fn to_canonical<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(canonical_json(&serde_json::to_value(v)?).into_bytes())
}

/// The shared libraries and loader `ldd` reports for `binary`: empty for a static binary.
pub fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    ensure!(out.status.success(), "ldd {}: {text}", binary.display());
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: library {line}", binary.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)";
        // "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The layer's tar (uncompressed): parent directories (0755), then the files, sorted, owned
/// by root, time 0.
pub fn layer_tar(files: &[LayerFile]) -> Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        ensure!(f.path.starts_with('/'), "{}: not absolute", f.path);
        let mut p = Path::new(&f.path[1..]);
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut files: Vec<&LayerFile> = files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for d in &dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    for f in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_size(f.data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, &f.path[1..], f.data.as_slice())?;
    }
    Ok(b.into_inner()?)
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // No name and time 0 in the header: the same layer gives the same bytes.
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn descriptor(
    media_type: MediaType,
    data: &[u8],
    annotations: Option<BTreeMap<String, String>>,
) -> Result<Descriptor> {
    let mut d = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest_of(data)?)
        .size(data.len() as u64);
    if let Some(a) = annotations {
        d = d.annotations(a.into_iter().collect::<std::collections::HashMap<_, _>>());
    }
    Ok(d.build()?)
}

/// The files of the layer for `spec`: the binary (0755) and, for a dynamic binary, its libraries.
pub fn layer_files(spec: &ImageSpec) -> Result<Vec<LayerFile>> {
    ensure!(
        spec.path_in_image.starts_with('/'),
        "the path in the image must be absolute: {}",
        spec.path_in_image
    );
    let data = std::fs::read(&spec.binary)
        .with_context(|| format!("reading {}", spec.binary.display()))?;
    ensure!(
        data.starts_with(b"\x7fELF"),
        "{} is not an ELF executable",
        spec.binary.display()
    );
    let mut files = vec![LayerFile {
        path: spec.path_in_image.clone(),
        mode: 0o755,
        data,
    }];
    let libs = linked_libraries(&spec.binary)?;
    if !libs.is_empty() && !spec.allow_dynamic {
        bail!(
            "{} is dynamically linked ({}): build it static (x86_64-unknown-linux-musl) or pass --allow-dynamic to copy its libraries in",
            spec.binary.display(),
            libs.iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for lib in libs {
        files.push(LayerFile {
            path: lib.display().to_string(),
            mode: 0o755,
            // The content behind symlinks, at the path the binary asks for.
            data: std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?,
        });
    }
    Ok(files)
}

/// Builds the archive for `spec`.
pub fn build(spec: &ImageSpec) -> Result<Built> {
    let (_, tag) = split_name(&spec.name)?;
    let files = layer_files(spec)?;
    let tar = layer_tar(&files)?;
    let layer = gzip(&tar)?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar));

    let config = ConfigBuilder::default()
        .entrypoint(vec![spec.path_in_image.clone()])
        .cmd(spec.args.clone())
        .env(vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            // The agent's text logs must not carry colour codes in `kubectl logs`.
            "NO_COLOR=1".to_string(),
        ])
        .working_dir("/")
        .labels(
            spec.labels
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
    // Owned builder: `user` only when asked (the agent's config stays as it was).
    let config = match &spec.user {
        Some(user) => config.user(user.clone()),
        None => config,
    }
    .build()?;
    let image_config: ImageConfiguration = ImageConfigurationBuilder::default()
        .created(spec.created.clone())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(spec.created.clone())
                .created_by(format!(
                    "marklb-image: {} -> {}",
                    spec.binary
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    spec.path_in_image
                ))
                .build()?,
        ])
        .build()?;
    let config_json = to_canonical(&image_config)?;

    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config_json, None)?)
        .layers(vec![descriptor(MediaType::ImageLayerGzip, &layer, None)?])
        .annotations(
            spec.labels
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()?;
    let manifest_json = to_canonical(&manifest)?;

    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_CONTAINERD_NAME.to_string(), spec.name.clone());
    annotations.insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
    let mut mdesc = descriptor(MediaType::ImageManifest, &manifest_json, Some(annotations))?;
    mdesc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()?,
    ));
    let index: ImageIndex = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![mdesc])
        .build()?;
    let index_json = to_canonical(&index)?;

    let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
    for data in [&layer[..], &config_json, &manifest_json] {
        blobs.insert(sha256_hex(data), data);
    }
    let mut out = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], dir: bool| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        out.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, false)?;
    add("index.json", &index_json, false)?;
    add("blobs/", &[], true)?;
    add("blobs/sha256/", &[], true)?;
    for (hex, data) in &blobs {
        add(&format!("blobs/sha256/{hex}"), data, false)?;
    }
    Ok(Built {
        archive: out.into_inner()?,
        manifest_digest: format!("sha256:{}", sha256_hex(&manifest_json)),
        config_digest: format!("sha256:{}", sha256_hex(&config_json)),
        files: files.into_iter().map(|f| f.path).collect(),
    })
}

/// `repo[:tag]` -> (repo, tag); the tag defaults to `latest`.
pub fn split_name(name: &str) -> Result<(&str, &str)> {
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (repo, tag) = match name[slash..].rfind(':') {
        Some(i) => (&name[..slash + i], &name[slash + i + 1..]),
        None => (name, "latest"),
    };
    ensure!(
        !repo.is_empty() && !tag.is_empty(),
        "bad image name {name:?}"
    );
    ensure!(
        !name.contains('@'),
        "image name {name:?}: digests are not names"
    );
    Ok((repo, tag))
}

/// An archive read back by [`inspect`].
#[derive(Clone, Debug)]
pub struct Inspected {
    pub index: ImageIndex,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// The files of the (single) layer: path -> (mode, content).
    pub files: BTreeMap<String, (u32, Vec<u8>)>,
    /// The image name containerd imports it as.
    pub name: Option<String>,
}

/// Reads an archive built by [`build`], checking every digest, size and the layer's diff ID.
pub fn inspect(archive: &[u8]) -> Result<Inspected> {
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut a = tar::Archive::new(archive);
    for e in a.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        entries.insert(path, data);
    }
    let layout: Value = serde_json::from_slice(
        entries
            .get("oci-layout")
            .ok_or_else(|| anyhow!("no oci-layout"))?,
    )?;
    ensure!(
        layout["imageLayoutVersion"] == "1.0.0",
        "oci-layout: {layout}"
    );
    let blob = |d: &Descriptor| -> Result<&Vec<u8>> {
        let hex = d.digest().digest();
        let data = entries
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| anyhow!("blob {} missing", d.digest()))?;
        ensure!(sha256_hex(data) == hex, "blob {} corrupt", d.digest());
        ensure!(data.len() as u64 == d.size(), "blob {} size", d.digest());
        Ok(data)
    };
    let index: ImageIndex = serde_json::from_slice(
        entries
            .get("index.json")
            .ok_or_else(|| anyhow!("no index.json"))?,
    )?;
    ensure!(
        index.manifests().len() == 1,
        "one manifest, not {}",
        index.manifests().len()
    );
    let mdesc = &index.manifests()[0];
    let name = mdesc
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CONTAINERD_NAME).cloned());
    let manifest: ImageManifest = serde_json::from_slice(blob(mdesc)?)?;
    let config: ImageConfiguration = serde_json::from_slice(blob(manifest.config())?)?;
    ensure!(manifest.layers().len() == 1, "one layer");
    let layer = blob(&manifest.layers()[0])?;
    let mut tar = Vec::new();
    GzDecoder::new(&layer[..]).read_to_end(&mut tar)?;
    ensure!(
        config.rootfs().diff_ids() == &vec![format!("sha256:{}", sha256_hex(&tar))],
        "diff ID does not match the layer"
    );
    let mut files = BTreeMap::new();
    let mut t = tar::Archive::new(&tar[..]);
    for e in t.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = format!("/{}", e.path()?.to_string_lossy());
        let mode = e.header().mode()?;
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        files.insert(path, (mode, data));
    }
    Ok(Inspected {
        index,
        manifest,
        config,
        files,
        name,
    })
}

/// RFC 3339 UTC time of a Unix timestamp (for `SOURCE_DATE_EPOCH`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(binary: &Path) -> ImageSpec {
        let mut labels = BTreeMap::new();
        labels.insert(
            "org.opencontainers.image.version".to_string(),
            "1.2.3".to_string(),
        );
        labels.insert(
            "org.opencontainers.image.revision".to_string(),
            "abc".to_string(),
        );
        ImageSpec {
            binary: binary.to_path_buf(),
            path_in_image: "/usr/local/bin/tool".into(),
            name: "docker.io/marklb/tool:1.2.3".into(),
            args: vec!["run".into()],
            labels,
            created: rfc3339(0),
            allow_dynamic: true,
            user: None,
        }
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn names() {
        assert_eq!(
            split_name("docker.io/marklb/a:1.0").unwrap(),
            ("docker.io/marklb/a", "1.0")
        );
        assert_eq!(
            split_name("localhost:5000/a").unwrap(),
            ("localhost:5000/a", "latest")
        );
        assert!(split_name("a@sha256:00").is_err());
        assert!(split_name(":x").is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":"x"}}"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":"x","d":[{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn dynamic_binary_round_trips_with_its_libraries() {
        // /bin/true is dynamically linked on Debian: the layer must carry its libc and loader.
        let s = spec(Path::new("/bin/true"));
        let built = build(&s).unwrap();
        let again = build(&s).unwrap();
        assert_eq!(built.archive, again.archive, "reproducible bytes");
        let got = inspect(&built.archive).unwrap();
        assert_eq!(got.name.as_deref(), Some("docker.io/marklb/tool:1.2.3"));
        let (mode, data) = &got.files["/usr/local/bin/tool"];
        assert_eq!(*mode, 0o755);
        assert_eq!(data, &std::fs::read("/bin/true").unwrap());
        let libs = linked_libraries(Path::new("/bin/true")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")));
        for l in &libs {
            assert!(
                got.files.contains_key(&l.display().to_string()),
                "{} missing",
                l.display()
            );
        }
        let cfg = got.config.config().as_ref().unwrap();
        assert_eq!(
            cfg.entrypoint().as_ref().unwrap(),
            &vec!["/usr/local/bin/tool".to_string()]
        );
        assert_eq!(cfg.cmd().as_ref().unwrap(), &vec!["run".to_string()]);
        assert_eq!(
            cfg.labels().as_ref().unwrap()["org.opencontainers.image.version"],
            "1.2.3"
        );
        assert_eq!(got.config.architecture(), &Arch::Amd64);
        // Root unless asked (the agent needs it); a non-root user when given (the operator).
        assert_eq!(cfg.user(), &None);
        let as_user = build(&ImageSpec {
            user: Some("65532:65532".into()),
            ..s.clone()
        })
        .unwrap();
        let got_user = inspect(&as_user.archive).unwrap();
        assert_eq!(
            got_user.config.config().as_ref().unwrap().user().as_deref(),
            Some("65532:65532")
        );
        assert_eq!(
            format!("{}", got.index.manifests()[0].digest()),
            built.manifest_digest
        );
        assert_eq!(
            format!("{}", got.manifest.config().digest()),
            built.config_digest
        );
    }

    #[test]
    fn dynamic_binary_refused_unless_allowed() {
        let mut s = spec(Path::new("/bin/true"));
        s.allow_dynamic = false;
        let e = build(&s).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
    }

    #[test]
    fn corrupt_blob_is_detected() {
        let built = build(&spec(Path::new("/bin/true"))).unwrap();
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        let mut a = tar::Archive::new(&built.archive[..]);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            entries.push((p, d));
        }
        let cfg = built
            .config_digest
            .trim_start_matches("sha256:")
            .to_string();
        let mut b = tar::Builder::new(Vec::new());
        for (p, mut d) in entries {
            if p.ends_with(&cfg) {
                d[0] ^= 1;
            }
            let mut h = tar::Header::new_ustar();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, &p, &d[..]).unwrap();
        }
        let e = inspect(&b.into_inner().unwrap()).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
