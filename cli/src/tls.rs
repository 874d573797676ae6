//! `switchyard up --tls`: a throw-away certificate authority and one certificate per component
//! (router, control plane, worker) for `127.0.0.1`, `::1` and `localhost`, in a private
//! temporary directory that is removed when `up` ends.
//!
//! Every certificate is good for both ends of a TLS connection (server and client
//! authentication): the router and the control plane present theirs as client certificates
//! to the workers, which take `Worker` calls only from certificates of this CA (mTLS).
//!
//! Each worker gets a certificate of its own ([`LocalPki::worker`]) naming its identity
//! (`spiffe://switchyard/pool/<pool>/worker/<id>`, see `switchyard_cluster::identity`): routers
//! link only to a worker whose certificate names the worker of its etcd record. The control
//! plane's names `spiffe://switchyard/control-plane`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use switchyard_cluster::Pool;
use switchyard_cluster::identity;
use switchyard_cluster::tls::TlsFiles;

/// The CA certificate's file name in the directory.
pub const CA_FILE: &str = "ca.pem";

/// A local CA and its certificates; the directory (mode 0700) goes when this is dropped.
pub struct LocalPki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LocalPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl LocalPki {
    /// Generates the CA and a certificate for each of `components` (`<name>.pem`,
    /// `<name>-key.pem`, keys mode 0600). `control-plane`'s names the control plane's identity.
    pub fn generate(components: &[&str]) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        // Private from its creation: no moment in which others may list or enter it.
        let dir = tempfile::Builder::new()
            .prefix("switchyard-tls-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .context("creating a directory for the local TLS certificates")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchyard up local CA (throw-away)");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write(dir.path(), CA_FILE, &ca_cert.pem(), 0o644)?;
        let pki = Self {
            dir,
            ca: Issuer::new(ca_params, ca_key),
        };
        for component in components {
            // Reached at addresses no certificate names: checked by these identities.
            let identity = match *component {
                "control-plane" => Some(identity::control_plane_uri()),
                "router" => Some(identity::router_uri()),
                _ => None,
            };
            pki.issue(component, identity)?;
        }
        Ok(pki)
    }

    /// A certificate for worker `id` of `pool`, naming its identity (written as
    /// `worker-<pool>-<id>.pem`): its files, requiring client certificates of this CA.
    pub fn worker(&self, pool: Pool, id: &str) -> anyhow::Result<TlsFiles> {
        let name = format!("worker-{pool}-{id}");
        self.issue(&name, Some(identity::worker_uri(pool, id)))?;
        Ok(TlsFiles {
            client_ca_file: Some(self.ca_file()),
            ..self.files(&name)
        })
    }

    /// Writes `<name>.pem` and `<name>-key.pem`: a leaf for the loopback names, with
    /// `identity` as a URI SAN.
    fn issue(&self, name: &str, identity: Option<String>) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        if let Some(uri) = identity {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, format!("switchyard {name}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        write(self.dir.path(), &format!("{name}.pem"), &cert.pem(), 0o644)?;
        write(
            self.dir.path(),
            &format!("{name}-key.pem"),
            &key.serialize_pem(),
            0o600,
        )?;
        Ok(())
    }

    /// The CA certificate clients trust (`grpcurl -cacert`, `curl --cacert`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(CA_FILE)
    }

    /// `component`'s certificate and key, trusting the CA on its outbound links.
    pub fn files(&self, component: &str) -> TlsFiles {
        TlsFiles {
            cert_file: Some(self.dir.path().join(format!("{component}.pem"))),
            key_file: Some(self.dir.path().join(format!("{component}-key.pem"))),
            ca_file: Some(self.ca_file()),
            client_ca_file: None,
        }
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_and_certificates_load() {
        use std::os::unix::fs::PermissionsExt as _;
        let pki = LocalPki::generate(&["router", "worker"]).unwrap();
        let files = pki.files("worker");
        let key = files.key_file.clone().unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = std::fs::metadata(pki.dir.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir & 0o077, 0, "the directory is private");
        assert!(
            files
                .server(switchyard_cluster::tls::Alpn::Grpc)
                .unwrap()
                .is_some()
        );
        files.client().unwrap().config().unwrap();
        // A worker's certificate names its identity; the control plane's names its own.
        let worker = pki.worker(Pool::Wse, "wse-1").unwrap();
        assert_eq!(worker.client_ca_file, Some(pki.ca_file()));
        let cert = switchyard_cluster::tls::read_certificates(&worker.cert_file.unwrap()).unwrap();
        assert_eq!(
            identity::uri_sans(&cert[0]),
            ["spiffe://switchyard/pool/wse/worker/wse-1"]
        );
        let pki_cp = LocalPki::generate(&["control-plane"]).unwrap();
        let cert = switchyard_cluster::tls::read_certificates(
            &pki_cp.files("control-plane").cert_file.unwrap(),
        )
        .unwrap();
        assert_eq!(
            identity::uri_sans(&cert[0]),
            [identity::control_plane_uri()]
        );
        let cert =
            switchyard_cluster::tls::read_certificates(&pki.files("router").cert_file.unwrap())
                .unwrap();
        assert_eq!(identity::uri_sans(&cert[0]), [identity::router_uri()]);
        let path = pki.dir.path().to_path_buf();
        drop(pki);
        assert!(!path.exists(), "removed with the PKI");
    }
}
