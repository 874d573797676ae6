//! How a follower's dashboard dials the leader's to forward history, feed and ledger reads.
//!
//! Replicas run with the same flags, so a follower whose dashboard serves TLS dials the
//! leader's over `https`. With `--tls-ca-file` the leader's certificate must chain to that CA
//! and name `spiffe://switchyard/control-plane`, as routers check before reporting to it; the
//! dialled host is not checked against its DNS/IP names (the follower dials the leader's pod
//! IP, which no certificate names). The follower presents its own certificate when the leader
//! asks for one. Without a CA, the system's roots and the host name are checked.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use switchyard_cluster::identity::{control_plane_uri, uri_sans};
use switchyard_cluster::tls::{TlsFiles, read_certificates, read_private_key};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How a follower reaches the leader's dashboard.
#[derive(Debug, Clone, Default)]
pub struct LeaderDialer {
    /// The dashboards serve TLS; its files (CA, client identity) when they do.
    tls: Option<TlsFiles>,
    timeout: Duration,
}

impl LeaderDialer {
    /// `https` when this replica's dashboard serves TLS (`tls.serves_tls()`).
    pub fn new(tls: &TlsFiles, timeout: Duration) -> Self {
        Self {
            tls: tls.serves_tls().then(|| tls.clone()),
            timeout,
        }
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// A client for the next forward. Over TLS it is built from the files now, so a rotated
    /// CA or client certificate is used from the next read on (a read a second per open page:
    /// the handshake is cheap next to that).
    pub fn client(&self) -> Result<reqwest::Client, Error> {
        let Some(tls) = &self.tls else {
            static PLAIN: OnceLock<reqwest::Client> = OnceLock::new();
            return Ok(PLAIN
                .get_or_init(|| {
                    reqwest::Client::builder()
                        .timeout(self.timeout)
                        .build()
                        .unwrap_or_default()
                })
                .clone());
        };
        let builder = reqwest::Client::builder().timeout(self.timeout);
        let Some(ca_file) = &tls.ca_file else {
            return Ok(builder.https_only(true).build()?);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certificates(ca_file)? {
            roots.add(cert)?;
        }
        let roots = Arc::new(roots);
        let verifier = Arc::new(ControlPlaneVerifier {
            webpki: WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()?,
            roots,
            algorithms: provider.signature_verification_algorithms.all,
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                config.with_client_auth_cert(read_certificates(cert)?, read_private_key(key)?)?
            }
            _ => config.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(builder.use_preconfigured_tls(config).build()?)
    }
}

/// Accepts a certificate of the cluster CA that names the control plane, whatever the host.
#[derive(Debug)]
struct ControlPlaneVerifier {
    roots: Arc<rustls::RootCertStore>,
    /// Checks the handshake signatures as any WebPKI client does.
    webpki: Arc<WebPkiServerVerifier>,
    algorithms: &'static [&'static dyn rustls::pki_types::SignatureVerificationAlgorithm],
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms,
        )?;
        let expected = control_plane_uri();
        let presented = uri_sans(end_entity);
        if presented.contains(&expected) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
