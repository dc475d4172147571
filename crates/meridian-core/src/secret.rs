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

/// `text` with the password of every URL in it replaced by `***` (`postgres://u:***@host/db`):
/// the one redaction of configured URLs for printing, whether `text` is a URL or an error message
/// that quotes some. Text without a URL password is returned as it is.
pub fn redact_url(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        redacted.push_str(&rest[..authority_start]);
        let after_scheme = &rest[authority_start..];
        let authority_end = after_scheme
            .find(|c: char| {
                matches!(
                    c,
                    '/' | '?' | '#' | '"' | '\'' | '`' | ',' | ')' | '>' | ']'
                ) || c.is_whitespace()
            })
            .unwrap_or(after_scheme.len());
        let authority = &after_scheme[..authority_end];
        match authority.rsplit_once('@') {
            Some((user_info, host)) if user_info.contains(':') => {
                let user = user_info
                    .split_once(':')
                    .map_or(user_info, |(user, _)| user);
                redacted.push_str(user);
                redacted.push_str(":***@");
                redacted.push_str(host);
            }
            _ => redacted.push_str(authority),
        }
        rest = &after_scheme[authority_end..];
    }
    redacted.push_str(rest);
    redacted
}

/// A URL's user and password, and the URL without them (`http://u:p@host/` → `(Some(u), Some(p),
/// http://host/)`). Clients are given the credentials apart, so that the URL they print in errors
/// and logs holds none.
pub fn split_url_credentials(url: &str) -> (Option<String>, Option<String>, String) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (None, None, url.to_string());
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return (None, None, url.to_string());
    };
    let (user, password) = match user_info.split_once(':') {
        Some((user, password)) => (user, Some(password.to_string())),
        None => (user_info, None),
    };
    let user = (!user.is_empty()).then(|| user.to_string());
    (user, password, format!("{scheme}://{host}{path}"))
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

    #[test]
    fn urls_inside_messages_lose_their_passwords() {
        assert_eq!(
            redact_url(
                "http://meridian:PASS@ch-1:8123: connection refused; tried `http://a:b@ch-2:8123/?x=1`"
            ),
            "http://meridian:***@ch-1:8123: connection refused; tried `http://a:***@ch-2:8123/?x=1`"
        );
        assert_eq!(
            redact_url("error sending request for url (http://u:p@h/)"),
            "error sending request for url (http://u:***@h/)"
        );
    }

    #[test]
    fn credentials_come_apart_from_the_url() {
        assert_eq!(
            split_url_credentials("http://meridian:s3cr3t@ch:8123/"),
            (
                Some("meridian".into()),
                Some("s3cr3t".into()),
                "http://ch:8123/".into()
            )
        );
        assert_eq!(
            split_url_credentials("http://ch:8123"),
            (None, None, "http://ch:8123".into())
        );
        assert_eq!(
            split_url_credentials("https://reader@ch:8443"),
            (Some("reader".into()), None, "https://ch:8443".into())
        );
    }
}
