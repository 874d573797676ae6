//! Admin tokens: who may change the cluster through the control plane.
//!
//! Loaded from `--admin-tokens-file`, a JSON document
//! `{"tokens": [{"name": "alice", "token": "…", "role": "operator"}]}`. Roles: `viewer` (may
//! read, which everyone may today, and is refused writes with `PERMISSION_DENIED` / 403) and
//! `operator` (may drain, undrain and set the policy). Tokens are secrets: only their SHA-256
//! digests are kept, a presented token is compared with every entry in constant time, and
//! neither `Debug` nor any error shows one. Without a tokens file the control plane is open,
//! as before (the cross-site guard still applies to the dashboard).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use switchyard_cluster::telemetry::metrics::Metrics;
use tracing::warn;

/// The cookie the dashboard's sign-in sets (HttpOnly, SameSite=Strict, Secure over TLS): a
/// session credential ([`crate::session`]), never the token.
pub const COOKIE: &str = "switchyard_admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// Who made a request: a token's name and role, or `anonymous` when no tokens are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Why a file was refused; messages name the entry at fault, never a token.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("admin tokens file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin tokens file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "not a valid admin tokens document ({{\"tokens\": [{{\"name\", \"token\", \"role\": \"viewer\"|\"operator\"}}]}}): {0}"
    )]
    Syntax(String),
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

/// Why a write was not allowed; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "admin token required: send `authorization: Bearer <token>` with an operator token (dashboard: sign in)"
    )]
    Missing,
    #[error("authorization: expected `Bearer <token>`")]
    Malformed,
    #[error("admin token not recognised; check it, or ask for an operator token")]
    Unknown,
    #[error("the dashboard session has ended (expired or signed out); sign in again")]
    SessionEnded,
    /// A session cookie this control plane did not sign as it reads: altered, forged, or signed
    /// with another tokens file's key (changing the file ends every session).
    #[error(
        "the dashboard sign-in session is not valid (expired, signed out, or altered); sign in again"
    )]
    SessionInvalid,
    #[error("cannot check the dashboard session now: {0}")]
    SessionUnchecked(String),
    #[error("{name} is a {role} and may not {action}; an operator token is needed")]
    Forbidden {
        name: String,
        role: &'static str,
        action: String,
    },
}

impl Denied {
    /// Every refusal's metric label, in [`Denied::reason`]'s words.
    pub const REASONS: [&'static str; 7] = [
        "missing",
        "malformed",
        "unknown",
        "session_ended",
        "session_invalid",
        "session_unchecked",
        "viewer",
    ];

    /// Why, as a metric label and log field: one of [`Denied::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Malformed => "malformed",
            Denied::Unknown => "unknown",
            Denied::SessionEnded => "session_ended",
            Denied::SessionInvalid => "session_invalid",
            Denied::SessionUnchecked(_) => "session_unchecked",
            Denied::Forbidden { .. } => "viewer",
        }
    }
}

impl From<Denied> for tonic::Status {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Forbidden { .. } => tonic::Status::permission_denied(denied.to_string()),
            _ => tonic::Status::unauthenticated(denied.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    token: String,
    role: Role,
}

/// The configured tokens (digests) and whose they are.
#[derive(Clone)]
pub struct AdminTokens {
    entries: Vec<([u8; 32], Caller)>,
}

impl fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|(_, c)| c.name.as_str()).collect();
        f.debug_struct("AdminTokens")
            .field("tokens", &"<redacted>")
            .field("names", &names)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn invalid(field: String, problem: impl Into<String>) -> TokensError {
    TokensError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// Characters a token may use: it travels in a header and in a cookie.
fn token_char(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, ';' | ',' | '"' | '\\')
}

impl AdminTokens {
    /// `(name, token, role)` triples: names and tokens non-empty and unique, at least one.
    pub fn new(
        entries: impl IntoIterator<Item = (String, String, Role)>,
    ) -> Result<Self, TokensError> {
        let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
        let mut out: Vec<([u8; 32], Caller)> = Vec::new();
        for (i, (name, token, role)) in entries.into_iter().enumerate() {
            if name.trim().is_empty() {
                return Err(invalid(format!("tokens[{i}].name"), "must not be empty"));
            }
            if out.iter().any(|(_, c)| c.name == name) {
                return Err(invalid(
                    format!("tokens[{i}].name"),
                    format!("{name:?} is used twice; names identify who made a change"),
                ));
            }
            if token.len() < 16 {
                return Err(invalid(
                    format!("tokens[{i}].token"),
                    "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
                ));
            }
            if !token.chars().all(token_char) {
                return Err(invalid(
                    format!("tokens[{i}].token"),
                    "may use printable ASCII except space, `;`, `,`, `\"` and `\\` (it is sent in a header and a cookie)",
                ));
            }
            let hash = digest(&token);
            if let Some(first) = seen.insert(hash, i) {
                return Err(invalid(
                    format!("tokens[{i}].token"),
                    format!("duplicates tokens[{first}].token; every token must be unique"),
                ));
            }
            out.push((hash, Caller { name, role }));
        }
        if out.is_empty() {
            return Err(invalid(
                "tokens".into(),
                "must list at least one token (omit the file to leave the control plane open)",
            ));
        }
        Ok(Self { entries: out })
    }

    pub fn from_json(text: &str) -> Result<Self, TokensError> {
        let document: Document =
            serde_json::from_str(text).map_err(|e| TokensError::Syntax(e.to_string()))?;
        Self::new(
            document
                .tokens
                .into_iter()
                .map(|e| (e.name, e.token, e.role)),
        )
    }

    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| TokensError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Every entry: the token's digest and whose it is.
    pub fn entries(&self) -> impl Iterator<Item = ([u8; 32], &Caller)> {
        self.entries
            .iter()
            .map(|(digest, caller)| (*digest, caller))
    }

    /// Whose `token` is, comparing digests with every entry in constant time.
    pub fn caller(&self, token: &str) -> Option<&Caller> {
        let presented = digest(token);
        let mut found = None;
        for (stored, caller) in &self.entries {
            if bool::from(stored.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found
    }

    /// Who sent the `authorization` value (`None`: absent).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Denied> {
        let value = authorization.map(str::trim).unwrap_or_default();
        if value.is_empty() {
            return Err(Denied::Missing);
        }
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denied::Malformed);
        }
        self.token(token.trim())
    }

    /// Who `token` belongs to (a sign-in's).
    pub fn token(&self, token: &str) -> Result<Caller, Denied> {
        if token.is_empty() {
            return Err(Denied::Missing);
        }
        self.caller(token).cloned().ok_or(Denied::Unknown)
    }
}

/// A refusal's labels: why ([`Denied::reason`]) and through which front door (`grpc`,
/// `dashboard`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
    pub via: &'static str,
}

/// The control plane's access rule: open without tokens, operators only for writes with them.
#[derive(Debug, Clone, Default)]
pub struct Access {
    tokens: Option<AdminTokens>,
    /// Signs the dashboard's sessions; derived from `tokens`.
    session_key: Option<crate::session::SessionKey>,
    /// Refused credentials, counted by both front doors (clones share the counts).
    refusals: Family<RefusalLabels, Counter>,
}

impl Access {
    pub fn new(tokens: Option<AdminTokens>) -> Self {
        let session_key = tokens.as_ref().map(crate::session::SessionKey::derive);
        Self {
            tokens,
            session_key,
            refusals: Family::default(),
        }
    }

    /// Registers `switchyard_control_plane_admin_refusals_total`, every series at 0 (an alert's
    /// `rate` reads 0 before the first refusal, not "no data").
    pub fn register_metrics(&self, metrics: &Metrics) {
        for via in ["grpc", "dashboard"] {
            for reason in Denied::REASONS {
                let _ = self.refusals.get_or_create(&RefusalLabels { reason, via });
            }
        }
        let refusals = self.refusals.clone();
        metrics.register(|r| {
            r.register(
                "switchyard_control_plane_admin_refusals",
                "Admin writes and dashboard sign-ins refused for their credential, by reason and front door",
                refusals,
            )
        });
    }

    /// Logs and counts a refused credential: token guessing or a misconfigured client shows
    /// in the log and the metrics, not only the writes that succeed. Who only when known (a
    /// viewer, also recorded on the call's span), the peer's address when the front door has
    /// it; never the token.
    pub fn refused(
        &self,
        via: &'static str,
        action: &str,
        peer: Option<std::net::SocketAddr>,
        denied: &Denied,
    ) {
        let reason = denied.reason();
        self.refusals
            .get_or_create(&RefusalLabels { reason, via })
            .inc();
        let who = match denied {
            Denied::Forbidden { name, role, .. } => {
                crate::spans::record_caller(name, role);
                name.as_str()
            }
            _ => "(unauthenticated)",
        };
        let peer = peer.map(tracing::field::display);
        warn!(%who, via, action, reason, peer, error = %denied, "admin refused");
    }

    pub fn required(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn session_key(&self) -> Option<crate::session::SessionKey> {
        self.session_key.clone()
    }

    /// `anonymous` operator when no tokens are configured.
    fn anonymous() -> Caller {
        Caller {
            name: "anonymous".into(),
            role: Role::Operator,
        }
    }

    /// Who sent the `authorization` header value (`None`: absent).
    pub fn identify(&self, bearer: Option<&str>) -> Result<Caller, Denied> {
        match &self.tokens {
            None => Ok(Self::anonymous()),
            Some(tokens) => tokens.authenticate(bearer),
        }
    }

    /// Who `token` (a bare token, as signed in with) belongs to.
    pub fn identify_token(&self, token: &str) -> Result<Caller, Denied> {
        match &self.tokens {
            None => Ok(Self::anonymous()),
            Some(tokens) => tokens.token(token),
        }
    }

    /// The caller, if allowed to do `action` (a write).
    pub fn operator(&self, bearer: Option<&str>, action: &str) -> Result<Caller, Denied> {
        allowed(self.identify(bearer)?, action)
    }
}

/// `caller`, if an operator: only operators write.
pub fn allowed(caller: Caller, action: &str) -> Result<Caller, Denied> {
    if caller.role != Role::Operator {
        return Err(Denied::Forbidden {
            name: caller.name,
            role: caller.role.as_str(),
            action: action.to_string(),
        });
    }
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"tokens": [
        {"name": "alice", "token": "op-token-0123456789", "role": "operator"},
        {"name": "bob", "token": "view-token-0123456789", "role": "viewer"}
    ]}"#;

    #[test]
    fn operators_write_viewers_do_not_and_strangers_are_unauthenticated() {
        let access = Access::new(Some(AdminTokens::from_json(DOC).unwrap()));
        let alice = access
            .operator(Some("Bearer op-token-0123456789"), "drain")
            .unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(
            access.identify_token("op-token-0123456789").unwrap().name,
            "alice"
        );
        let denied = access
            .operator(Some("bearer view-token-0123456789"), "drain gpu-0")
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(denied.clone()).code(),
            tonic::Code::PermissionDenied
        );
        assert!(denied.to_string().contains("bob is a viewer"), "{denied}");
        for bearer in [
            None,
            Some("Bearer nope-nope-nope-nope"),
            Some("op-token-0123456789"),
        ] {
            let denied = access.operator(bearer, "drain").unwrap_err();
            assert_eq!(
                tonic::Status::from(denied).code(),
                tonic::Code::Unauthenticated
            );
        }
        let open = Access::default();
        assert_eq!(open.operator(None, "drain").unwrap().name, "anonymous");
    }

    #[test]
    fn files_are_validated_without_showing_tokens() {
        let problem = |text: &str| AdminTokens::from_json(text).unwrap_err().to_string();
        assert!(problem(r#"{"tokens": []}"#).starts_with("tokens: must list"));
        assert!(
            problem(r#"{"tokens": [{"name": "a", "token": "short", "role": "operator"}]}"#)
                .starts_with("tokens[0].token: must be at least 16")
        );
        assert!(
            problem(r#"{"tokens": [{"name": "a", "token": "0123456789abcdef", "role": "root"}]}"#)
                .contains("root")
        );
        let duplicate = problem(
            r#"{"tokens": [{"name": "a", "token": "secret-secret-secret", "role": "operator"},
                           {"name": "b", "token": "secret-secret-secret", "role": "viewer"}]}"#,
        );
        assert!(duplicate.starts_with("tokens[1].token: duplicates"));
        assert!(!duplicate.contains("secret-secret"), "{duplicate}");
        assert!(
            problem(
                r#"{"tokens": [{"name": "a", "token": "0123456789 abcdef", "role": "viewer"}]}"#
            )
            .contains("printable ASCII")
        );
        let tokens = AdminTokens::from_json(DOC).unwrap();
        let debug = format!("{tokens:?}");
        assert!(
            !debug.contains("token-0123") && debug.contains("alice"),
            "{debug}"
        );
    }
}
