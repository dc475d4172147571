//! Secrets in configuration (passwords, keys, URLs that carry a password): they are held as
//! [`Secret`], which never prints its value — not in `Debug`, logs, errors or `--check-config`.

use serde::Deserialize;

/// A configured secret. `Debug` and `Display` show `[redacted]`; [`Secret::expose`] is the one way
/// to the value, for the client that needs it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("[redacted]")
    }
}

/// `url` with the password of its user info replaced by `***` (`postgres://u:***@host/db`), for
/// printing. A URL without a password is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert_eq!(secret.expose(), "hunter2");
        let parsed: Option<Secret> = serde_json::from_str(r#""s3cr3t""#).unwrap();
        assert!(!format!("{parsed:?}").contains("s3cr3t"));
    }

    #[test]
    fn urls_lose_their_password_only() {
        assert_eq!(
            redact_url("postgres://meridian:p%40ss:w@db.internal:5432/meridian?sslmode=require"),
            "postgres://meridian:***@db.internal:5432/meridian?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://meridian@db/meridian"),
            "postgres://meridian@db/meridian"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/meridian/catalog.db?mode=rwc"),
            "sqlite:///var/lib/meridian/catalog.db?mode=rwc"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
