//! A project's customer-hosted archive bucket (Segment's "Local Data Storage").

use serde::{Deserialize, Serialize};

/// The STS ExternalId Meridian presents when it assumes a customer's role for `project_id`.
///
/// It is chosen by Meridian, never by the customer, and differs for every project: a role's trust
/// policy that requires it lets Meridian act for that project only, so knowing another customer's
/// role ARN is not enough to make Meridian write into their bucket (the confused deputy problem;
/// Segment uses the workspace id the same way). Not a secret: it is shown by the admin API.
pub fn external_id_for(project_id: &str) -> String {
    format!("meridian-{project_id}")
}

/// Where a project's archive goes instead of the regional bucket: the customer's bucket, reached
/// by assuming the customer's IAM role with the project's external id ([`external_id_for`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerStorage {
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub role_arn: String,
    /// Always [`external_id_for`] the project (stored settings of earlier versions may hold a
    /// customer-chosen value: it is never used).
    pub external_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Why a customer storage setting is refused (each names the field).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageSettingError {
    #[error(
        "`bucket` is not a valid S3 bucket name (3 to 63 lowercase letters, digits, hyphens and dots)"
    )]
    Bucket,
    #[error(
        "`prefix` must be at most {MAX_PREFIX_CHARS} characters of path segments without `.` or `..`, backslashes or control characters"
    )]
    Prefix,
    #[error("`role_arn` is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")]
    RoleArn,
    #[error(
        "`kms_key_arn` is not a KMS key ARN (arn:aws:kms:<region>:<12-digit account>:key/<id> or alias/<name>)"
    )]
    KmsKeyArn,
    #[error("`label` must be at most {MAX_LABEL_CHARS} characters without control characters")]
    Label,
}

/// Longest prefix accepted (S3 keys are at most 1,024 bytes; the archive's own path follows).
pub const MAX_PREFIX_CHARS: usize = 512;
/// Longest label accepted.
pub const MAX_LABEL_CHARS: usize = 200;

impl CustomerStorage {
    /// A customer storage setting from what an admin sent, every string bounded and checked: the
    /// bucket name by S3's rules, the prefix normalized (no leading or trailing `/`, no empty,
    /// `.` or `..` segment, no control characters), the ARNs parsed, the label bounded. The
    /// external id is always [`external_id_for`] the project.
    pub fn validated(
        project_id: &str,
        bucket: String,
        prefix: Option<String>,
        role_arn: String,
        kms_key_arn: Option<String>,
        label: Option<String>,
    ) -> Result<CustomerStorage, StorageSettingError> {
        if !is_bucket_name(&bucket) {
            return Err(StorageSettingError::Bucket);
        }
        let prefix = match prefix {
            Some(prefix) => normalized_prefix(&prefix)?,
            None => None,
        };
        if !is_iam_role_arn(&role_arn) {
            return Err(StorageSettingError::RoleArn);
        }
        if kms_key_arn
            .as_deref()
            .is_some_and(|arn| !is_kms_key_arn(arn))
        {
            return Err(StorageSettingError::KmsKeyArn);
        }
        let label = label.map(|label| label.trim().to_string());
        if label.as_deref().is_some_and(|label| {
            label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control)
        }) {
            return Err(StorageSettingError::Label);
        }
        Ok(CustomerStorage {
            bucket,
            prefix,
            role_arn,
            external_id: external_id_for(project_id),
            kms_key_arn,
            label: label.filter(|label| !label.is_empty()),
        })
    }
}

fn is_bucket_name(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && bucket
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && !bucket.contains("..")
}

/// The prefix with its outer slashes removed; `None` when nothing is left.
fn normalized_prefix(prefix: &str) -> Result<Option<String>, StorageSettingError> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    let acceptable = trimmed.chars().count() <= MAX_PREFIX_CHARS
        && !trimmed.chars().any(|c| c.is_control() || c == '\\')
        && trimmed
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if !acceptable {
        return Err(StorageSettingError::Prefix);
    }
    Ok(Some(trimmed.to_string()))
}

/// `arn:<partition>:<service>:<region>:<12-digit account>:<resource>`, split.
fn arn_parts(arn: &str) -> Option<(&str, &str, &str, &str, &str)> {
    if arn.len() > 2048 || arn.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let known_partition = matches!(
        partition,
        "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b"
    );
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    (known_partition && account_ok).then_some((partition, service, region, account, resource))
}

/// IAM role names and paths: letters, digits and `+=,.@_-`, with `/` between path segments.
fn is_iam_role_arn(arn: &str) -> bool {
    let Some((_, "iam", "", _, resource)) = arn_parts(arn) else {
        return false;
    };
    let Some(path_and_name) = resource.strip_prefix("role/") else {
        return false;
    };
    let name = path_and_name.rsplit('/').next().unwrap_or("");
    (1..=64).contains(&name.len())
        && path_and_name.len() <= 512
        && path_and_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
}

fn is_kms_key_arn(arn: &str) -> bool {
    let Some((_, "kms", region, _, resource)) = arn_parts(arn) else {
        return false;
    };
    let region_ok = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let resource_ok = match resource.split_once('/') {
        Some(("key", id)) => {
            (1..=128).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }
        Some(("alias", name)) => {
            (1..=256).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
        }
        _ => false,
    };
    region_ok && resource_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/meridian-archive";

    fn validate(prefix: Option<&str>, role: &str) -> Result<CustomerStorage, StorageSettingError> {
        CustomerStorage::validated(
            "prj_1",
            "cust-bucket".into(),
            prefix.map(str::to_string),
            role.into(),
            None,
            None,
        )
    }

    #[test]
    fn prefixes_are_normalized_and_paths_out_of_the_bucket_refused() {
        let storage = validate(Some("/exports/segment/"), ROLE).unwrap();
        assert_eq!(storage.prefix.as_deref(), Some("exports/segment"));
        assert_eq!(storage.external_id, "meridian-prj_1");
        assert_eq!(validate(Some("//"), ROLE).unwrap().prefix, None);
        for bad in [
            "../../other-bucket/x",
            "a/../b",
            "a/./b",
            "a//b",
            "a\\b",
            "a\nb",
            "a\u{7f}b",
        ] {
            assert_eq!(
                validate(Some(bad), ROLE),
                Err(StorageSettingError::Prefix),
                "{bad:?}"
            );
        }
        assert_eq!(
            validate(Some(&"p".repeat(MAX_PREFIX_CHARS + 1)), ROLE),
            Err(StorageSettingError::Prefix)
        );
    }

    #[test]
    fn arns_are_parsed() {
        assert!(validate(None, "arn:aws:iam::123456789012:role/path/to/Name+=,.@_-").is_ok());
        assert!(validate(None, "arn:aws-cn:iam::123456789012:role/x").is_ok());
        for bad in [
            "arn:",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::12345:role/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam:us-east-1:123456789012:role/x",
            "arn:aws:iam::123456789012:role/x\nERROR forged",
            "arn:aws:iam::123456789012:role/",
            "arn:evil:iam::123456789012:role/x",
        ] {
            assert_eq!(
                validate(None, bad),
                Err(StorageSettingError::RoleArn),
                "{bad:?}"
            );
        }
        let with_kms = |kms: &str| {
            CustomerStorage::validated(
                "prj_1",
                "cust-bucket".into(),
                None,
                ROLE.into(),
                Some(kms.into()),
                None,
            )
        };
        assert!(
            with_kms("arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab")
                .is_ok()
        );
        assert!(with_kms("arn:aws:kms:eu-west-1:123456789012:alias/archive").is_ok());
        assert_eq!(
            with_kms("arn:aws:kms:eu-west-1:123456789012:key/a b"),
            Err(StorageSettingError::KmsKeyArn)
        );
        assert_eq!(
            with_kms("alias/archive"),
            Err(StorageSettingError::KmsKeyArn)
        );
    }

    #[test]
    fn buckets_and_labels_are_bounded() {
        let with = |bucket: &str, label: Option<String>| {
            CustomerStorage::validated("prj_1", bucket.into(), None, ROLE.into(), None, label)
        };
        assert_eq!(with("-bucket", None), Err(StorageSettingError::Bucket));
        assert_eq!(with("a..b", None), Err(StorageSettingError::Bucket));
        assert_eq!(with("UPPER", None), Err(StorageSettingError::Bucket));
        assert_eq!(
            with("cust-bucket", Some("x".repeat(1_500_000))),
            Err(StorageSettingError::Label)
        );
        assert_eq!(
            with("cust-bucket", Some("a\u{1b}[31mred".into())),
            Err(StorageSettingError::Label)
        );
        assert_eq!(
            with("cust-bucket", Some("  Production archive ".into()))
                .unwrap()
                .label
                .as_deref(),
            Some("Production archive")
        );
    }
}
