//! The release images as `make image` builds them (scripts/image/build.sh, OCI archives without
//! a container engine), against what the install paths and the Dockerfiles say:
//!
//! - the build names exactly the images `deploy/` and the chart's defaults run
//!   (`docker.io/marklb/marklb-{agent,operator}:<version>`);
//! - labels carry the version, the revision (the commit built) and the source; the operator runs
//!   as 65532:65532 (not root), the agent as root (it needs CAP_BPF/CAP_NET_ADMIN, which the
//!   DaemonSet grants, and nothing else);
//! - the operator binary in the image prints, for the command named in the header of
//!   `deploy/operator/marklb-operator.yaml`, exactly that file's objects;
//! - `agent/Dockerfile` and `operator/Dockerfile` build the same thing for users with an engine:
//!   same label keys, user, entrypoint and default command.
//!
//! Runs the image build: a few seconds when up to date (the cluster tests build the same
//! images), about 3 min cold.

use std::collections::BTreeMap;
use std::process::Command;

use marklb_installgen::{VERSION, image, manifests_args};
use marklb_tests::install::{repo_root, success};

struct Built {
    name: String,
    inspected: marklb_image::Inspected,
}

fn build_images() -> BTreeMap<String, Built> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/image/build.sh"))
        .current_dir(repo_root())
        .output()
        .unwrap();
    let text = success("scripts/image/build.sh", out).unwrap();
    let mut images = BTreeMap::new();
    for line in text.lines() {
        if let ["IMAGE", name, archive] = line.split_whitespace().collect::<Vec<_>>()[..] {
            let short = name.rsplit('/').next().unwrap().split(':').next().unwrap();
            let data = std::fs::read(archive).unwrap();
            let inspected =
                marklb_image::inspect(&data).unwrap_or_else(|e| panic!("{archive}: {e:#}"));
            images.insert(
                short.to_string(),
                Built {
                    name: name.to_string(),
                    inspected,
                },
            );
        }
    }
    images
}

/// LABEL keys, USER, ENTRYPOINT and CMD of a Dockerfile (the simple form ours use).
fn dockerfile(path: &str) -> (Vec<String>, Option<String>, String, String) {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let joined = text.replace("\\\n", " ");
    let mut labels = Vec::new();
    let (mut user, mut entrypoint, mut cmd) = (None, String::new(), String::new());
    for line in joined.lines().filter(|l| !l.starts_with('#')) {
        if let Some(rest) = line.strip_prefix("LABEL ") {
            for pair in rest.split_whitespace() {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.push(k.to_string());
                }
            }
        } else if let Some(u) = line.strip_prefix("USER ") {
            user = Some(u.trim().to_string());
        } else if let Some(e) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = e.trim().to_string();
        } else if let Some(c) = line.strip_prefix("CMD ") {
            cmd = c.trim().to_string();
        }
    }
    labels.sort();
    (labels, user, entrypoint, cmd)
}

#[test]
fn images_match_the_install_paths_and_the_dockerfiles() {
    let images = build_images();
    let revision = success(
        "git rev-parse HEAD",
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(repo_root())
            .output()
            .unwrap(),
    )
    .unwrap();
    for (short, dockerfile_path, user) in [
        ("marklb-agent", "agent/Dockerfile", None),
        (
            "marklb-operator",
            "operator/Dockerfile",
            Some("65532:65532"),
        ),
    ] {
        let built = images
            .get(short)
            .unwrap_or_else(|| panic!("the build made no {short}"));
        assert_eq!(
            built.name,
            image(short),
            "deploy/ and the chart run {}",
            image(short)
        );
        let config = built.inspected.config.config().as_ref().unwrap();
        let labels: BTreeMap<String, String> = config
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(labels["org.opencontainers.image.version"], VERSION);
        assert_eq!(labels["org.opencontainers.image.revision"], revision.trim());
        assert_eq!(labels["org.opencontainers.image.title"], short);
        assert!(labels.contains_key("org.opencontainers.image.source"));
        assert_eq!(config.user().as_deref(), user, "{short}: user");
        let entrypoint = config.entrypoint().clone().unwrap_or_default();
        assert_eq!(entrypoint, vec![format!("/usr/local/bin/{short}")]);
        // The Dockerfile for engines says the same.
        let (keys, d_user, d_entry, d_cmd) = dockerfile(dockerfile_path);
        let mut built_keys: Vec<String> = labels
            .keys()
            .filter(|k| *k != "org.opencontainers.image.created")
            .cloned()
            .collect();
        built_keys.sort();
        assert_eq!(keys, built_keys, "{dockerfile_path}: LABEL keys");
        assert_eq!(d_user.as_deref(), user, "{dockerfile_path}: USER");
        assert_eq!(d_entry, format!("[\"/usr/local/bin/{short}\"]"));
        assert_eq!(
            d_cmd,
            serde_json::to_string(&config.cmd().clone().unwrap_or_default()).unwrap()
        );
    }
    // The operator in the image prints deploy/operator/marklb-operator.yaml for the command its
    // header names.
    let operator = &images["marklb-operator"].inspected;
    let (_, binary) = &operator.files["/usr/local/bin/marklb-operator"];
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("marklb-operator");
    std::fs::write(&exe, binary).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let printed = success(
        "marklb-operator manifests",
        Command::new(&exe).args(manifests_args()).output().unwrap(),
    )
    .unwrap();
    let file =
        std::fs::read_to_string(repo_root().join("deploy/operator/marklb-operator.yaml")).unwrap();
    let header_command = format!("`marklb-operator {}`", manifests_args().join(" "));
    assert!(
        file.contains(&header_command),
        "the header names {header_command}"
    );
    let body: String = file
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(printed, body, "the image's operator prints another deploy/");
}
