//! Who a peer is, by its certificate rather than by its address.
//!
//! A worker record in etcd names a worker (its id and pool) and where to dial it. Anyone who can
//! write one key under `workers/` could otherwise point a record at any address, so with TLS on
//! a link to a worker is made only to a certificate that names the worker of the record: a URI
//! subject alternative name
//!
//! ```text
//! spiffe://switchyard/pool/<pool>/worker/<worker-id>
//! ```
//!
//! (SPIFFE-style, the form Linkerd and Istio use; cert-manager sets it with `uriSANs` on a
//! `Certificate` or `csi.cert-manager.io/uri-sans` on a csi-driver volume). The control plane's
//! certificate names `spiffe://switchyard/control-plane`.
//!
//! Such a link checks that the certificate chains to the cluster CA and names the expected
//! identity; it does not check the dialled host against the certificate's DNS and IP names.
//! The address comes from the same record as the identity, so the name binds nothing the
//! identity does not, and per-pod certificates cannot carry the pod IP (it is assigned after
//! the certificate is issued).

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::Pool;
use crate::tls::{ClientTls, TlsError};

/// The SPIFFE trust domain of every Switchyard identity.
pub const TRUST_DOMAIN: &str = "switchyard";

/// The identity a worker's certificate carries (URI SAN). Characters outside RFC 3986's
/// unreserved set are percent-encoded, so any worker id gives one valid URI.
pub fn worker_uri(pool: Pool, worker_id: &str) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/pool/{pool}/worker/{}",
        percent_encode(worker_id)
    )
}

/// The identity a control plane's certificate carries (URI SAN): every replica the same, since
/// any of them may lead.
pub fn control_plane_uri() -> String {
    format!("spiffe://{TRUST_DOMAIN}/control-plane")
}

/// The identity a router's certificate carries (URI SAN): every replica the same. A replica
/// reads the responses another stored at that replica's advertised pod IP, which no issued
/// certificate names.
pub fn router_uri() -> String {
    format!("spiffe://{TRUST_DOMAIN}/router")
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The URI subject alternative names of a DER certificate (none if it does not parse).
pub fn uri_sans(cert: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        })
        .collect()
}

/// A certificate that chained to the cluster CA but named someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMismatch {
    pub expected: String,
    /// The certificate's URI SANs (empty: it names no identity at all).
    pub presented: Vec<String>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.presented.is_empty() {
            write!(
                f,
                "the certificate names no identity (no URI SAN), expected {}",
                self.expected
            )
        } else {
            write!(
                f,
                "the certificate names {}, expected {}",
                self.presented.join(", "),
                self.expected
            )
        }
    }
}

impl std::error::Error for IdentityMismatch {}

/// What one link's handshakes found: the mismatch of the last refused certificate, if any.
#[derive(Debug, Clone, Default)]
pub struct IdentityCheck {
    rejected: Arc<Mutex<Option<IdentityMismatch>>>,
}

impl IdentityCheck {
    /// The mismatch of a refused handshake since the last call (taken).
    pub fn take_rejection(&self) -> Option<IdentityMismatch> {
        self.rejected.lock().expect("identity check lock").take()
    }
}

/// Checks the chain to the cluster CA and that the end-entity certificate names `expected`.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<rustls::RootCertStore>,
    /// For the handshake signatures, which are checked as by any WebPKI client.
    webpki: Arc<WebPkiServerVerifier>,
    algorithms: &'static [&'static dyn rustls::pki_types::SignatureVerificationAlgorithm],
    expected: String,
    check: IdentityCheck,
}

impl ServerCertVerifier for IdentityVerifier {
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
        let presented = uri_sans(end_entity);
        if presented.contains(&self.expected) {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = IdentityMismatch {
            expected: self.expected.clone(),
            presented,
        };
        let error = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(IdentityError(mismatch.to_string())),
        )));
        *self.check.rejected.lock().expect("identity check lock") = Some(mismatch);
        Err(error)
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

#[derive(Debug)]
struct IdentityError(String);

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

/// An `https` endpoint for `address` that completes its handshake only with a certificate of
/// `tls`'s CA naming `expected` (see the module documentation), presenting `tls`'s client
/// certificate. The returned check reports a refused identity.
pub fn endpoint(
    address: &str,
    tls: &ClientTls,
    expected: String,
) -> Result<(tonic::transport::Endpoint, IdentityCheck), Box<dyn std::error::Error + Send + Sync>> {
    let (verifier, check) = verifier(tls.roots()?, expected)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{address}"))?
        .tls_config_with_verifier(tls.config_without_roots()?, verifier)?;
    Ok((endpoint, check))
}

/// A server-certificate verifier accepting a chain to `roots` whose end-entity certificate
/// names `expected`, whatever host was dialled (see the module documentation), and the check
/// that reports what it refused.
pub fn verifier(
    roots: rustls::RootCertStore,
    expected: String,
) -> Result<(Arc<dyn ServerCertVerifier>, IdentityCheck), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let check = IdentityCheck::default();
    let verifier = Arc::new(IdentityVerifier {
        roots,
        webpki,
        algorithms: provider.signature_verification_algorithms.all,
        expected,
        check: check.clone(),
    });
    Ok((verifier, check))
}

/// An endpoint for `address`: with `tls`, checking the peer is `expected` (see [`endpoint`]);
/// without, plaintext.
pub fn dial(
    address: &str,
    tls: Option<&ClientTls>,
    expected: String,
) -> Result<tonic::transport::Endpoint, Box<dyn std::error::Error + Send + Sync>> {
    match tls {
        Some(tls) => Ok(endpoint(address, tls, expected)?.0),
        None => crate::tls::endpoint(address, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_identities_are_uris_whatever_the_id() {
        assert_eq!(
            worker_uri(Pool::Gpu, "worker-gpu-7c9d-x2"),
            "spiffe://switchyard/pool/gpu/worker/worker-gpu-7c9d-x2"
        );
        assert_eq!(
            worker_uri(Pool::Wse, "a b/c"),
            "spiffe://switchyard/pool/wse/worker/a%20b%2Fc"
        );
        assert_eq!(control_plane_uri(), "spiffe://switchyard/control-plane");
        assert_eq!(router_uri(), "spiffe://switchyard/router");
    }

    #[test]
    fn uri_sans_are_read_from_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(worker_uri(Pool::Gpu, "g1")).unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            uri_sans(cert.der()),
            vec!["spiffe://switchyard/pool/gpu/worker/g1".to_string()]
        );
        assert!(uri_sans(b"not a certificate").is_empty());
    }
}
