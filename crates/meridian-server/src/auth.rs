//! Admin authentication: HS256 JWTs signed with the configured secret, `alg` pinned, `exp`
//! required, `nbf` honoured, `iss` and `aud` required when configured, a small configurable
//! leeway; and revocation — of one token (`jti`) or of every token issued before a time, to a
//! user, an org or everyone — checked on every request against the key cache's snapshot.

use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
    Owner,
    /// Operators of the service: may create orgs and act on every org.
    Platform,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            "platform" => Some(Role::Platform),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    pub role: Role,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The token's id, for revoking it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or a list of strings (RFC 7519); checked by the validation, kept as it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

impl Claims {
    /// What revocations are matched against.
    pub fn identity(&self) -> meridian_catalog::TokenIdentity<'_> {
        meridian_catalog::TokenIdentity {
            org_id: self.org_id.as_deref(),
            subject: &self.sub,
            jti: self.jti.as_deref(),
            issued_at_secs: self.iat,
        }
    }
}

impl Claims {
    /// Whether these claims may act on `org_id` at `minimum` role. Tokens of another org are
    /// told "not found", so that ids of other orgs do not leak.
    pub fn require(&self, org_id: &str, minimum: Role, what: &str) -> Result<(), ApiError> {
        if self.role == Role::Platform {
            return Ok(());
        }
        if self.org_id.as_deref() != Some(org_id) {
            return Err(ApiError::not_found(format!("{what} does not exist")));
        }
        if self.role < minimum {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role or higher; the token has {}",
                role_name(minimum),
                role_name(self.role)
            )));
        }
        Ok(())
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Member => "member",
        Role::Admin => "admin",
        Role::Owner => "owner",
        Role::Platform => "platform",
    }
}

pub use meridian_node::config::TokenRules;

pub struct JwtAuthority {
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    validation: Validation,
    rules: TokenRules,
}

impl JwtAuthority {
    pub fn new(secret: &[u8], rules: TokenRules) -> JwtAuthority {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = rules.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &rules.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &rules.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        JwtAuthority {
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            validation,
            rules,
        }
    }

    /// Whether the token is revoked (by its `jti`, or as issued before a revocation's time).
    pub fn is_revoked(&self, claims: &Claims, keys: &meridian_catalog::KeyCache) -> bool {
        keys.is_token_revoked(claims.identity())
    }

    pub fn issue(
        &self,
        subject: &str,
        org_id: Option<&str>,
        role: Role,
        ttl_secs: u64,
    ) -> Result<String, ApiError> {
        let now_secs = (meridian_core::timestamp::system_now_unix_ms() / 1000) as u64;
        let claims = Claims {
            sub: subject.to_string(),
            org_id: org_id.map(str::to_string),
            role,
            exp: now_secs + ttl_secs,
            iat: Some(now_secs),
            nbf: Some(now_secs),
            jti: Some(uuid::Uuid::new_v4().simple().to_string()),
            iss: self.rules.issuer.clone(),
            aud: self.rules.audience.clone().map(serde_json::Value::String),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding_key)
            .map_err(|error| ApiError::internal(format!("cannot sign a token: {error}")))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding_key, &self.validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                let reason = match error.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                    ErrorKind::InvalidAlgorithm => "the token is not signed with HS256",
                    ErrorKind::InvalidSignature => "the token's signature is invalid",
                    ErrorKind::InvalidIssuer => "the token's issuer (iss) is not this service's",
                    ErrorKind::InvalidAudience => "the token's audience (aud) is not this service",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "the token lacks a required claim (exp, and iss or aud where configured)"
                    }
                    _ => "the token is malformed or invalid",
                };
                ApiError::unauthorized(reason)
            })?;
        let claims = data.claims;
        if claims.role != Role::Platform && claims.org_id.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::unauthorized("the token has no org_id claim"));
        }
        Ok(claims)
    }
}

/// The configured secret, or the one generated once in `<data_dir>/jwt_secret`.
pub fn load_or_create_secret(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<(Vec<u8>, bool)> {
    if let Some(secret) = configured {
        return Ok((secret.as_bytes().to_vec(), false));
    }
    let (secret, _) = meridian_node::secret_file::read_or_create(data_dir, "jwt_secret")?;
    if secret.len() < 32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds fewer than 32 bytes: remove it to have a new secret made, or set auth.jwt_secret",
                data_dir.join("jwt_secret").display()
            ),
        ));
    }
    Ok((secret.into_bytes(), true))
}

/// Extractor for admin routes: a verified token or 401.
pub struct AdminAuth(pub Claims);

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("send the admin token as Authorization: Bearer <JWT>")
        })?;
        let text = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is malformed"))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("send the admin token as Authorization: Bearer <JWT>")
            })?;
        let claims = state.http.jwt.verify(token.trim())?;
        if state.http.jwt.is_revoked(&claims, &state.node.keys) {
            return Err(ApiError::unauthorized("the token has been revoked"));
        }
        Ok(AdminAuth(claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const SECRET: &[u8] = b"a-test-secret-that-is-long-enough-for-hs256";

    fn claims_of(org: &str, role: Role) -> Claims {
        Claims {
            sub: "a".into(),
            org_id: Some(org.into()),
            role,
            exp: 99_999_999_999,
            iat: None,
            nbf: None,
            jti: None,
            iss: None,
            aud: None,
        }
    }

    fn sign(claims: &Claims) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn nbf_is_checked_and_issuer_and_audience_are_required_when_configured() {
        let authority = JwtAuthority::new(SECRET, TokenRules::default());
        let now_secs = (meridian_core::timestamp::system_now_unix_ms() / 1000) as u64;
        let future = Claims {
            nbf: Some(now_secs + 3600),
            ..claims_of("acme", Role::Owner)
        };
        assert!(authority.verify(&sign(&future)).is_err(), "not valid yet");
        let started = Claims {
            nbf: Some(now_secs - 10),
            ..claims_of("acme", Role::Owner)
        };
        assert!(authority.verify(&sign(&started)).is_ok());

        let strict = JwtAuthority::new(
            SECRET,
            TokenRules {
                leeway_secs: 0,
                issuer: Some("https://auth.example.com".into()),
                audience: Some("meridian".into()),
            },
        );
        assert!(strict.verify(&sign(&started)).is_err(), "no iss or aud");
        let wrong_audience = Claims {
            iss: Some("https://auth.example.com".into()),
            aud: Some(serde_json::json!("another-service")),
            ..started.clone()
        };
        assert!(strict.verify(&sign(&wrong_audience)).is_err());
        let right = Claims {
            aud: Some(serde_json::json!(["meridian", "x"])),
            ..wrong_audience
        };
        assert!(strict.verify(&sign(&right)).is_ok());
        let issued = strict
            .issue("alice", Some("acme"), Role::Owner, 60)
            .unwrap();
        let issued_claims = strict
            .verify(&issued)
            .expect("its own tokens carry iss and aud");
        assert!(
            issued_claims.jti.is_some(),
            "issued tokens have an id to revoke"
        );
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn accepts_its_own_tokens_and_refuses_forged_expired_and_unsigned_ones() {
        let authority = JwtAuthority::new(SECRET, TokenRules::default());
        let token = authority
            .issue("alice", Some("acme"), Role::Owner, 60)
            .unwrap();
        let claims = authority.verify(&token).unwrap();
        assert_eq!(claims.org_id.as_deref(), Some("acme"));
        assert_eq!(claims.role, Role::Owner);

        let other = JwtAuthority::new(
            b"another-secret-that-is-long-enough-for-hs256",
            TokenRules::default(),
        );
        assert!(other.verify(&token).is_err(), "signed with another secret");

        let expired = Claims {
            exp: 1_000,
            ..claims_of("acme", Role::Owner)
        };
        let expired_token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(authority.verify(&expired_token).is_err());

        let payload = b64(br#"{"sub":"a","org_id":"acme","role":"owner","exp":99999999999}"#);
        let unsigned = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert!(authority.verify(&unsigned).is_err(), "alg none");

        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(authority.verify(&hs512).is_err(), "alg pinned to HS256");

        let no_exp = format!(
            "{}.{}.",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(br#"{"sub":"a","org_id":"acme","role":"owner"}"#)
        );
        assert!(authority.verify(&no_exp).is_err());
    }

    #[test]
    fn roles_are_ordered_and_other_orgs_see_not_found() {
        let claims = Claims {
            sub: "m".into(),
            exp: 0,
            ..claims_of("acme", Role::Member)
        };
        assert!(claims.require("acme", Role::Member, "project").is_ok());
        assert_eq!(
            claims
                .require("acme", Role::Admin, "project")
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            claims
                .require("other", Role::Member, "project")
                .unwrap_err()
                .status,
            404
        );
        let platform = Claims {
            role: Role::Platform,
            org_id: None,
            ..claims
        };
        assert!(platform.require("other", Role::Owner, "org").is_ok());
    }
}
