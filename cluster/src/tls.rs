//! TLS for every listener and every link (rustls with ring, the provider tonic's `tls-ring`
//! and etcd-client's `tls` use too).
//!
//! - [`TlsFiles`]: a component's PEM files — its certificate and key (served to clients and
//!   presented on its own outbound links when the peer asks for a client certificate), the CA
//!   it trusts on outbound links, and, on workers, the CA whose client certificates `Worker`
//!   calls need (mTLS).
//! - [`ServerTls`] and [`listen`]: the server side. Before every handshake the files' metadata
//!   is compared with what the current configuration was built from; when a file changed
//!   (a Kubernetes secret rotated, cert-manager renewed) the configuration is rebuilt, so a
//!   rotated certificate is served from the next connection on, without a restart. A rotation
//!   caught half-written (a key that does not match the certificate) keeps the previous
//!   configuration and logs why.
//! - [`ClientTls`] and [`endpoint`]: the client side; the files are read for every new
//!   connection, so rotated client certificates and CAs take effect on the next reconnect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use crate::listen::{ConnectionTimeouts, Incoming, TimedIo};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls configuration: {0}")]
    Config(String),
}

/// A component's TLS files (PEM). All `None`: plaintext listeners and links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain served by the component's listeners (and presented as its client
    /// certificate on outbound links when the peer asks for one).
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// CA certificates trusted on outbound links (workers, the control plane); set, every
    /// outbound link uses TLS.
    pub ca_file: Option<PathBuf>,
    /// Workers: CA certificates a caller's client certificate must chain to for `Worker`
    /// calls (mTLS). Health and reflection stay open to probes and tools.
    pub client_ca_file: Option<PathBuf>,
}

/// What a listener speaks, offered by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// An HTTP API: HTTP/2 or HTTP/1.1.
    Http,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Grpc => vec![b"h2".to_vec()],
            Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

impl TlsFiles {
    /// Checks the combination of flags (not the files' contents; [`TlsFiles::server`] does).
    pub fn validate(&self) -> Result<(), TlsError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(TlsError::Config(
                    "a certificate without a key (--tls-key-file)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Config(
                    "a key without a certificate (--tls-cert-file)".into(),
                ));
            }
            _ => {}
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            return Err(TlsError::Config(
                "client certificates (--tls-client-ca-file) need TLS: set --tls-cert-file and --tls-key-file".into(),
            ));
        }
        Ok(())
    }

    /// Whether the listeners serve TLS.
    pub fn serves_tls(&self) -> bool {
        self.cert_file.is_some()
    }

    /// The server side for one listener; `None` without a certificate (plaintext). Errors name
    /// the file that is missing or unreadable.
    pub fn server(&self, alpn: Alpn) -> Result<Option<Arc<ServerTls>>, TlsError> {
        self.validate()?;
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        Ok(Some(Arc::new(ServerTls::load(
            cert.clone(),
            key.clone(),
            self.client_ca_file.clone(),
            alpn,
        )?)))
    }

    /// The client side of outbound links; `None` without a CA (plaintext links).
    pub fn client(&self) -> Option<ClientTls> {
        let ca_file = self.ca_file.clone()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => None,
        };
        Some(ClientTls { ca_file, identity })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no private key: {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Identifies one version of a file: a rotation changes at least one of these (Kubernetes
/// swaps a symlink to a new directory: new inode; an editor or `cp` changes mtime and size).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    // `metadata` follows symlinks: the stamp is the target's, which is what rotates.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// A listener's TLS configuration, rebuilt when its files change.
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    alpn: Alpn,
    current: Mutex<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("client_ca_file", &self.client_ca_file)
            .finish_non_exhaustive()
    }
}

struct Loaded {
    stamps: Vec<Option<Stamp>>,
    config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Reads and checks the files now: a bad certificate or key is a start-up error.
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        client_ca_file: Option<PathBuf>,
        alpn: Alpn,
    ) -> Result<Self, TlsError> {
        let stamps = stamps(&cert_file, &key_file, client_ca_file.as_deref());
        let config = build(&cert_file, &key_file, client_ca_file.as_deref(), alpn)?;
        Ok(Self {
            cert_file,
            key_file,
            client_ca_file,
            alpn,
            current: Mutex::new(Loaded { stamps, config }),
        })
    }

    /// Whether `Worker` calls need a client certificate of the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.client_ca_file.is_some()
    }

    /// The configuration for the next handshake, rebuilt first if a file changed since the
    /// current one was built. A stat per file per handshake: far below the handshake's cost.
    pub fn config(&self) -> Arc<ServerConfig> {
        let stamps = stamps(
            &self.cert_file,
            &self.key_file,
            self.client_ca_file.as_deref(),
        );
        let mut current = self.current.lock().expect("tls config lock");
        if stamps != current.stamps {
            // Remember the stamps even when the build fails: a half-written rotation is retried
            // when the next file lands (its stamp changes), not on every handshake.
            current.stamps = stamps;
            match build(
                &self.cert_file,
                &self.key_file,
                self.client_ca_file.as_deref(),
                self.alpn,
            ) {
                Ok(config) => {
                    current.config = config;
                    info!(cert = %self.cert_file.display(), "tls: certificate files changed; serving the new ones");
                }
                Err(error) => {
                    warn!(%error, "tls: certificate files changed but do not load; still serving the previous ones");
                }
            }
        }
        current.config.clone()
    }
}

fn stamps(cert_file: &Path, key_file: &Path, client_ca_file: Option<&Path>) -> Vec<Option<Stamp>> {
    [cert_file, key_file]
        .into_iter()
        .chain(client_ca_file)
        .map(stamp)
        .collect()
}

fn build(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
    alpn: Alpn,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certificates(cert_file)?;
    let key = read_private_key(key_file)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(path)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.to_path_buf(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            // Clients without a certificate still complete the handshake (health checks,
            // reflection); the `Worker` service refuses them (see `peer_presented_certificate`).
            // A certificate that is presented must chain to this CA, or the handshake fails.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Pem {
            path: key_file.to_path_buf(),
            what: format!("does not fit {}: {e}", cert_file.display()),
        })?;
    config.alpn_protocols = alpn.protocols();
    Ok(Arc::new(config))
}

/// Whether the caller of `request` completed the handshake with a client certificate (which
/// the listener's client verifier has checked against its CA).
pub fn peer_presented_certificate<T>(request: &tonic::Request<T>) -> bool {
    request.peer_certs().is_some_and(|certs| !certs.is_empty())
}

/// Connections on a TLS listener, handshaken, for tonic's `serve_with_incoming*` and
/// [`crate::listen::serve_http`].
pub type TlsListener = Incoming<TimedIo<TlsStream<TcpStream>>>;

/// Accepts on `listener` and handshakes each connection in its own task (a slow or silent
/// client never holds up the others); the handshake counts against the connection's
/// first-request deadline (`timeouts.header_read`), and the connection is then watched like
/// any other (see [`crate::listen`]). The accept loop ends when the returned listener is
/// dropped.
pub fn listen(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    timeouts: ConnectionTimeouts,
) -> std::io::Result<TlsListener> {
    crate::listen::with_handshake(listener, timeouts, move |tcp| {
        TlsAcceptor::from(tls.config()).accept(tcp)
    })
}

/// The client side of outbound links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    ca_file: PathBuf,
    /// Certificate and key presented when the server asks for a client certificate.
    identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// Trusts the CAs of `ca_file`; no client certificate.
    pub fn new(ca_file: PathBuf) -> Self {
        Self {
            ca_file,
            identity: None,
        }
    }

    /// Presents `cert_file` (with `key_file`) when the server asks for a client certificate.
    pub fn with_identity(mut self, cert_file: PathBuf, key_file: PathBuf) -> Self {
        self.identity = Some((cert_file, key_file));
        self
    }

    /// tonic's client configuration, read from the files now (so each new connection sees
    /// rotated files).
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        // Parsed here as well: tonic reports bad PEM only at connect time, without the path.
        read_certificates(&self.ca_file)?;
        let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read(&self.ca_file)?),
        );
        if let Some((cert, key)) = &self.identity {
            read_certificates(cert)?;
            read_private_key(key)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        Ok(config)
    }

    /// The CA certificates of `ca_file`, for a verifier of one's own (see
    /// [`crate::identity`]).
    pub(crate) fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(&self.ca_file)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: self.ca_file.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }

    /// tonic's client configuration with the client certificate only: tonic refuses CA
    /// certificates beside a custom verifier, which brings its own.
    pub(crate) fn config_without_roots(
        &self,
    ) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some((cert, key)) = &self.identity {
            read_certificates(cert)?;
            read_private_key(key)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        Ok(config)
    }
}

/// An endpoint for `address` (`host:port`): `https` with `tls`, `http` without.
pub fn endpoint(
    address: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Endpoint, Box<dyn std::error::Error + Send + Sync>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))?;
    Ok(match tls {
        Some(tls) => endpoint.tls_config(tls.config()?)?,
        None => endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new() -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test ca");
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
            Self {
                dir,
                ca_pem: cert.pem(),
                ca: rcgen::Issuer::new(params, key),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Writes a leaf for 127.0.0.1 named `cn` as `<file>.pem`/`<file>-key.pem`, replacing
        /// any previous one by rename (as a secret volume swaps its files).
        fn leaf(&self, file: &str, cn: &str) {
            let mut params = rcgen::CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            for (name, text) in [
                (format!("{file}.pem"), cert.pem()),
                (format!("{file}-key.pem"), key.serialize_pem()),
            ] {
                let tmp = self.path(&format!("{name}.tmp"));
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, self.path(&name)).unwrap();
            }
        }
    }

    /// The leaf certificate a TLS client is served by `addr`.
    async fn served_leaf(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_served_without_a_restart() {
        let pki = Pki::new();
        pki.leaf("server", "server-first");
        let files = TlsFiles {
            cert_file: Some(pki.path("server.pem")),
            key_file: Some(pki.path("server-key.pem")),
            ..Default::default()
        };
        let tls = files.server(Alpn::Http).unwrap().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut incoming = listen(listener, tls, ConnectionTimeouts::default()).unwrap();
        let addr = incoming.local_addr();
        // Complete the server side of each handshake.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(Ok(stream)) = futures::StreamExt::next(&mut incoming).await {
                held.push(stream);
            }
        });

        let first = read_certificates(&pki.path("server.pem"))
            .unwrap()
            .remove(0);
        assert_eq!(served_leaf(addr, &pki.ca_pem).await, first);
        pki.leaf("server", "server-second");
        let second = read_certificates(&pki.path("server.pem"))
            .unwrap()
            .remove(0);
        assert_ne!(first, second);
        assert_eq!(served_leaf(addr, &pki.ca_pem).await, second);

        // A half-written rotation (a key that does not fit) keeps serving the last good pair.
        std::fs::write(
            pki.path("server-key.pem"),
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert_eq!(served_leaf(addr, &pki.ca_pem).await, second);
        server.abort();
    }

    #[test]
    fn bad_files_and_flag_combinations_are_named() {
        let pki = Pki::new();
        let only_cert = TlsFiles {
            cert_file: Some(pki.path("ca.pem")),
            ..Default::default()
        };
        assert!(
            only_cert
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--tls-key-file")
        );
        let missing = TlsFiles {
            cert_file: Some(pki.path("missing.pem")),
            key_file: Some(pki.path("missing-key.pem")),
            ..Default::default()
        };
        let error = missing.server(Alpn::Grpc).unwrap_err().to_string();
        assert!(error.contains("missing.pem"), "{error}");
        std::fs::write(pki.path("empty.pem"), "not pem").unwrap();
        let error = read_certificates(&pki.path("empty.pem"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no PEM certificate"), "{error}");
        assert!(TlsFiles::default().server(Alpn::Grpc).unwrap().is_none());
        assert!(TlsFiles::default().client().is_none());
    }
}
