//! Object keys and the gzip NDJSON encoding.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::Deserialize;

use crate::error::ArchiveError;

/// The key of the object holding a project's messages of one received-day from one delivery
/// batch: `[<prefix>/]segment-logs/<project>/<received-day-ms>/<batch name>.gz`, where the batch
/// name (`<queue incarnation>-<start:020>-<end:020>`, see `DeliveryBatch::name`) is unique across
/// every node of the region and every life of its queues, and the same when a batch is retried.
pub fn object_key(
    prefix: Option<&str>,
    project_id: &str,
    day_start_ms: i64,
    batch_name: &str,
) -> String {
    let prefix = prefix
        .map(|prefix| prefix.trim_matches('/'))
        .filter(|prefix| !prefix.is_empty());
    let tail = format!("segment-logs/{project_id}/{day_start_ms}/{batch_name}.gz");
    match prefix {
        Some(prefix) => format!("{prefix}/{tail}"),
        None => tail,
    }
}

/// The fields of a stored message the archive routes by.
#[derive(Debug, Deserialize)]
pub struct ArchivedMessage<'a> {
    #[serde(rename = "projectId", borrow)]
    pub project_id: Cow<'a, str>,
    #[serde(rename = "receivedAt", borrow)]
    pub received_at: Cow<'a, str>,
    #[serde(rename = "userId", default, borrow)]
    pub user_id: Option<Cow<'a, str>>,
}

/// Gzips messages as NDJSON (one message per line).
pub fn encode_object<'a>(
    messages: impl IntoIterator<Item = &'a [u8]>,
    level: u32,
) -> Result<Vec<u8>, std::io::Error> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::new(level));
    for message in messages {
        encoder.write_all(message)?;
        encoder.write_all(b"\n")?;
    }
    encoder.finish()
}

/// The messages of a gzip NDJSON object (one gzip member or several in a row, as the sink writes
/// them), one `Vec<u8>` per line.
pub fn decode_object(key: &str, gzip_body: &[u8]) -> Result<Vec<Vec<u8>>, ArchiveError> {
    let reader = BufReader::new(MultiGzDecoder::new(gzip_body));
    let mut lines = Vec::new();
    for line in reader.split(b'\n') {
        let line = line.map_err(|error| ArchiveError::BadObject {
            key: key.to_string(),
            message: error.to_string(),
        })?;
        if !line.is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_segment_layout() {
        let batch = "q0123456789abcdef0123456789abcdef-00000000000000000000-00000000000000000025";
        assert_eq!(
            object_key(None, "prj_1", 1_795_478_400_000, batch),
            format!("segment-logs/prj_1/1795478400000/{batch}.gz")
        );
        assert_eq!(
            object_key(Some("/tenant/a/"), "prj_1", 0, batch),
            format!("tenant/a/segment-logs/prj_1/0/{batch}.gz")
        );
        assert_eq!(
            object_key(Some(""), "p", 0, batch),
            format!("segment-logs/p/0/{batch}.gz")
        );
    }

    #[test]
    fn objects_round_trip() {
        let messages: Vec<&[u8]> = vec![br#"{"a":1}"#, br#"{"b":"\u00e9"}"#];
        let encoded = encode_object(messages.clone(), 1).unwrap();
        let decoded = decode_object("k", &encoded).unwrap();
        assert_eq!(
            decoded,
            messages.iter().map(|m| m.to_vec()).collect::<Vec<_>>()
        );
        assert!(decode_object("k", b"not gzip").is_err());
    }
}
