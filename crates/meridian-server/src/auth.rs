//! Admin authentication: HS256 JWTs signed with the configured secret, `alg` pinned, `exp`
//! required, a small configurable leeway.

use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meridian_core::timestamp::now_unix_ms;
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

pub struct JwtAuthority {
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    validation: Validation,
}

impl JwtAuthority {
    pub fn new(secret: &[u8], leeway_secs: u64) -> JwtAuthority {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        JwtAuthority {
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn issue(
        &self,
        subject: &str,
        org_id: Option<&str>,
        role: Role,
        ttl_secs: u64,
    ) -> Result<String, ApiError> {
        let now_secs = (now_unix_ms() / 1000) as u64;
        let claims = Claims {
            sub: subject.to_string(),
            org_id: org_id.map(str::to_string),
            role,
            exp: now_secs + ttl_secs,
            iat: Some(now_secs),
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
                    ErrorKind::InvalidAlgorithm => "the token is not signed with HS256",
                    ErrorKind::InvalidSignature => "the token's signature is invalid",
                    ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim (exp)",
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
    let (secret, _) = crate::secret_file::read_or_create(data_dir, "jwt_secret")?;
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
        state.jwt.verify(token.trim()).map(AdminAuth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const SECRET: &[u8] = b"a-test-secret-that-is-long-enough-for-hs256";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn accepts_its_own_tokens_and_refuses_forged_expired_and_unsigned_ones() {
        let authority = JwtAuthority::new(SECRET, 0);
        let token = authority
            .issue("alice", Some("acme"), Role::Owner, 60)
            .unwrap();
        let claims = authority.verify(&token).unwrap();
        assert_eq!(claims.org_id.as_deref(), Some("acme"));
        assert_eq!(claims.role, Role::Owner);

        let other = JwtAuthority::new(b"another-secret-that-is-long-enough-for-hs256", 0);
        assert!(other.verify(&token).is_err(), "signed with another secret");

        let expired = Claims {
            sub: "a".into(),
            org_id: Some("acme".into()),
            role: Role::Owner,
            exp: 1_000,
            iat: None,
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
            org_id: Some("acme".into()),
            role: Role::Member,
            exp: 0,
            iat: None,
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
