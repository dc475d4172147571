//! An archive batch encoded as the delivery runner reads it: per (project, received day) the
//! object's gzip so far, so that a batch of `flush_max_bytes` raw costs about its compressed size
//! in memory instead of its raw size.
//!
//! An object is a series of gzip members (RFC 1952 §2.2: "a gzip file consists of a series of
//! members"; `gzip -d`, `zcat`, Python's `gzip`, Spark and Athena read them all). Each group's
//! NDJSON is compressed in members of about [`MEMBER_RAW_BYTES`] (the message that reaches it
//! ends the member), and whenever the groups
//! together hold more than [`PENDING_RAW_BUDGET`] uncompressed bytes the largest is compressed
//! early, so the raw bytes held stay bounded however many projects a batch spans. Where members
//! end depends only on the records, never on how the runner chunked its reads: a redelivered
//! batch writes the same bytes.
//!
//! GDPR: a message erased when it is folded in is left out then; each group remembers its users
//! with the earliest `receivedAt` of their messages, and every delivery attempt asks the erasure
//! filter again, rewriting an object whose user was erased meanwhile.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use meridian_core::ErasureFilter;
use meridian_core::timestamp::{now_unix_ms, parse_timestamp_ms, utc_day_start_ms};
use meridian_queue::{BatchEncoder, EncodeError, Record};
use tracing::error;

use crate::error::ArchiveError;
use crate::layout::{ArchivedMessage, decode_object, encode_object};

/// Where a message goes when its routing fields cannot be read (never expected: we wrote it).
const UNROUTABLE_PROJECT: &str = "_unroutable";
/// A group's pending NDJSON is compressed into a member once it holds this many bytes.
const MEMBER_RAW_BYTES: usize = 1 << 20;
/// The most uncompressed bytes all groups of a batch hold together before the largest is
/// compressed.
const PENDING_RAW_BUDGET: usize = 4 << 20;

/// Where one record goes.
enum Route<'a> {
    Erased,
    Group {
        project_id: Cow<'a, str>,
        day_ms: i64,
        /// The user and the message's receivedAt (ms), when it names a user.
        user: Option<(Cow<'a, str>, i64)>,
    },
}

fn route<'a>(record: &'a Record, erasures: &dyn ErasureFilter) -> Route<'a> {
    let message = match serde_json::from_slice::<ArchivedMessage<'_>>(&record.payload) {
        Ok(message) => message,
        Err(parse_error) => {
            error!(offset = record.offset, error = %parse_error, "queued message lacks projectId/receivedAt; archiving it under {UNROUTABLE_PROJECT}");
            return Route::Group {
                project_id: Cow::Borrowed(UNROUTABLE_PROJECT),
                day_ms: utc_day_start_ms(now_unix_ms()),
                user: None,
            };
        }
    };
    let received_at_ms = parse_timestamp_ms(&message.received_at).unwrap_or(0);
    if let Some(user_id) = &message.user_id
        && erasures.is_erased(&message.project_id, user_id, received_at_ms)
    {
        return Route::Erased;
    }
    Route::Group {
        day_ms: utc_day_start_ms(received_at_ms),
        project_id: message.project_id,
        user: message.user_id.map(|user_id| (user_id, received_at_ms)),
    }
}

/// One (project, received day) object being built.
#[derive(Default)]
struct GroupObject {
    /// The members compressed so far.
    gzip: Vec<u8>,
    /// NDJSON not compressed yet.
    pending: Vec<u8>,
    /// The group's users, each with the earliest receivedAt (ms) of its messages: a deletion
    /// erases what was received up to it, so the earliest tells whether any of them is erased.
    earliest_by_user: HashMap<String, i64>,
}

impl GroupObject {
    /// Compresses the pending NDJSON into one more member.
    fn compress_pending(&mut self, gzip_level: u32) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let pending = std::mem::take(&mut self.pending);
        let mut encoder =
            GzEncoder::new(std::mem::take(&mut self.gzip), Compression::new(gzip_level));
        encoder.write_all(&pending)?;
        self.gzip = encoder.finish()?;
        Ok(pending.len())
    }
}

/// One object of a sealed batch.
pub(crate) struct SealedObject {
    pub project_id: String,
    pub day_ms: i64,
    pub body: Bytes,
    earliest_by_user: HashMap<String, i64>,
}

/// An archive batch being folded (then sealed) by the delivery runner; see the module docs.
pub struct ArchiveBatch {
    erasures: Arc<dyn ErasureFilter>,
    erased_messages: Arc<AtomicU64>,
    gzip_level: u32,
    /// Project id → received day → the object.
    groups: BTreeMap<String, BTreeMap<i64, GroupObject>>,
    /// Uncompressed bytes across every group's `pending`.
    pending_raw_bytes: usize,
    /// Filled by `seal`, in (project, day) order.
    sealed: Vec<SealedObject>,
}

impl ArchiveBatch {
    pub(crate) fn new(
        erasures: Arc<dyn ErasureFilter>,
        erased_messages: Arc<AtomicU64>,
        gzip_level: u32,
    ) -> ArchiveBatch {
        ArchiveBatch {
            erasures,
            erased_messages,
            gzip_level,
            groups: BTreeMap::new(),
            pending_raw_bytes: 0,
            sealed: Vec::new(),
        }
    }

    /// The (project, day) group, created when new; the project id is copied only then.
    fn group_of(&mut self, project_id: &str, day_ms: i64) -> Option<&mut GroupObject> {
        if !self.groups.contains_key(project_id) {
            self.groups.insert(project_id.to_string(), BTreeMap::new());
        }
        let days = self.groups.get_mut(project_id)?;
        Some(days.entry(day_ms).or_default())
    }

    /// Compresses the largest pending group until the batch is within its raw budget.
    fn compress_over_budget(&mut self) -> std::io::Result<()> {
        while self.pending_raw_bytes > PENDING_RAW_BUDGET {
            let Some(largest) = self
                .groups
                .values_mut()
                .flat_map(|days| days.values_mut())
                .max_by_key(|group| group.pending.len())
            else {
                break;
            };
            let compressed = largest.compress_pending(self.gzip_level)?;
            debug_assert!(compressed > 0, "over budget means some group holds bytes");
            self.pending_raw_bytes -= compressed;
        }
        Ok(())
    }

    /// The batch's objects for a delivery attempt beginning now: each without the messages of
    /// users erased since they were folded in. CPU work: call it from a blocking thread.
    pub(crate) fn objects_now(&self) -> Result<Vec<(String, i64, Bytes)>, ArchiveError> {
        debug_assert!(
            self.groups.is_empty(),
            "objects are handed out once the batch is sealed"
        );
        let mut objects = Vec::with_capacity(self.sealed.len());
        for object in &self.sealed {
            let erased_since = object
                .earliest_by_user
                .iter()
                .any(|(user_id, earliest_ms)| {
                    self.erasures
                        .is_erased(&object.project_id, user_id, *earliest_ms)
                });
            if !erased_since {
                objects.push((
                    object.project_id.clone(),
                    object.day_ms,
                    object.body.clone(),
                ));
                continue;
            }
            let filtered = without_erased(
                self.erasures.as_ref(),
                &object.project_id,
                &object.body,
                self.gzip_level,
            )?;
            self.erased_messages
                .fetch_add(filtered.erased, Ordering::Relaxed);
            if let Some(body) = filtered.body {
                objects.push((object.project_id.clone(), object.day_ms, Bytes::from(body)));
            }
        }
        Ok(objects)
    }
}

impl BatchEncoder for ArchiveBatch {
    fn absorb(&mut self, records: &[Record]) -> Result<(), EncodeError> {
        debug_assert!(self.sealed.is_empty(), "nothing is folded in after sealing");
        let erasures = Arc::clone(&self.erasures);
        let gzip_level = self.gzip_level;
        let mut erased = 0u64;
        for record in records {
            let (project_id, day_ms, user) = match route(record, erasures.as_ref()) {
                Route::Erased => {
                    erased += 1;
                    continue;
                }
                Route::Group {
                    project_id,
                    day_ms,
                    user,
                } => (project_id, day_ms, user),
            };
            let Some(group) = self.group_of(&project_id, day_ms) else {
                return Err(EncodeError::Inconsistent(format!(
                    "the group of project {project_id} vanished"
                )));
            };
            group.pending.extend_from_slice(&record.payload);
            group.pending.push(b'\n');
            if let Some((user_id, received_at_ms)) = user {
                match group.earliest_by_user.get_mut(user_id.as_ref()) {
                    Some(earliest_ms) => *earliest_ms = (*earliest_ms).min(received_at_ms),
                    None => {
                        group
                            .earliest_by_user
                            .insert(user_id.into_owned(), received_at_ms);
                    }
                }
            }
            let pending_before = group.pending.len();
            let compressed = if pending_before >= MEMBER_RAW_BYTES {
                group.compress_pending(gzip_level)?
            } else {
                0
            };
            self.pending_raw_bytes += record.payload.len() + 1;
            self.pending_raw_bytes -= compressed;
            self.compress_over_budget()?;
        }
        self.erased_messages.fetch_add(erased, Ordering::Relaxed);
        Ok(())
    }

    fn seal(&mut self) -> Result<(), EncodeError> {
        let groups = std::mem::take(&mut self.groups);
        for (project_id, days) in groups {
            for (day_ms, mut group) in days {
                group.compress_pending(self.gzip_level)?;
                group.gzip.shrink_to_fit();
                self.sealed.push(SealedObject {
                    project_id: project_id.clone(),
                    day_ms,
                    body: Bytes::from(group.gzip),
                    earliest_by_user: group.earliest_by_user,
                });
            }
        }
        self.pending_raw_bytes = 0;
        Ok(())
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// An object's body without the messages of erased users.
pub(crate) struct Filtered {
    /// `None` when no message is left.
    pub body: Option<Vec<u8>>,
    /// How many messages were left out.
    pub erased: u64,
}

/// The object's messages without those of users erased now. CPU work: call it from a blocking
/// thread.
pub(crate) fn without_erased(
    erasures: &dyn ErasureFilter,
    key: &str,
    body: &[u8],
    gzip_level: u32,
) -> Result<Filtered, ArchiveError> {
    let lines = decode_object(key, body)?;
    let kept: Vec<&Vec<u8>> = lines
        .iter()
        .filter(
            |line| match serde_json::from_slice::<ArchivedMessage<'_>>(line) {
                Ok(message) => !message.user_id.as_ref().is_some_and(|user_id| {
                    erasures.is_erased(
                        &message.project_id,
                        user_id,
                        parse_timestamp_ms(&message.received_at).unwrap_or(0),
                    )
                }),
                Err(_) => true,
            },
        )
        .collect();
    let erased = (lines.len() - kept.len()) as u64;
    if kept.is_empty() {
        return Ok(Filtered { body: None, erased });
    }
    if erased == 0 {
        return Ok(Filtered {
            body: Some(body.to_vec()),
            erased,
        });
    }
    let body =
        encode_object(kept.iter().map(|line| line.as_slice()), gzip_level).map_err(|error| {
            ArchiveError::BadObject {
                key: key.to_string(),
                message: error.to_string(),
            }
        })?;
    Ok(Filtered {
        body: Some(body),
        erased,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Erases user "gone" of every project once `active` is set.
    struct EraseGoneWhenActive {
        active: AtomicBool,
    }

    impl ErasureFilter for EraseGoneWhenActive {
        fn is_erased(&self, _project_id: &str, user_id: &str, _received_at_ms: i64) -> bool {
            user_id == "gone" && self.active.load(Ordering::SeqCst)
        }
    }

    fn message(offset: u64, project: &str, user: &str, padding: usize) -> Record {
        Record {
            offset,
            payload: format!(
                r#"{{"projectId":"{project}","userId":"{user}","receivedAt":"2026-11-24T10:00:00.000Z","n":{offset},"pad":"{}"}}"#,
                "x".repeat(padding)
            )
            .into_bytes(),
        }
    }

    fn new_batch(erasures: Arc<dyn ErasureFilter>) -> (ArchiveBatch, Arc<AtomicU64>) {
        let erased = Arc::new(AtomicU64::new(0));
        (ArchiveBatch::new(erasures, Arc::clone(&erased), 1), erased)
    }

    /// How many gzip members follow one another in `body`.
    fn member_count(body: &[u8]) -> usize {
        let mut rest = body;
        let mut count = 0;
        while !rest.is_empty() {
            let mut member = flate2::bufread::GzDecoder::new(rest);
            std::io::copy(&mut member, &mut std::io::sink()).unwrap();
            rest = member.into_inner();
            count += 1;
        }
        count
    }

    fn lines_of(body: &[u8]) -> Vec<String> {
        decode_object("k", body)
            .unwrap()
            .into_iter()
            .map(|line| String::from_utf8(line).unwrap())
            .collect()
    }

    #[test]
    fn a_large_group_is_written_in_members_the_same_however_its_records_were_chunked() {
        let records: Vec<Record> = (0..3_000)
            .map(|offset| message(offset, "p1", "u", 1_000))
            .collect();
        let (mut whole, _) = new_batch(Arc::new(meridian_core::NoErasures));
        whole.absorb(&records).unwrap();
        whole.seal().unwrap();
        let (mut chunked, _) = new_batch(Arc::new(meridian_core::NoErasures));
        for chunk in records.chunks(7) {
            chunked.absorb(chunk).unwrap();
        }
        chunked.seal().unwrap();

        let objects = whole.objects_now().unwrap();
        assert_eq!(objects.len(), 1);
        let body = &objects[0].2;
        assert_eq!(
            member_count(body),
            4,
            "3.1 MiB of NDJSON in members of {MEMBER_RAW_BYTES} bytes (the message reaching it ends one)"
        );
        let lines = lines_of(body);
        assert_eq!(lines.len(), 3_000, "every member is read back");
        assert!(
            lines
                .iter()
                .enumerate()
                .all(|(offset, line)| line.contains(&format!(r#""n":{offset},"#))),
            "in offset order"
        );
        assert_eq!(
            chunked.objects_now().unwrap()[0].2,
            *body,
            "a redelivery writes the same bytes"
        );
    }

    #[test]
    fn many_groups_hold_no_more_than_the_raw_budget_uncompressed() {
        let (mut batch, _) = new_batch(Arc::new(meridian_core::NoErasures));
        let mut most_pending = 0;
        for offset in 0..4_000u64 {
            let project = format!("p{}", offset % 200);
            batch
                .absorb(&[message(offset, &project, "u", 2_000)])
                .unwrap();
            most_pending = most_pending.max(batch.pending_raw_bytes);
        }
        assert!(
            most_pending <= PENDING_RAW_BUDGET,
            "{most_pending} bytes pending across 200 groups"
        );
        assert!(
            most_pending > PENDING_RAW_BUDGET / 2,
            "the budget is used before compressing early: {most_pending}"
        );
        batch.seal().unwrap();
        let objects = batch.objects_now().unwrap();
        assert_eq!(objects.len(), 200);
        let total_lines: usize = objects.iter().map(|object| lines_of(&object.2).len()).sum();
        assert_eq!(total_lines, 4_000);
    }

    #[test]
    fn a_user_erased_after_the_batch_was_folded_is_left_out_when_it_is_delivered() {
        let erasures = Arc::new(EraseGoneWhenActive {
            active: AtomicBool::new(false),
        });
        let (mut batch, erased) = new_batch(erasures.clone());
        batch
            .absorb(&[
                message(0, "p1", "gone", 10),
                message(1, "p1", "kept", 10),
                message(2, "p2", "gone", 10),
            ])
            .unwrap();
        batch.seal().unwrap();
        let before: Vec<usize> = batch
            .objects_now()
            .unwrap()
            .iter()
            .map(|object| lines_of(&object.2).len())
            .collect();
        assert_eq!(before, vec![2, 1]);
        assert_eq!(erased.load(Ordering::SeqCst), 0);

        erasures.active.store(true, Ordering::SeqCst);
        let after = batch.objects_now().unwrap();
        assert_eq!(after.len(), 1, "p2's object held only the erased user");
        assert_eq!(after[0].0, "p1");
        let lines = lines_of(&after[0].2);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains(r#""userId":"kept""#), "{}", lines[0]);
        assert_eq!(erased.load(Ordering::SeqCst), 2);

        let (mut later, erased_later) = new_batch(erasures);
        later.absorb(&[message(3, "p1", "gone", 10)]).unwrap();
        later.seal().unwrap();
        assert!(later.objects_now().unwrap().is_empty());
        assert_eq!(
            erased_later.load(Ordering::SeqCst),
            1,
            "erased already when folded in"
        );
    }
}
