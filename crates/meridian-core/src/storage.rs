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
