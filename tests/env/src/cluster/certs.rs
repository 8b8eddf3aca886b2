//! The cluster's certificates, made with `openssl` in the control plane's folder: one CA signs
//! the apiserver's serving certificate and every client certificate (admin, front proxy,
//! nodes, kube-proxy), and a key pair signs service-account tokens.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The Services' virtual IP range; its first address is the "kubernetes" Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SERVICE_IP: &str = "10.96.0.1";

/// The CA and the files it signed, in one folder: `<name>.crt` and `<name>.key`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Creates the CA, the apiserver's serving certificate (for `address`, the Service IP and
    /// the kubernetes.default names) and the service-account key pair.
    pub fn create(dir: &Path, address: Ipv4Addr) -> Result<Pki> {
        std::fs::write(
            dir.join("openssl.cnf"),
            format!(
                "[req]\ndistinguished_name = dn\n[dn]\n\
                 [ca]\nbasicConstraints = critical,CA:TRUE\n\
                 keyUsage = critical,keyCertSign,cRLSign,digitalSignature\n\
                 subjectKeyIdentifier = hash\n\
                 [server]\nbasicConstraints = critical,CA:FALSE\n\
                 keyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = serverAuth\n\
                 subjectAltName = IP:127.0.0.1,IP:{address},IP:{SERVICE_IP},DNS:localhost,\
                 DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local\n\
                 authorityKeyIdentifier = keyid\n\
                 [client]\nbasicConstraints = critical,CA:FALSE\n\
                 keyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = clientAuth\n\
                 authorityKeyIdentifier = keyid\n"
            ),
        )?;
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-config",
                    "openssl.cnf",
                    "-extensions",
                    "ca",
                ][..],
                &EC_KEY,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=kube-zerocopy-ca",
                ],
            ]
            .concat(),
        )?;
        pki.issue("apiserver", "/CN=kube-apiserver", "server")?;
        // The service accounts' token signing key pair.
        pki.openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ])?;
        pki.openssl(&["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        Ok(pki)
    }

    /// A folder that `create` filled before.
    pub fn open(dir: &Path) -> Pki {
        Pki {
            dir: dir.to_owned(),
        }
    }

    /// A client certificate `<name>.crt` + `<name>.key` for `subject` (e.g.
    /// "/O=system:nodes/CN=system:node:NAME": O is the group, CN the user).
    pub fn issue_client(&self, name: &str, subject: &str) -> Result<()> {
        self.issue(name, subject, "client")
    }

    /// A serving certificate `<name>.crt` + `<name>.key` for 127.0.0.1 and localhost (and the
    /// apiserver's names), signed by the CA.
    pub fn issue_server(&self, name: &str, subject: &str) -> Result<()> {
        self.issue(name, subject, "server")
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn issue(&self, name: &str, subject: &str, extensions: &str) -> Result<()> {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.openssl(
            &[
                &["req", "-new", "-config", "openssl.cnf"][..],
                &EC_KEY,
                &["-keyout", &key, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        )?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
            "-out",
            &crt,
        ])
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("running openssl (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A kubeconfig for `server` that authenticates with the client certificate `<user>.crt`.
pub fn kubeconfig(pki: &Pki, server: &str, user: &str) -> String {
    let p = |f: &str| pki.path(f).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: kube-zerocopy\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n- name: kube-zerocopy\n  context:\n    cluster: kube-zerocopy\n    user: {user}\n    namespace: default\n\
         current-context: kube-zerocopy\n",
        ca = p("ca.crt"),
        crt = p(&format!("{user}.crt")),
        key = p(&format!("{user}.key")),
    )
}
