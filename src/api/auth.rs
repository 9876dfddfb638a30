//! Authentication: `Authorization: Bearer <JWT>` (HS256, signature and expiry checked)
//! when `JWT_SECRET_KEY` is set, and/or `X-API-Key` with one of `API_KEYS`. Neither set:
//! open (with a warning at start). Keys are compared in constant time (as SHA-256 digests,
//! so not even their length leaks) and never logged. Failures are 401 `unauthorized`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ErrorCode};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 30;

/// Who may call the protected endpoints.
#[derive(Clone, Default)]
pub struct AuthConfig {
    jwt_secret: Option<Vec<u8>>,
    api_key_digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig").field("jwt", &self.jwt_secret.is_some()).field("api_keys", &self.api_key_digests.len()).finish()
    }
}

impl AuthConfig {
    /// From `JWT_SECRET_KEY` and the comma-separated `API_KEYS` (empty entries ignored).
    pub fn new(jwt_secret: Option<&str>, api_keys: Option<&str>) -> AuthConfig {
        let jwt_secret = jwt_secret.filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec());
        let api_key_digests = api_keys
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        AuthConfig { jwt_secret, api_key_digests }
    }

    /// No credentials configured: every endpoint is open.
    pub fn is_open(&self) -> bool {
        self.jwt_secret.is_none() && self.api_key_digests.is_empty()
    }

    pub fn jwt_enabled(&self) -> bool {
        self.jwt_secret.is_some()
    }

    pub fn api_keys_enabled(&self) -> bool {
        !self.api_key_digests.is_empty()
    }

    /// Checks the request's credentials.
    pub fn check(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), &'static str> {
        if self.is_open() {
            return Ok(());
        }
        // Either credential passes; the first failure explains a refusal.
        let mut failure = None;
        if !self.api_key_digests.is_empty()
            && let Some(key) = headers.get("x-api-key")
        {
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            // Look at every configured key, whatever matches, to keep the time flat.
            if self.api_key_digests.iter().fold(false, |acc, k| acc | constant_time_eq(k, &digest)) {
                return Ok(());
            }
            failure = Some("the API key is not valid");
        }
        if let Some(secret) = &self.jwt_secret
            && let Some(value) = headers.get(header::AUTHORIZATION)
        {
            let checked = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or("expected `Authorization: Bearer <token>`")
                .and_then(|token| verify_hs256(token.trim(), secret, now));
            match checked {
                Ok(()) => return Ok(()),
                Err(why) => failure = failure.or(Some(why)),
            }
        }
        if let Some(why) = failure {
            return Err(why);
        }
        Err(match (self.jwt_secret.is_some(), !self.api_key_digests.is_empty()) {
            (true, true) => "credentials required: `Authorization: Bearer <JWT>` or `X-API-Key`",
            (true, false) => "credentials required: `Authorization: Bearer <JWT>`",
            _ => "credentials required: `X-API-Key`",
        })
    }
}

/// Middleware for the protected routes.
pub async fn require_auth(State(auth): State<Arc<AuthConfig>>, req: Request, next: Next) -> Response {
    match auth.check(req.headers(), SystemTime::now()) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            let mut resp = ApiError::new(ErrorCode::Unauthorized, why).into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// Verifies an HS256 JWT: header `alg` must be HS256, the signature must match, `exp` must be
/// present and in the future, `nbf` (if any) in the past.
pub fn verify_hs256(token: &str, secret: &[u8], now: SystemTime) -> Result<(), &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("the token is not a JWT");
    };
    let header: serde_json::Value =
        b64url().decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or("the token's header is malformed")?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err("the token must be signed with HS256");
    }
    let signature = b64url().decode(s).map_err(|_| "the token's signature is malformed")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "server key unusable")?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&signature).map_err(|_| "the token's signature is not valid")?;
    let claims: serde_json::Value =
        b64url().decode(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or("the token's claims are malformed")?;
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let exp = claims.get("exp").and_then(serde_json::Value::as_f64).ok_or("the token has no expiry (`exp`)")?;
    if (exp as i64) + LEEWAY_SECS < now {
        return Err("the token has expired");
    }
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_f64)
        && (nbf as i64) - LEEWAY_SECS > now
    {
        return Err("the token is not valid yet");
    }
    Ok(())
}

/// Signs `claims` as an HS256 JWT (for operators' tooling and tests).
pub fn sign_hs256(claims: &serde_json::Value, secret: &[u8]) -> String {
    let h = b64url().encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = b64url().encode(claims.to_string().as_bytes());
    let sig = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(h.as_bytes());
            mac.update(b".");
            mac.update(p.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    };
    format!("{h}.{p}.{}", b64url().encode(sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(header::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn jwt_signature_expiry_and_algorithm_are_checked() {
        let secret = b"s3cret";
        let good = sign_hs256(&json!({"sub": "app", "exp": 2_000}), secret);
        assert_eq!(verify_hs256(&good, secret, at(1_000)), Ok(()));
        assert_eq!(verify_hs256(&good, secret, at(2_000 + LEEWAY_SECS as u64 + 1)), Err("the token has expired"));
        assert_eq!(verify_hs256(&good, b"other", at(1_000)), Err("the token's signature is not valid"));
        let no_exp = sign_hs256(&json!({"sub": "app"}), secret);
        assert_eq!(verify_hs256(&no_exp, secret, at(1_000)), Err("the token has no expiry (`exp`)"));
        let early = sign_hs256(&json!({"exp": 5_000, "nbf": 4_000}), secret);
        assert_eq!(verify_hs256(&early, secret, at(1_000)), Err("the token is not valid yet"));
        // alg "none" with the signature stripped is refused.
        let parts: Vec<&str> = good.split('.').collect();
        let none = format!("{}.{}.", b64url().encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(verify_hs256(&none, secret, at(1_000)), Err("the token must be signed with HS256"));
        // A tampered payload fails the signature.
        let forged = format!("{}.{}.{}", parts[0], b64url().encode(br#"{"exp": 99999999999}"#), parts[2]);
        assert_eq!(verify_hs256(&forged, secret, at(1_000)), Err("the token's signature is not valid"));
        assert!(verify_hs256("garbage", secret, at(1_000)).is_err());
    }

    #[test]
    fn keys_and_tokens_pass_and_anything_else_is_refused() {
        let auth = AuthConfig::new(Some("k"), Some(" alpha, ,beta "));
        assert!(!auth.is_open());
        let now = at(1_000);
        assert!(auth.check(&headers(&[("x-api-key", "beta")]), now).is_ok());
        assert!(auth.check(&headers(&[("x-api-key", "gamma")]), now).is_err());
        assert!(auth.check(&headers(&[("x-api-key", "")]), now).is_err());
        let token = sign_hs256(&json!({"exp": 2_000}), b"k");
        assert!(auth.check(&headers(&[("authorization", &format!("Bearer {token}"))]), now).is_ok());
        assert!(auth.check(&headers(&[("authorization", "Basic abc")]), now).is_err());
        assert!(auth.check(&HeaderMap::new(), now).is_err());
        assert!(AuthConfig::new(None, Some(",")).is_open());
        assert!(AuthConfig::new(None, None).check(&HeaderMap::new(), now).is_ok());
        let keys_only = AuthConfig::new(None, Some("alpha"));
        assert!(keys_only.check(&headers(&[("authorization", &format!("Bearer {token}"))]), now).is_err());
    }
}
