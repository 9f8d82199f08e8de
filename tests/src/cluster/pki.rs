//! The cluster's certificates and identities: a CA, the API server's serving certificate (SANs
//! loopback, the first service IP and the node address), the service-account key pair, and one
//! static token per component (administrator in `system:masters`, the node in `system:nodes`).
//! Test-only security: tokens in a file, an anonymous kubelet API.

use std::{fs, path::Path};

use anyhow::Result;

use super::NODE_IP;
use crate::kube_harness::random_hex;
use crate::supervise::{openssl, service_account_keys};

/// New EC P-256 key arguments for `openssl req`.
const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// Writes `pki/{ca,apiserver}.{key,crt}` and `pki/sa.{key,pub}` under `dir`.
pub(crate) fn write_pki(dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    let req = |extra: &[&str]| {
        let mut a = vec!["req"];
        a.extend(EC_KEY);
        a.extend(["-nodes"]);
        a.extend(extra);
        openssl(&a, &pki)
    };
    req(&[
        "-x509",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=marklb-test-cluster-ca",
    ])?;
    req(&[
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
    ])?;
    fs::write(
        pki.join("apiserver.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:{NODE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
        ),
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "30",
            "-extfile",
            "apiserver.ext",
        ],
        &pki,
    )?;
    service_account_keys(&pki)?;
    Ok(())
}

/// One static-token identity.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    /// User name (also the kubeconfig's file name, with `:` as is).
    pub user: String,
    /// Group ("" for none).
    pub group: String,
    pub token: String,
}

impl Identity {
    pub fn new(user: &str, group: &str) -> Self {
        Self {
            user: user.into(),
            group: group.into(),
            token: random_hex(16),
        }
    }
}

/// The API server's `--token-auth-file` for `ids`.
pub(crate) fn token_file(ids: &[Identity]) -> String {
    ids.iter()
        .enumerate()
        .map(|(i, id)| format!("{},{},uid-{i},\"{}\"\n", id.token, id.user, id.group))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_has_one_quoted_group_per_identity() {
        let a = Identity {
            user: "admin".into(),
            group: "system:masters".into(),
            token: "t1".into(),
        };
        let b = Identity {
            user: "system:kube-proxy".into(),
            group: String::new(),
            token: "t2".into(),
        };
        assert_eq!(
            token_file(&[a, b]),
            "t1,admin,uid-0,\"system:masters\"\nt2,system:kube-proxy,uid-1,\"\"\n"
        );
    }
}
