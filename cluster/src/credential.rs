//! The cluster credential: a shared secret that routers and control planes present on their
//! `Worker.Serve` links (`authorization: Bearer <token>`) and that workers require, so only
//! cluster members can make a worker generate. It is the interim measure until mutual TLS with
//! a cluster CA: it proves membership, not which member, and travels in clear without TLS.
//!
//! Loaded from a file (`--cluster-token-file`: its first line; a Kubernetes Secret mount).
//! Only the SHA-256 digest is compared, in constant time; `Debug` never shows the token.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The metadata key the token travels in.
const AUTHORIZATION: &str = "authorization";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cluster token file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster token file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// The shared cluster token.
#[derive(Clone)]
pub struct ClusterToken {
    token: String,
    digest: [u8; 32],
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

impl ClusterToken {
    /// A token of at least 16 printable ASCII characters without spaces (it is a header value).
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < 16 {
            return Err(
                "the token must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
            );
        }
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err("the token may only use printable ASCII without spaces".into());
        }
        Ok(Self {
            token: token.to_string(),
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Reads the token from the first line of `path`.
    pub fn load(path: &Path) -> Result<Self, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(text.lines().next().unwrap_or_default()).map_err(|problem| {
            CredentialError::Invalid {
                path: path.to_path_buf(),
                problem,
            }
        })
    }

    /// Attaches the token to an outgoing call.
    pub fn apply<T>(&self, request: &mut tonic::Request<T>) {
        let value = format!("Bearer {}", self.token)
            .parse()
            .expect("validated as printable ASCII");
        request.metadata_mut().insert(AUTHORIZATION, value);
    }

    /// Lets an incoming call through only if it carries this token; `UNAUTHENTICATED` with what
    /// to do otherwise. Suits `tonic`'s interceptors.
    pub fn check<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(presented) = presented else {
            return Err(tonic::Status::unauthenticated(
                "this worker serves cluster members only: send the cluster token \
                 (`authorization: Bearer <token>`; routers and control planes take it from \
                 --cluster-token-file); clients go through a router",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if bool::from(self.digest.ct_eq(&digest)) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated(
                "cluster token not recognised: every router, control plane and worker must use \
                 the same --cluster-token-file",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_passes() {
        let token = ClusterToken::new("cluster-secret-0123456789").unwrap();
        let mut request = tonic::Request::new(());
        assert_eq!(
            token.check(&request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        token.apply(&mut request);
        token.check(&request).unwrap();
        let other = ClusterToken::new("another-secret-0123456789").unwrap();
        let err = other.check(&request).unwrap_err();
        assert!(err.message().contains("not recognised"), "{err}");
        assert!(ClusterToken::new("short").is_err());
        assert!(ClusterToken::new("has a space in it, long enough").is_err());
        assert!(!format!("{token:?}").contains("secret"));
    }
}
