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

use switchyard_cluster::identity;
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
        // The leader's certificate must name the control plane, whatever its pod IP.
        let (verifier, _) = identity::verifier(roots, identity::control_plane_uri())?;
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
