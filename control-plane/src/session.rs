//! Dashboard sessions: what the sign-in cookie carries instead of the admin token.
//!
//! Signing in trades the token for `<payload>.<tag>` (base64url): the payload is
//! `{"sid", "name", "role", "exp"}` — a random session id, whose session it is and when it ends
//! — and the tag an HMAC-SHA256 of it under a key derived from every configured admin token.
//! So the cookie is never the token (it opens only this dashboard, not the gRPC API, and stops
//! working at `exp`), and needs no shared state: every replica started with the same tokens
//! file derives the same key and accepts a session another made (two replicas behind one
//! Kubernetes Service). Changing the tokens file changes the key and ends every session.
//!
//! Sign-out revokes the session id until its expiry: in etcd when the replicas elect through it
//! (`/switchyard/v1/dashboard/revoked/<sid>`, bound to a lease that ends with the session, so
//! every replica refuses it), else in this process's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use switchyard_cluster::schema::DASHBOARD_REVOKED_PREFIX;

use crate::auth::{AdminTokens, Caller, Denied, Role};

/// How long a sign-in lasts.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// How long a session check waits for etcd.
const ETCD_TIMEOUT: Duration = Duration::from_secs(2);

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a session credential says (signed, not secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Claims {
    sid: String,
    name: String,
    role: Role,
    exp: u64,
}

/// The key sessions are signed with, derived from the admin tokens.
#[derive(Clone)]
pub struct SessionKey(hmac::Key);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    /// The same tokens file gives the same key on every replica; only someone holding every
    /// token (or their digests) could compute it, so a viewer cannot mint an operator session.
    pub fn derive(tokens: &AdminTokens) -> Self {
        let mut entries: Vec<([u8; 32], &Caller)> = tokens.entries().collect();
        entries.sort_by_key(|(digest, _)| *digest);
        let mut hash = Sha256::new();
        hash.update(b"switchyard dashboard session key v1\0");
        for (digest, caller) in entries {
            hash.update(digest);
            hash.update(caller.name.as_bytes());
            hash.update([0]);
            hash.update(caller.role.as_str().as_bytes());
            hash.update([0]);
        }
        Self(hmac::Key::new(hmac::HMAC_SHA256, &hash.finalize()))
    }

    /// A new session for `caller` ending at `exp` (unix seconds): the cookie value.
    fn issue(&self, caller: &Caller, exp: u64) -> String {
        let mut sid = [0u8; 16];
        SystemRandom::new()
            .fill(&mut sid)
            .expect("the operating system's random source works");
        let claims = Claims {
            sid: URL_SAFE_NO_PAD.encode(sid),
            name: caller.name.clone(),
            role: caller.role,
            exp,
        };
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let tag = hmac::sign(&self.0, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of a credential this key signed (expired or not); `None` for anything else.
    fn open(&self, value: &str) -> Option<Claims> {
        let (payload, tag) = value.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        // Constant time: the tag is what an attacker would guess byte by byte.
        hmac::verify(&self.0, payload.as_bytes(), &tag).ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }
}

/// Revoked session ids until their expiry.
#[derive(Clone, Default)]
pub struct Revocations {
    /// Revoked here: sid → expiry (unix s). Also the only record without etcd.
    local: Arc<Mutex<HashMap<String, u64>>>,
    /// Shared with the other replicas.
    etcd: Option<etcd_client::Client>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("etcd", &self.etcd.is_some())
            .finish()
    }
}

impl Revocations {
    /// Revocations every replica sharing this etcd sees.
    pub fn in_etcd(client: etcd_client::Client) -> Self {
        Self {
            local: Arc::default(),
            etcd: Some(client),
        }
    }

    fn key(sid: &str) -> String {
        format!("{DASHBOARD_REVOKED_PREFIX}{sid}")
    }

    async fn revoke(&self, sid: &str, exp: u64) -> Result<(), String> {
        let now = now_s();
        {
            let mut local = self.local.lock().expect("revocations lock");
            local.retain(|_, until| *until > now);
            local.insert(sid.to_string(), exp);
        }
        let Some(client) = &self.etcd else {
            return Ok(());
        };
        let mut client = client.clone();
        let ttl = i64::try_from(exp.saturating_sub(now).max(1)).unwrap_or(i64::MAX);
        let write = async {
            let lease = client.lease_grant(ttl, None).await?.id();
            client
                .put(
                    Self::key(sid),
                    "signed out",
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await?;
            Ok::<_, etcd_client::Error>(())
        };
        match tokio::time::timeout(ETCD_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("etcd did not answer in time".into()),
        }
    }

    async fn is_revoked(&self, sid: &str) -> Result<bool, String> {
        if self
            .local
            .lock()
            .expect("revocations lock")
            .contains_key(sid)
        {
            return Ok(true);
        }
        let Some(client) = &self.etcd else {
            return Ok(false);
        };
        let mut client = client.clone();
        match tokio::time::timeout(ETCD_TIMEOUT, client.get(Self::key(sid), None)).await {
            Ok(Ok(found)) => Ok(!found.kvs().is_empty()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("etcd did not answer in time".into()),
        }
    }
}

/// Issues, checks and ends dashboard sessions; `key` is `None` when no admin tokens are
/// configured (nothing to sign in to).
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    key: Option<SessionKey>,
    revoked: Revocations,
}

impl Sessions {
    pub fn new(key: Option<SessionKey>, revoked: Revocations) -> Self {
        Self { key, revoked }
    }

    /// A session for `caller` (signed in with a token just checked) and its lifetime.
    pub fn issue(&self, caller: &Caller) -> Option<String> {
        let key = self.key.as_ref()?;
        Some(key.issue(caller, now_s() + LIFETIME.as_secs()))
    }

    /// Whose session `value` is: refused when it was not signed with this key, has expired or
    /// was signed out.
    pub async fn caller(&self, value: &str) -> Result<Caller, Denied> {
        let claims = self
            .key
            .as_ref()
            .and_then(|key| key.open(value))
            .ok_or(Denied::SessionInvalid)?;
        if claims.exp <= now_s() {
            return Err(Denied::SessionEnded);
        }
        match self.revoked.is_revoked(&claims.sid).await {
            Ok(false) => Ok(Caller {
                name: claims.name,
                role: claims.role,
            }),
            Ok(true) => Err(Denied::SessionEnded),
            Err(error) => Err(Denied::SessionUnchecked(error)),
        }
    }

    /// Ends the session `value` names, if it is one of ours and still running, and says whose
    /// it was; an error says why it could not be revoked for every replica.
    pub async fn end(&self, value: &str) -> Result<Option<Caller>, String> {
        let Some(claims) = self.key.as_ref().and_then(|key| key.open(value)) else {
            return Ok(None);
        };
        if claims.exp <= now_s() {
            return Ok(None);
        }
        self.revoked.revoke(&claims.sid, claims.exp).await?;
        Ok(Some(Caller {
            name: claims.name,
            role: claims.role,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(doc: &str) -> AdminTokens {
        AdminTokens::from_json(doc).unwrap()
    }

    const DOC: &str = r#"{"tokens": [
        {"name": "alice", "token": "op-token-0123456789", "role": "operator"},
        {"name": "bob", "token": "view-token-0123456789", "role": "viewer"}
    ]}"#;

    fn alice() -> Caller {
        Caller {
            name: "alice".into(),
            role: Role::Operator,
        }
    }

    #[tokio::test]
    async fn a_session_is_not_the_token_and_any_replica_with_the_same_tokens_accepts_it() {
        let one = Sessions::new(
            Some(SessionKey::derive(&tokens(DOC))),
            Revocations::default(),
        );
        let value = one.issue(&alice()).unwrap();
        assert!(!value.contains("op-token"), "{value}");
        // Another replica: same file, its own memory.
        let other = Sessions::new(
            Some(SessionKey::derive(&tokens(DOC))),
            Revocations::default(),
        );
        assert_eq!(other.caller(&value).await.unwrap(), alice());
        // Two sign-ins are two sessions.
        assert_ne!(one.issue(&alice()).unwrap(), value);
        // A replica with other tokens, a forged role, a token as cookie: all refused.
        let changed = DOC.replace("view-token", "view-token-new");
        let elsewhere = Sessions::new(
            Some(SessionKey::derive(&tokens(&changed))),
            Revocations::default(),
        );
        assert_eq!(elsewhere.caller(&value).await, Err(Denied::SessionInvalid));
        let (payload, tag) = value.split_once('.').unwrap();
        let mut claims: Claims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims.name = "mallory".into();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert_eq!(one.caller(&forged).await, Err(Denied::SessionInvalid));
        assert_eq!(
            one.caller("op-token-0123456789").await,
            Err(Denied::SessionInvalid)
        );
        assert_eq!(
            Sessions::default().caller(&value).await,
            Err(Denied::SessionInvalid)
        );
    }

    #[tokio::test]
    async fn an_expired_or_signed_out_session_is_refused() {
        let key = SessionKey::derive(&tokens(DOC));
        let sessions = Sessions::new(Some(key.clone()), Revocations::default());
        let expired = key.issue(&alice(), now_s() - 1);
        assert_eq!(sessions.caller(&expired).await, Err(Denied::SessionEnded));
        let value = sessions.issue(&alice()).unwrap();
        let again = sessions.issue(&alice()).unwrap();
        sessions.end(&value).await.unwrap();
        assert_eq!(sessions.caller(&value).await, Err(Denied::SessionEnded));
        // Only that session ended.
        assert_eq!(sessions.caller(&again).await.unwrap(), alice());
        // Ending nonsense is no error.
        sessions.end("nonsense").await.unwrap();
    }
}
