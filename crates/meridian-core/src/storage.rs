//! A project's customer-hosted archive bucket (Segment's "Local Data Storage").

use serde::{Deserialize, Serialize};

/// Where a project's archive goes instead of the regional bucket: the customer's bucket, reached
/// by assuming the customer's IAM role with an external id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerStorage {
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub role_arn: String,
    pub external_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}
