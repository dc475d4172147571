//! Revoked admin tokens: one token (its `jti`), or every token issued before a time — to one user
//! of an org, to a whole org, or (platform) to everyone. Kept in the global catalog (they name
//! admin users, never end users); every node's key cache holds them all and checks each admin
//! request against them, so a revocation takes effect on every node within the refresh interval.

use std::collections::HashMap;

use meridian_core::timestamp::now_unix_ms;
use serde_json::json;
use sqlx::Row;

use crate::audit::Actor;
use crate::catalog::Catalog;
use crate::error::CatalogError;

/// One revocation as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRevocation {
    pub revocation_id: String,
    /// The org whose tokens it revokes; `None`: every org's and the platform's (platform only).
    pub org_id: Option<String>,
    /// The user (`sub`) whose tokens it revokes; `None`: every user's.
    pub subject: Option<String>,
    /// The one token (`jti`) it revokes.
    pub jti: Option<String>,
    /// Tokens issued (`iat`) before this are revoked; a token without `iat` counts as issued at 0.
    pub issued_before_ms: Option<i64>,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// What to revoke: a `jti`, or the tokens issued before a time, of a subject and/or an org.
#[derive(Clone, Debug, Default)]
pub struct NewTokenRevocation {
    pub org_id: Option<String>,
    pub subject: Option<String>,
    pub jti: Option<String>,
    pub issued_before_ms: Option<i64>,
}

/// The claims of a token that revocations are matched against.
#[derive(Clone, Copy, Debug)]
pub struct TokenIdentity<'a> {
    pub org_id: Option<&'a str>,
    pub subject: &'a str,
    pub jti: Option<&'a str>,
    /// `iat`, in seconds.
    pub issued_at_secs: Option<u64>,
}

/// Every revocation, indexed for the per-request check.
#[derive(Clone, Debug, Default)]
pub struct TokenRevocations {
    jtis: std::collections::HashSet<String>,
    /// `(org or none, subject or none)` -> the latest `issued_before_ms`.
    cutoffs: HashMap<(Option<String>, Option<String>), i64>,
}

impl TokenRevocations {
    pub fn from_rows(rows: &[TokenRevocation]) -> TokenRevocations {
        let mut revocations = TokenRevocations::default();
        for row in rows {
            if let Some(jti) = &row.jti {
                revocations.jtis.insert(jti.clone());
            }
            if let Some(before) = row.issued_before_ms {
                let cutoff = revocations
                    .cutoffs
                    .entry((row.org_id.clone(), row.subject.clone()))
                    .or_insert(before);
                *cutoff = (*cutoff).max(before);
            }
        }
        revocations
    }

    pub fn is_empty(&self) -> bool {
        self.jtis.is_empty() && self.cutoffs.is_empty()
    }

    /// Whether a token with these claims is revoked.
    pub fn revokes(&self, token: TokenIdentity<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        if token.jti.is_some_and(|jti| self.jtis.contains(jti)) {
            return true;
        }
        let issued_at_ms = token
            .issued_at_secs
            .map_or(0, |secs| (secs as i64).saturating_mul(1000));
        let org = token.org_id.map(str::to_string);
        let subject = Some(token.subject.to_string());
        [
            (None, None),
            (None, subject.clone()),
            (org.clone(), None),
            (org, subject),
        ]
        .iter()
        .filter_map(|scope| self.cutoffs.get(scope))
        .any(|cutoff| issued_at_ms < *cutoff)
    }
}

const REVOCATION_COLUMNS: &str =
    "revocation_id, org_id, subject, jti, issued_before_ms, created_at_ms, created_by";

fn revocation_from_row(row: &sqlx::any::AnyRow) -> Result<TokenRevocation, CatalogError> {
    Ok(TokenRevocation {
        revocation_id: row.try_get("revocation_id")?,
        org_id: row.try_get("org_id")?,
        subject: row.try_get("subject")?,
        jti: row.try_get("jti")?,
        issued_before_ms: row.try_get("issued_before_ms")?,
        created_at_ms: row.try_get("created_at_ms")?,
        created_by: row.try_get("created_by")?,
    })
}

/// The audit log's org of a platform-wide revocation.
const PLATFORM_AUDIT_ORG: &str = "platform";

impl Catalog {
    /// Records a revocation and its audit entry; every node's key cache picks it up at its next
    /// refresh.
    pub async fn revoke_tokens(
        &self,
        revocation: NewTokenRevocation,
        actor: &Actor,
    ) -> Result<TokenRevocation, CatalogError> {
        if revocation.jti.is_none() && revocation.issued_before_ms.is_none() {
            return Err(CatalogError::Invalid(
                "a revocation names a token (`jti`) or a time (`issued_before`)".into(),
            ));
        }
        let (mut transaction, change) = self.begin_change().await?;
        let stored = TokenRevocation {
            revocation_id: format!("rev_{}", uuid::Uuid::new_v4().simple()),
            org_id: revocation.org_id,
            subject: revocation.subject,
            jti: revocation.jti,
            issued_before_ms: revocation.issued_before_ms,
            created_at_ms: now_unix_ms(),
            created_by: actor.subject.clone(),
        };
        sqlx::query(&format!(
            "INSERT INTO token_revocations ({REVOCATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&stored.revocation_id)
        .bind(stored.org_id.as_deref())
        .bind(stored.subject.as_deref())
        .bind(stored.jti.as_deref())
        .bind(stored.issued_before_ms)
        .bind(stored.created_at_ms)
        .bind(&stored.created_by)
        .execute(&mut *transaction)
        .await?;
        let audit_org = stored.org_id.as_deref().unwrap_or(PLATFORM_AUDIT_ORG);
        self.commit_audited(
            transaction,
            change,
            audit_org,
            actor,
            "tokens.revoke",
            &stored.revocation_id,
            None,
            Some(json!({
                "org_id": stored.org_id, "sub": stored.subject, "jti": stored.jti,
                "issued_before_ms": stored.issued_before_ms,
            })),
        )
        .await?;
        Ok(stored)
    }

    /// The revocations of an org (and the platform-wide ones), or every one (`None`), oldest
    /// first.
    pub async fn token_revocations(
        &self,
        org_id: Option<&str>,
    ) -> Result<Vec<TokenRevocation>, CatalogError> {
        let rows = match org_id {
            Some(org_id) => {
                sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM token_revocations
                     WHERE org_id = $1 OR org_id IS NULL ORDER BY created_at_ms, revocation_id"
                ))
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM token_revocations ORDER BY created_at_ms, revocation_id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(revocation_from_row).collect()
    }
}

/// Every revocation, read in a key cache load's transaction.
pub(crate) async fn load_revocations(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
) -> Result<Vec<TokenRevocation>, CatalogError> {
    let rows = sqlx::query(&format!(
        "SELECT {REVOCATION_COLUMNS} FROM token_revocations"
    ))
    .fetch_all(&mut **transaction)
    .await?;
    rows.iter().map(revocation_from_row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token<'a>(org: &'a str, subject: &'a str, jti: &'a str, iat: u64) -> TokenIdentity<'a> {
        TokenIdentity {
            org_id: Some(org),
            subject,
            jti: Some(jti),
            issued_at_secs: Some(iat),
        }
    }

    fn revocation(
        org: Option<&str>,
        subject: Option<&str>,
        jti: Option<&str>,
        before_ms: Option<i64>,
    ) -> TokenRevocation {
        TokenRevocation {
            revocation_id: "r".into(),
            org_id: org.map(str::to_string),
            subject: subject.map(str::to_string),
            jti: jti.map(str::to_string),
            issued_before_ms: before_ms,
            created_at_ms: 0,
            created_by: "test".into(),
        }
    }

    #[test]
    fn revocations_match_a_token_a_user_an_org_or_everyone_before_a_time() {
        let none = TokenRevocations::from_rows(&[]);
        assert!(!none.revokes(token("acme", "alice", "j1", 100)));

        let one_token = TokenRevocations::from_rows(&[revocation(None, None, Some("j1"), None)]);
        assert!(one_token.revokes(token("acme", "alice", "j1", 100)));
        assert!(!one_token.revokes(token("acme", "alice", "j2", 100)));

        let alice_before = TokenRevocations::from_rows(&[revocation(
            Some("acme"),
            Some("alice"),
            None,
            Some(200_000),
        )]);
        assert!(alice_before.revokes(token("acme", "alice", "j", 199)));
        assert!(
            !alice_before.revokes(token("acme", "alice", "j", 200)),
            "issued after"
        );
        assert!(
            !alice_before.revokes(token("acme", "bob", "j", 1)),
            "another user"
        );
        assert!(
            !alice_before.revokes(token("other", "alice", "j", 1)),
            "another org"
        );
        let no_iat = TokenIdentity {
            issued_at_secs: None,
            ..token("acme", "alice", "j", 0)
        };
        assert!(
            alice_before.revokes(no_iat),
            "a token without iat counts as old"
        );

        let org_before =
            TokenRevocations::from_rows(&[revocation(Some("acme"), None, None, Some(200_000))]);
        assert!(org_before.revokes(token("acme", "bob", "j", 1)));
        assert!(!org_before.revokes(token("other", "bob", "j", 1)));

        let everyone = TokenRevocations::from_rows(&[revocation(None, None, None, Some(200_000))]);
        assert!(everyone.revokes(TokenIdentity {
            org_id: None,
            ..token("", "platform-operator", "j", 1)
        }));
    }
}
