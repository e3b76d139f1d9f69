//! Who asked: the user from the agent's JWT, and the `session_id` cookie handled as the
//! seed's audit middleware does.
//!
//! The token is read, never kept: only the user name taken from its claims reaches the
//! record (`username`, else `preferred_username`, else `sub`). Without a configured
//! secret the claims are decoded unverified: the agent verifies the token itself, and a
//! forged one is refused there (its exchange is then recorded as the agent's `401` with
//! the name it claimed). With `audit.proxy.jwt_secret_env`, an HS256 signature that does
//! not verify gives no user: the claimed name goes to `attributes.user_unverified`
//! instead, so the record shows what was claimed without vouching for it.

use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ingest::opsagent::{session_in_cookies, session_in_set_cookie, session_set_cookie};

/// Claims naming the user, in order of preference.
const USER_CLAIMS: [&str; 3] = ["username", "preferred_username", "sub"];

/// How users are read from tokens.
pub struct Identity {
    /// The HS256 key signatures are checked with, when configured.
    key: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("verifies_signatures", &self.key.is_some()).finish()
    }
}

/// The user a request names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// The user, when the token names one (and verifies, when a secret is configured).
    pub user_id: Option<String>,
    /// The name a token claimed whose signature did not verify.
    pub unverified: Option<String>,
}

impl Identity {
    /// Reads claims unverified (`None`), or checks HS256 signatures with `secret`.
    pub fn new(secret: Option<&[u8]>) -> Identity {
        let key = secret.map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            // Only the signature matters here: the agent decides whether a token is still
            // valid, and the record shows its answer either way.
            validation.validate_exp = false;
            validation.validate_aud = false;
            validation.required_spec_claims.clear();
            (DecodingKey::from_secret(secret), validation)
        });
        Identity { key }
    }

    /// The user of a request, from its `Authorization: Bearer` token.
    pub fn user(&self, headers: &HeaderMap) -> User {
        let Some(token) = bearer_token(headers) else { return User::default() };
        let claimed = || jsonwebtoken::dangerous::insecure_decode_claims::<Map<String, Value>>(token).ok();
        match &self.key {
            None => User { user_id: claimed().as_ref().and_then(user_of), unverified: None },
            Some((key, validation)) => match jsonwebtoken::decode::<Map<String, Value>>(token, key, validation) {
                Ok(data) => User { user_id: user_of(&data.claims), unverified: None },
                Err(_) => User { user_id: None, unverified: claimed().as_ref().and_then(user_of) },
            },
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn user_of(claims: &Map<String, Value>) -> Option<String> {
    USER_CLAIMS.iter().find_map(|claim| match claims.get(*claim)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The request's session: its `session_id` cookie when that is a UUID, else a new one
/// (`true`: to be set on the response, as the seed does for a missing or invalid one).
pub fn session(headers: &HeaderMap) -> (Uuid, bool) {
    match session_in_cookies(headers.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok())) {
        Some(id) => (id, false),
        None => (Uuid::new_v4(), true),
    }
}

/// The session the agent set itself on its answer (a `Set-Cookie: session_id=…`), which
/// the proxy adopts rather than setting a second, different one.
pub fn upstream_session(headers: &HeaderMap) -> Option<Uuid> {
    headers.get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(session_in_set_cookie)
}

/// The `Set-Cookie` value for a new session, as the seed's gin `SetCookie` writes it.
pub fn session_cookie(id: Uuid) -> HeaderValue {
    // A UUID and fixed text: always a valid header value.
    HeaderValue::from_str(&session_set_cookie(id)).unwrap_or_else(|_| HeaderValue::from_static("session_id=; Path=/"))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn headers(pairs: &[(http::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn token(claims: Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn the_user_comes_from_the_claims_in_order_of_preference() {
        let id = Identity::new(None);
        for (claims, user) in [
            (json!({"username": "alice", "preferred_username": "a", "sub": "1"}), Some("alice")),
            (json!({"preferred_username": "bob", "sub": "2"}), Some("bob")),
            (json!({"sub": "carol"}), Some("carol")),
            (json!({"role": "admin"}), None),
        ] {
            let t = token(claims, b"whatever");
            let got = id.user(&headers(&[(AUTHORIZATION, &format!("Bearer {t}"))]));
            assert_eq!(got.user_id.as_deref(), user);
        }
        assert_eq!(id.user(&headers(&[(AUTHORIZATION, "Bearer not-a-jwt")])), User::default());
        assert_eq!(id.user(&headers(&[(AUTHORIZATION, "Basic YWxpY2U6cHc=")])), User::default());
        assert_eq!(id.user(&HeaderMap::new()), User::default());
    }

    #[test]
    fn with_a_secret_only_a_verified_token_names_the_user() {
        let id = Identity::new(Some(b"right"));
        let good = token(json!({"username": "alice", "exp": 1}), b"right");
        let forged = token(json!({"username": "mallory"}), b"wrong");
        let user = id.user(&headers(&[(AUTHORIZATION, &format!("Bearer {good}"))]));
        assert_eq!(user, User { user_id: Some("alice".into()), unverified: None });
        let user = id.user(&headers(&[(AUTHORIZATION, &format!("bearer {forged}"))]));
        assert_eq!(user, User { user_id: None, unverified: Some("mallory".into()) });
    }

    #[test]
    fn the_session_cookie_is_reused_when_valid_and_made_otherwise() {
        let known = Uuid::new_v4();
        let h = headers(&[(COOKIE, "theme=dark"), (COOKIE, &format!("lang=en; session_id={known}"))]);
        assert_eq!(session(&h), (known, false));
        let (id, new) = session(&headers(&[(COOKIE, "session_id=not-a-uuid")]));
        assert!(new && id != known);
        assert!(session(&HeaderMap::new()).1);
        let cookie = session_cookie(known);
        assert_eq!(cookie.to_str().unwrap(), format!("session_id={known}; Path=/; Max-Age=86400; HttpOnly"));
    }
}
