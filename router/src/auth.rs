//! API keys → tenants: the key store behind both front doors' authentication.
//!
//! The store is loaded from a JSON file (`{"keys": [{"key": "sk-…", "tenant": "acme"}]}`) and
//! answers one question: which tenant does a presented `Authorization: Bearer <key>` belong
//! to. Keys are secrets: the store keeps only their SHA-256 digests, compares digests in
//! constant time against every entry (no early exit, no length leak), and its `Debug` shows
//! tenants, never keys. The front doors write the tenant found here into the request's
//! metadata `tenant`, over whatever the client sent, so the classifier's tenant policy applies.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use switchyard_proto::v1::GenerateRequest;

use crate::classify::TENANT_KEY;

/// The request header (HTTP) and metadata key (gRPC) carrying `Bearer <key>`.
pub const AUTHORIZATION: &str = "authorization";

/// Why a key file was refused. Messages name the entry at fault, never a key.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysError {
    #[error("api keys file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api keys file {path}: {source}")]
    File {
        path: PathBuf,
        source: Box<ApiKeysError>,
    },
    #[error("not a valid api keys document ({{\"keys\": [{{\"key\", \"tenant\"}}]}}): {0}")]
    Syntax(String),
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ApiKeysError {
    ApiKeysError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Why a request was not authenticated; each message tells the client what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "authorization: missing api key; send the header `authorization: Bearer <key>` with a key issued by the operator"
    )]
    Missing,
    #[error("authorization: expected `Bearer <key>`")]
    Malformed,
    #[error(
        "authorization: api key not recognised; check the key, or ask the operator for a valid one"
    )]
    Unknown,
}

impl AuthError {
    pub const ALL: [AuthError; 3] = [AuthError::Missing, AuthError::Malformed, AuthError::Unknown];

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        tonic::Status::unauthenticated(error.to_string())
    }
}

/// The tenant an authenticated request belongs to, attached to the request (as an extension)
/// by the front door's auth layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl Tenant {
    /// Writes the tenant into `request`'s metadata, replacing any client-supplied `tenant`:
    /// a client must not pick another tenant's lane.
    pub fn apply(&self, request: &mut GenerateRequest) {
        request
            .metadata
            .insert(TENANT_KEY.to_string(), self.0.clone());
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysDocument {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    tenant: String,
}

/// API keys and the tenant of each.
#[derive(Clone)]
pub struct ApiKeys {
    /// (SHA-256 of the key, tenant).
    entries: Vec<([u8; 32], String)>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tenants: Vec<&str> = self.entries.iter().map(|(_, t)| t.as_str()).collect();
        f.debug_struct("ApiKeys")
            .field("keys", &"<redacted>")
            .field("tenants", &tenants)
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Builds a store from `(key, tenant)` pairs: keys non-empty and unique, tenants non-empty.
    /// At least one key, so a configured store never locks everyone out silently.
    pub fn new<K, T>(entries: impl IntoIterator<Item = (K, T)>) -> Result<Self, ApiKeysError>
    where
        K: AsRef<str>,
        T: AsRef<str>,
    {
        let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, (key, tenant)) in entries.into_iter().enumerate() {
            let (key, tenant) = (key.as_ref(), tenant.as_ref());
            if key.trim().is_empty() {
                return Err(invalid(format!("keys[{i}].key"), "must not be empty"));
            }
            if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    format!("keys[{i}].key"),
                    "must not contain whitespace or control characters (it is sent in a header)",
                ));
            }
            if tenant.trim().is_empty() {
                return Err(invalid(format!("keys[{i}].tenant"), "must not be empty"));
            }
            let hash = digest(key);
            if let Some(first) = seen.insert(hash, i) {
                return Err(invalid(
                    format!("keys[{i}].key"),
                    format!("duplicates keys[{first}].key; every key must be unique"),
                ));
            }
            out.push((hash, tenant.to_string()));
        }
        if out.is_empty() {
            return Err(invalid(
                "keys",
                "must list at least one key (omit the file to turn authentication off)",
            ));
        }
        Ok(Self { entries: out })
    }

    /// Parses and validates a key document.
    pub fn from_json(text: &str) -> Result<Self, ApiKeysError> {
        let document: KeysDocument =
            serde_json::from_str(text).map_err(|e| ApiKeysError::Syntax(e.to_string()))?;
        Self::new(document.keys.into_iter().map(|e| (e.key, e.tenant)))
    }

    /// Reads, parses and validates the key file at `path`.
    pub fn load(path: &Path) -> Result<Self, ApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| ApiKeysError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `key`. Compares the key's digest with every entry in constant time, so
    /// neither the position of a match nor a shared prefix shows in the timing.
    /// Every tenant a key names.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, tenant)| tenant.as_str())
    }

    pub fn tenant(&self, key: &str) -> Option<&str> {
        let presented = digest(key);
        let mut found = None;
        for (stored, tenant) in &self.entries {
            let equal: bool = stored.ct_eq(&presented).into();
            if equal {
                found = Some(tenant.as_str());
            }
        }
        found
    }

    /// Authenticates the value of an `authorization` header (`None` when absent).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Tenant, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?.trim();
        if value.is_empty() {
            return Err(AuthError::Missing);
        }
        let (scheme, key) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        let key = key.trim();
        if key.is_empty() {
            return Err(AuthError::Missing);
        }
        self.tenant(key)
            .map(|t| Tenant(t.to_string()))
            .ok_or(AuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"keys": [
        {"key": "sk-acme-1", "tenant": "acme"},
        {"key": "sk-acme-2", "tenant": "acme"},
        {"key": "sk-globex", "tenant": "globex"}
    ]}"#;

    fn problem(text: &str) -> String {
        ApiKeys::from_json(text).expect_err("refused").to_string()
    }

    #[test]
    fn parses_and_looks_up_keys() {
        let keys = ApiKeys::from_json(DOC).expect("valid");
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.tenant("sk-acme-1"), Some("acme"));
        assert_eq!(keys.tenant("sk-acme-2"), Some("acme"));
        assert_eq!(keys.tenant("sk-globex"), Some("globex"));
        assert_eq!(keys.tenant("sk-acme"), None);
        assert_eq!(keys.tenant("sk-acme-1 "), None);
        assert_eq!(keys.tenant(""), None);
    }

    #[test]
    fn authenticates_bearer_headers() {
        let keys = ApiKeys::from_json(DOC).expect("valid");
        let acme = Ok(Tenant("acme".into()));
        assert_eq!(keys.authenticate(Some("Bearer sk-acme-1")), acme);
        assert_eq!(keys.authenticate(Some("bearer  sk-acme-1 ")), acme);
        assert_eq!(keys.authenticate(None), Err(AuthError::Missing));
        assert_eq!(keys.authenticate(Some("")), Err(AuthError::Missing));
        assert_eq!(keys.authenticate(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(
            keys.authenticate(Some("sk-acme-1")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            keys.authenticate(Some("Basic sk-acme-1")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            keys.authenticate(Some("Bearer sk-nope")),
            Err(AuthError::Unknown)
        );
        let status = tonic::Status::from(AuthError::Missing);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("Bearer"));
    }

    #[test]
    fn validation_names_the_entry_at_fault() {
        assert_eq!(
            problem(
                r#"{"keys": [{"key": "a", "tenant": "x"}, {"key": "b", "tenant": "y"}, {"key": "c", "tenant": " "}]}"#
            ),
            "keys[2].tenant: must not be empty"
        );
        assert_eq!(
            problem(r#"{"keys": [{"key": "", "tenant": "x"}]}"#),
            "keys[0].key: must not be empty"
        );
        assert!(
            problem(r#"{"keys": [{"key": "sk a", "tenant": "x"}]}"#).starts_with("keys[0].key:")
        );
        let duplicate = problem(
            r#"{"keys": [{"key": "sk-1", "tenant": "x"}, {"key": "sk-1", "tenant": "y"}]}"#,
        );
        assert_eq!(
            duplicate,
            "keys[1].key: duplicates keys[0].key; every key must be unique"
        );
        assert!(problem(r#"{"keys": []}"#).starts_with("keys: must list at least one key"));
        assert!(problem("{").starts_with("not a valid api keys document"));
        assert!(problem(r#"{"keys": [{"key": "a"}]}"#).contains("tenant"));
        assert!(
            problem(r#"{"keys": [{"key": "a", "tenant": "x", "role": "admin"}]}"#).contains("role")
        );
    }

    #[test]
    fn keys_never_appear_in_debug_or_errors() {
        let keys = ApiKeys::from_json(DOC).expect("valid");
        let debug = format!("{keys:?}");
        assert!(!debug.contains("sk-"), "{debug}");
        assert!(debug.contains("acme") && debug.contains("redacted"));
        let duplicate = problem(
            r#"{"keys": [{"key": "sk-secret", "tenant": "x"}, {"key": "sk-secret", "tenant": "y"}]}"#,
        );
        assert!(!duplicate.contains("sk-secret"), "{duplicate}");
    }

    #[test]
    fn loads_a_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        std::fs::write(&path, DOC).expect("write");
        assert_eq!(ApiKeys::load(&path).expect("valid").len(), 3);
        std::fs::write(&path, r#"{"keys": [{"key": "k", "tenant": ""}]}"#).expect("write");
        let error = ApiKeys::load(&path).expect_err("refused").to_string();
        assert!(
            error.contains("keys.json") && error.contains("keys[0].tenant"),
            "{error}"
        );
        let missing = ApiKeys::load(&dir.path().join("absent.json")).expect_err("refused");
        assert!(matches!(missing, ApiKeysError::Read { .. }));
    }

    #[test]
    fn the_authenticated_tenant_overrides_client_metadata() {
        let mut request = GenerateRequest::default();
        request
            .metadata
            .insert(TENANT_KEY.to_string(), "globex".to_string());
        Tenant("acme".into()).apply(&mut request);
        assert_eq!(request.metadata[TENANT_KEY], "acme");
    }
}
