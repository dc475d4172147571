//! The identity of a queue's offsets.
//!
//! Offsets alone do not name data: two nodes of a region both start at offset 0, and a queue whose
//! directory was replaced starts again at 0. Every queue therefore has an *incarnation*: a random
//! 128-bit id created with the queue directory, persisted in it (`<dir>/incarnation`, fsynced), and
//! stable across restarts. A new one is minted whenever offsets could restart — a fresh or replaced
//! directory, or a recovery that moved the end below what a sink had already passed. Every record
//! is named by `(incarnation, offset)`; sinks derive archive object names and insert dedup tokens
//! from it, so no two nodes and no two lives of one queue can ever produce the same name.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::QueueError;
use crate::segment::replace_file_durably;

pub const INCARNATION_FILE: &str = "incarnation";

/// What `<dir>/incarnation` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncarnationRecord {
    /// `q` followed by 32 lowercase hex digits.
    pub incarnation: String,
    /// Unix ms when it was minted.
    pub created_at_ms: i64,
    /// Why it was minted (`fresh queue directory`, `end moved backwards`, ...), for operators.
    pub reason: String,
}

/// A new random incarnation id.
pub fn new_incarnation_id() -> String {
    format!("q{:032x}", rand::random::<u128>())
}

/// True for ids of the form [`new_incarnation_id`] makes (so names built from them stay safe in
/// object keys and file names).
pub fn is_valid_incarnation_id(id: &str) -> bool {
    id.len() == 33
        && id.starts_with('q')
        && id[1..]
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// Reads the queue's incarnation; `None` when the file does not exist.
pub fn read_incarnation(queue_dir: &Path) -> Result<Option<IncarnationRecord>, QueueError> {
    let path = queue_dir.join(INCARNATION_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(QueueError::io("reading incarnation", &path, error)),
    };
    let record: IncarnationRecord =
        serde_json::from_str(&text).map_err(|error| QueueError::BadIncarnation {
            path: path.clone(),
            message: error.to_string(),
        })?;
    if !is_valid_incarnation_id(&record.incarnation) {
        return Err(QueueError::BadIncarnation {
            path,
            message: format!("`{}` is not an incarnation id", record.incarnation),
        });
    }
    Ok(Some(record))
}

/// Mints a new incarnation and persists it durably (file synced, renamed into place, directory
/// synced) before any record of it can be written.
pub fn mint_incarnation(queue_dir: &Path, reason: &str) -> Result<IncarnationRecord, QueueError> {
    let record = IncarnationRecord {
        incarnation: new_incarnation_id(),
        created_at_ms: meridian_core::timestamp::now_unix_ms(),
        reason: reason.to_string(),
    };
    let path = queue_dir.join(INCARNATION_FILE);
    let text = serde_json::to_vec(&record).map_err(|error| QueueError::BadIncarnation {
        path: path.clone(),
        message: error.to_string(),
    })?;
    replace_file_durably(queue_dir, &path, &text, "writing incarnation")?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_incarnations_persist_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_incarnation(dir.path()).unwrap(), None);
        let first = mint_incarnation(dir.path(), "fresh queue directory").unwrap();
        assert!(is_valid_incarnation_id(&first.incarnation));
        assert_eq!(read_incarnation(dir.path()).unwrap(), Some(first.clone()));
        let second = mint_incarnation(dir.path(), "end moved backwards").unwrap();
        assert_ne!(first.incarnation, second.incarnation);
        assert_eq!(read_incarnation(dir.path()).unwrap(), Some(second));
    }

    #[test]
    fn a_damaged_incarnation_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(INCARNATION_FILE),
            b"{\"incarnation\": \"../x\"",
        )
        .unwrap();
        assert!(matches!(
            read_incarnation(dir.path()),
            Err(QueueError::BadIncarnation { .. })
        ));
        fs::write(
            dir.path().join(INCARNATION_FILE),
            br#"{"incarnation":"../etc","created_at_ms":0,"reason":""}"#,
        )
        .unwrap();
        assert!(matches!(
            read_incarnation(dir.path()),
            Err(QueueError::BadIncarnation { .. })
        ));
    }

    #[test]
    fn ids_are_checked() {
        assert!(is_valid_incarnation_id(&new_incarnation_id()));
        assert!(!is_valid_incarnation_id("q123"));
        assert!(!is_valid_incarnation_id(&format!("x{:032x}", 5u128)));
        assert!(!is_valid_incarnation_id(&format!("q{:032X}", u128::MAX)));
    }
}
