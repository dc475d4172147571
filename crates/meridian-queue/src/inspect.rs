//! Read-only inspection of a queue directory (for residency reports): it never opens the queue,
//! starts no writer, writes no cursor and repairs nothing, so it is safe beside a running node.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use crate::encryption::QueueEncryption;
use crate::error::QueueError;
use crate::segment::{check_segment_header, list_segments, scan_records};

/// How many records of each project the queue directory holds (records whose project cannot be
/// read are counted under `""`). Blocking: call from `spawn_blocking`.
pub fn project_record_counts(
    queue_dir: &Path,
    encryption: Option<&QueueEncryption>,
) -> Result<BTreeMap<String, u64>, QueueError> {
    #[derive(serde::Deserialize)]
    struct ProjectOf<'a> {
        #[serde(rename = "projectId", borrow)]
        project_id: Option<std::borrow::Cow<'a, str>>,
    }
    let segments_dir = queue_dir.join("segments");
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    if !segments_dir.is_dir() {
        return Ok(counts);
    }
    for (base_offset, path) in list_segments(&segments_dir)? {
        let mut file = match File::open(&path) {
            Ok(file) => file,
            // Deleted by the running node's GC since it was listed: nothing to report.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(QueueError::io("opening segment", &path, error)),
        };
        let Ok(format) = check_segment_header(&mut file, base_offset)
            .map_err(|error| QueueError::io("reading segment header", &path, error))?
        else {
            continue;
        };
        scan_records(&file, base_offset, format, |_, payload| {
            let opened;
            let plain = if payload.first() == Some(&crate::encryption::SEALED_MAGIC) {
                match encryption.map(|encryption| encryption.open(payload)) {
                    Some(Ok(plain)) => {
                        opened = plain;
                        opened.as_slice()
                    }
                    _ => {
                        *counts.entry(String::new()).or_default() += 1;
                        return;
                    }
                }
            } else {
                payload
            };
            let project = serde_json::from_slice::<ProjectOf<'_>>(plain)
                .ok()
                .and_then(|message| message.project_id.map(|id| id.into_owned()))
                .unwrap_or_default();
            *counts.entry(project).or_default() += 1;
        })
        .map_err(|error| QueueError::io("scanning segment", &path, error))?;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QueueConfig, RecordBatch, RegionQueue};

    #[tokio::test]
    async fn counts_the_records_of_each_project_without_touching_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path().join("queue"))).unwrap();
        let mut batch = RecordBatch::default();
        for payload in [
            r#"{"projectId":"prj_a","n":1}"#,
            r#"{"projectId":"prj_b","n":2}"#,
            r#"{"projectId":"prj_a","n":3}"#,
            "not json",
        ] {
            batch.push(payload.as_bytes()).unwrap();
        }
        queue.append(batch).await.unwrap();
        let cursors_before = queue.cursor_names().unwrap();
        let counts = project_record_counts(&dir.path().join("queue"), None).unwrap();
        assert_eq!(
            counts,
            BTreeMap::from([
                (String::new(), 1),
                ("prj_a".to_string(), 2),
                ("prj_b".to_string(), 1)
            ])
        );
        assert_eq!(
            queue.cursor_names().unwrap(),
            cursors_before,
            "no cursor written"
        );
        queue.close();
    }
}
