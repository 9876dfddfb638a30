//! Authentication: `Authorization: Bearer <JWT>` (HS256: signature, `exp` within
//! JWT_MAX_LIFETIME, `nbf`, and `aud`/`iss` when configured) when `JWT_SECRET_KEY` is set,
//! and/or `X-API-Key` with one of `API_KEYS`. Neither set: open (with a warning at start; a
//! variable set but empty stops the start, see `config`). Keys are compared in constant time
//! (as SHA-256 digests, so not even their length leaks) and never logged. Failures are 401
//! `unauthorized`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// What a valid token's claims must say, beyond its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRules {
    /// Latest `exp` accepted, counted from now (JWT_MAX_LIFETIME): a token that claims to stay
    /// valid for longer is refused, so a leaked long-lived token is useless.
    pub max_lifetime: Duration,
    /// When set, `aud` (a string, or an array of strings) must name it (JWT_AUDIENCE).
    pub audience: Option<String>,
    /// When set, `iss` must equal it (JWT_ISSUER).
    pub issuer: Option<String>,
}

impl Default for JwtRules {
    fn default() -> Self {
        JwtRules { max_lifetime: Duration::from_secs(24 * 3600), audience: None, issuer: None }
    }
}

/// Who may call the protected endpoints.
#[derive(Clone, Default)]
pub struct AuthConfig {
    jwt_secret: Option<Vec<u8>>,
    jwt_rules: JwtRules,
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
        AuthConfig { jwt_secret, jwt_rules: JwtRules::default(), api_key_digests }
    }

    /// The same, with these rules for the tokens' claims.
    pub fn with_jwt_rules(self, jwt_rules: JwtRules) -> AuthConfig {
        AuthConfig { jwt_rules, ..self }
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
                .and_then(bearer_token)
                .ok_or("expected `Authorization: Bearer <token>`")
                .and_then(|token| verify_hs256(token, secret, &self.jwt_rules, now));
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

/// The token of `Bearer <token>`, the scheme compared case-insensitively (RFC 9110, 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware for the multipart (form) endpoints: with authentication off, a request whose
/// `Origin` is another site is 403 `cross_origin`. A form post is a "simple" request that any
/// page a user opens may send here without a CORS preflight; with credentials configured the
/// page has none to send, so the check is only needed, and only made, when the service is open.
pub async fn refuse_foreign_forms(State(auth): State<Arc<AuthConfig>>, req: Request, next: Next) -> Response {
    if auth.is_open() && super::extract::is_foreign_origin(req.headers(), req.uri()) {
        return ApiError::new(
            ErrorCode::CrossOrigin,
            "a page of another site may not post here while authentication is off (its `Origin` is not this host)",
        )
        .into_response();
    }
    next.run(req).await
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

/// Verifies an HS256 JWT: header `alg` must be HS256 with no `crit` (this service implements
/// no extension), the signature must match; `exp` must be a number, in the future and at most
/// `rules.max_lifetime` ahead; `nbf` (if any) a number in the past; `aud` and `iss` as `rules`
/// says. Times are compared as f64, so no value of `exp` overflows.
pub fn verify_hs256(token: &str, secret: &[u8], rules: &JwtRules, now: SystemTime) -> Result<(), &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("the token is not a JWT");
    };
    let header: serde_json::Value =
        b64url().decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or("the token's header is malformed")?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err("the token must be signed with HS256");
    }
    if header.get("crit").is_some() {
        return Err("the token's header lists `crit` extensions this service does not implement");
    }
    let signature = b64url().decode(s).map_err(|_| "the token's signature is malformed")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "server key unusable")?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&signature).map_err(|_| "the token's signature is not valid")?;
    let claims: serde_json::Value =
        b64url().decode(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or("the token's claims are malformed")?;
    if !claims.is_object() {
        return Err("the token's claims are malformed");
    }
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let leeway = LEEWAY_SECS as f64;
    let exp = match claims.get("exp") {
        None => return Err("the token has no expiry (`exp`)"),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or("the token's `exp` is not a number of seconds")?,
    };
    if exp + leeway < now {
        return Err("the token has expired");
    }
    if exp - now > rules.max_lifetime.as_secs_f64() + leeway {
        return Err("the token's `exp` is further ahead than JWT_MAX_LIFETIME allows");
    }
    if let Some(v) = claims.get("nbf") {
        let nbf = v.as_f64().filter(|x| x.is_finite()).ok_or("the token's `nbf` is not a number of seconds")?;
        if nbf - leeway > now {
            return Err("the token is not valid yet");
        }
    }
    if let Some(want) = &rules.audience {
        let names_it = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == want,
            Some(serde_json::Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(want.as_str())),
            _ => false,
        };
        if !names_it {
            return Err("the token's `aud` does not name this service (JWT_AUDIENCE)");
        }
    }
    if let Some(want) = &rules.issuer
        && claims.get("iss").and_then(serde_json::Value::as_str) != Some(want.as_str())
    {
        return Err("the token's `iss` is not the expected issuer (JWT_ISSUER)");
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

    fn verify(token: &str, secret: &[u8], now: SystemTime) -> Result<(), &'static str> {
        verify_hs256(token, secret, &JwtRules::default(), now)
    }

    /// A token signed with `secret` whose header is `header` (JSON).
    fn sign_with_header(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
        let h = b64url().encode(header.as_bytes());
        let p = b64url().encode(claims.to_string().as_bytes());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("key");
        mac.update(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", b64url().encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn jwt_signature_expiry_and_algorithm_are_checked() {
        let secret = b"s3cret";
        let good = sign_hs256(&json!({"sub": "app", "exp": 2_000}), secret);
        assert_eq!(verify(&good, secret, at(1_000)), Ok(()));
        assert_eq!(verify(&good, secret, at(2_000 + LEEWAY_SECS as u64 + 1)), Err("the token has expired"));
        assert_eq!(verify(&good, b"other", at(1_000)), Err("the token's signature is not valid"));
        let no_exp = sign_hs256(&json!({"sub": "app"}), secret);
        assert_eq!(verify(&no_exp, secret, at(1_000)), Err("the token has no expiry (`exp`)"));
        let early = sign_hs256(&json!({"exp": 5_000, "nbf": 4_000}), secret);
        assert_eq!(verify(&early, secret, at(1_000)), Err("the token is not valid yet"));
        // alg "none" with the signature stripped is refused.
        let parts: Vec<&str> = good.split('.').collect();
        let none = format!("{}.{}.", b64url().encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(verify(&none, secret, at(1_000)), Err("the token must be signed with HS256"));
        // A tampered payload fails the signature.
        let forged = format!("{}.{}.{}", parts[0], b64url().encode(br#"{"exp": 99999999999}"#), parts[2]);
        assert_eq!(verify(&forged, secret, at(1_000)), Err("the token's signature is not valid"));
        assert!(verify("garbage", secret, at(1_000)).is_err());
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

    #[test]
    fn crit_headers_and_non_numeric_times_are_refused() {
        let secret = b"s3cret";
        let crit = sign_with_header(r#"{"alg":"HS256","crit":["exp"]}"#, &json!({"exp": 2_000}), secret);
        assert_eq!(verify(&crit, secret, at(1_000)), Err("the token's header lists `crit` extensions this service does not implement"));
        let empty_crit = sign_with_header(r#"{"alg":"HS256","crit":[]}"#, &json!({"exp": 2_000}), secret);
        assert!(verify(&empty_crit, secret, at(1_000)).is_err());
        let string_exp = sign_hs256(&json!({"exp": "2000"}), secret);
        assert_eq!(verify(&string_exp, secret, at(1_000)), Err("the token's `exp` is not a number of seconds"));
        let null_exp = sign_hs256(&json!({"exp": null}), secret);
        assert_eq!(verify(&null_exp, secret, at(1_000)), Err("the token's `exp` is not a number of seconds"));
        let string_nbf = sign_hs256(&json!({"exp": 2_000, "nbf": "later"}), secret);
        assert_eq!(verify(&string_nbf, secret, at(1_000)), Err("the token's `nbf` is not a number of seconds"));
        let past_nbf = sign_hs256(&json!({"exp": 2_000, "nbf": 500.5}), secret);
        assert_eq!(verify(&past_nbf, secret, at(1_000)), Ok(()));
        let array = sign_hs256(&json!([1, 2]), secret);
        assert_eq!(verify(&array, secret, at(1_000)), Err("the token's claims are malformed"));
    }

    #[test]
    fn exp_is_bounded_by_the_maximum_lifetime_without_overflow() {
        let secret = b"s3cret";
        let now = 1_700_000_000u64;
        let day = 24 * 3600;
        let within = sign_hs256(&json!({"exp": now + day}), secret);
        assert_eq!(verify(&within, secret, at(now)), Ok(()));
        let year_3000 = sign_hs256(&json!({"exp": 32_503_680_000u64}), secret);
        assert_eq!(verify(&year_3000, secret, at(now)), Err("the token's `exp` is further ahead than JWT_MAX_LIFETIME allows"));
        for huge in [json!(9_223_372_036_854_775_807i64), json!(18_446_744_073_709_551_615u64), json!(1e300), json!(9.3e18)] {
            let token = sign_hs256(&json!({"exp": huge}), secret);
            assert_eq!(verify(&token, secret, at(now)), Err("the token's `exp` is further ahead than JWT_MAX_LIFETIME allows"), "{huge}");
        }
        let huge_negative = sign_hs256(&json!({"exp": -9.3e18}), secret);
        assert_eq!(verify(&huge_negative, secret, at(now)), Err("the token has expired"));
        let huge_nbf = sign_hs256(&json!({"exp": now + 60, "nbf": 1e300}), secret);
        assert_eq!(verify(&huge_nbf, secret, at(now)), Err("the token is not valid yet"));
        // A shorter maximum.
        let hour = JwtRules { max_lifetime: Duration::from_secs(3600), ..JwtRules::default() };
        assert_eq!(verify_hs256(&within, secret, &hour, at(now)), Err("the token's `exp` is further ahead than JWT_MAX_LIFETIME allows"));
        let soon = sign_hs256(&json!({"exp": now + 3000}), secret);
        assert_eq!(verify_hs256(&soon, secret, &hour, at(now)), Ok(()));
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let secret = b"s3cret";
        let rules = JwtRules { audience: Some("facerec".into()), issuer: Some("https://id.example".into()), ..JwtRules::default() };
        let check = |claims: serde_json::Value| verify_hs256(&sign_hs256(&claims, secret), secret, &rules, at(1_000));
        assert_eq!(check(json!({"exp": 2_000, "aud": "facerec", "iss": "https://id.example"})), Ok(()));
        assert_eq!(check(json!({"exp": 2_000, "aud": ["other", "facerec"], "iss": "https://id.example"})), Ok(()));
        let wrong_aud = Err("the token's `aud` does not name this service (JWT_AUDIENCE)");
        assert_eq!(check(json!({"exp": 2_000, "aud": "other", "iss": "https://id.example"})), wrong_aud);
        assert_eq!(check(json!({"exp": 2_000, "iss": "https://id.example"})), wrong_aud);
        assert_eq!(check(json!({"exp": 2_000, "aud": 7, "iss": "https://id.example"})), wrong_aud);
        let wrong_iss = Err("the token's `iss` is not the expected issuer (JWT_ISSUER)");
        assert_eq!(check(json!({"exp": 2_000, "aud": "facerec", "iss": "https://evil.example"})), wrong_iss);
        assert_eq!(check(json!({"exp": 2_000, "aud": "facerec"})), wrong_iss);
        // Not configured: not required.
        assert_eq!(verify(&sign_hs256(&json!({"exp": 2_000, "aud": "anything"}), secret), secret, at(1_000)), Ok(()));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let auth = AuthConfig::new(Some("k"), None);
        let token = sign_hs256(&json!({"exp": 2_000}), b"k");
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} {token}");
            assert!(auth.check(&headers(&[("authorization", &value)]), at(1_000)).is_ok(), "{scheme}");
        }
        assert!(auth.check(&headers(&[("authorization", &format!("Bearer   {token}  "))]), at(1_000)).is_ok());
        for bad in ["Bearer".to_string(), "Bearer ".to_string(), format!("Bearerx {token}"), format!("Basic {token}"), token.clone()] {
            assert_eq!(
                auth.check(&headers(&[("authorization", &bad)]), at(1_000)),
                Err("expected `Authorization: Bearer <token>`"),
                "{bad}"
            );
        }
    }
}
