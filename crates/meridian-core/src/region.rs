//! Region identifiers such as `eu-west-1`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A region id: lowercase ASCII letters, digits and hyphens, 2 to 32 characters,
/// starting with a letter. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(Arc<str>);

#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a valid region id: use 2-32 lowercase letters, digits and hyphens, starting with a letter (e.g. eu-west-1)"
)]
pub struct InvalidRegionId(pub String);

impl RegionId {
    pub fn parse(candidate: &str) -> Result<RegionId, InvalidRegionId> {
        let is_valid_length = (2..=32).contains(&candidate.len());
        let starts_with_letter = candidate
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_lowercase());
        let has_only_allowed_chars = candidate
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !(is_valid_length && starts_with_letter && has_only_allowed_chars) {
            return Err(InvalidRegionId(candidate.to_string()));
        }
        Ok(RegionId(Arc::from(candidate)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for RegionId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "RegionId({})", &self.0)
    }
}

impl Serialize for RegionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RegionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        RegionId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_aws_style_ids_and_refuses_others() {
        for valid in [
            "eu-west-1",
            "us-east-1",
            "af-south-1",
            "ap-southeast-1",
            "local",
        ] {
            assert_eq!(RegionId::parse(valid).unwrap().as_str(), valid);
        }
        for invalid in [
            "",
            "E",
            "EU-WEST-1",
            "1eu",
            "eu_west",
            "eu/west",
            &"a".repeat(33),
        ] {
            assert!(
                RegionId::parse(invalid).is_err(),
                "{invalid} should be refused"
            );
        }
    }
}
