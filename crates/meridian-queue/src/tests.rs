use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use crate::segment::list_segments;
use crate::*;

fn config(dir: &std::path::Path) -> QueueConfig {
    QueueConfig::new(dir.join("queue"))
}

fn batch_of(payloads: &[String]) -> RecordBatch {
    let mut batch = RecordBatch::default();
    for payload in payloads {
        batch.push(payload.as_bytes()).unwrap();
    }
    batch
}

fn read_all(consumer: &mut Consumer) -> Vec<Record> {
    let (records, lost) = read_all_with_losses(consumer);
    assert_eq!(lost, Vec::new(), "no record was lost to damage");
    records
}

/// Every readable record from the consumer's position on, and the ranges lost to damage.
fn read_all_with_losses(consumer: &mut Consumer) -> (Vec<Record>, Vec<OffsetRange>) {
    let from = consumer.state().next_offset;
    read_all_with_losses_from(consumer, from)
}

/// Every readable record from `from` on, and the ranges lost to damage.
fn read_all_with_losses_from(
    consumer: &mut Consumer,
    from: u64,
) -> (Vec<Record>, Vec<OffsetRange>) {
    let mut records: Vec<Record> = Vec::new();
    let mut lost = Vec::new();
    let mut from = from;
    loop {
        match consumer.read(from, 1000, 1 << 20) {
            Ok(chunk) => {
                let Some(last) = chunk.last() else {
                    return (records, lost);
                };
                from = last.offset + 1;
                records.extend(chunk);
            }
            Err(QueueError::Damaged { missing, .. }) => {
                assert_eq!(missing.start, from, "the loss starts where reading stood");
                from = missing.end;
                lost.push(missing);
            }
            Err(other) => panic!("reading failed: {other}"),
        }
    }
}

/// Flips one bit of `path` at `position`.
fn flip_bit(path: &std::path::Path, position: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position as usize] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn payload_strings(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|record| String::from_utf8(record.payload.clone()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs_and_read_back_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let mut tasks = Vec::new();
    for task_index in 0..64 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for append_index in 0..10 {
                let payloads = vec![
                    format!("t{task_index}-a{append_index}-0"),
                    format!("t{task_index}-a{append_index}-1"),
                ];
                ranges.push(queue.append(batch_of(&payloads)).await.unwrap());
            }
            ranges
        }));
    }
    let mut ranges = Vec::new();
    for task in tasks {
        ranges.extend(task.await.unwrap());
    }
    assert_eq!(queue.durable_end(), 64 * 10 * 2);
    let covered: BTreeSet<u64> = ranges
        .iter()
        .flat_map(|range| range.start..range.end)
        .collect();
    assert_eq!(covered.len(), 1280, "every record got its own offset");
    let stats = queue.stats();
    assert!(
        stats.sync_count < 640,
        "640 appends from 64 concurrent tasks must share syncs, got {} syncs",
        stats.sync_count
    );

    let mut consumer = queue.consumer("archive").unwrap();
    let records = read_all(&mut consumer);
    let offsets: Vec<u64> = records.iter().map(|record| record.offset).collect();
    assert_eq!(offsets, (0..1280).collect::<Vec<_>>());
    let unique: BTreeSet<String> = payload_strings(&records).into_iter().collect();
    assert_eq!(unique.len(), 1280);
    // The two records of one append are adjacent.
    for range in &ranges {
        let first = &records[range.start as usize].payload;
        let second = &records[range.start as usize + 1].payload;
        assert_eq!(first[..first.len() - 1], second[..second.len() - 1]);
    }
    queue.close();
}

#[tokio::test]
async fn reopening_keeps_offsets_cursors_and_in_flight_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let payloads: Vec<String> = (0..10).map(|index| format!("message {index}")).collect();
    queue.append(batch_of(&payloads)).await.unwrap();
    let mut consumer = queue.consumer("clickhouse").unwrap();
    let first_four = consumer.read(0, 4, usize::MAX).unwrap();
    assert_eq!(first_four.len(), 4);
    consumer.begin(OffsetRange { start: 0, end: 4 }).unwrap();
    consumer.commit(4).unwrap();
    consumer.begin(OffsetRange { start: 4, end: 7 }).unwrap();
    queue.close();
    drop(consumer);

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(queue.durable_end(), 10);
    let range = queue
        .append(batch_of(&["message 10".to_string()]))
        .await
        .unwrap();
    assert_eq!(range, OffsetRange { start: 10, end: 11 });
    let mut consumer = queue.consumer("clickhouse").unwrap();
    let state = consumer.state();
    assert_eq!(state.next_offset, 4);
    assert_eq!(state.in_flight, Some(OffsetRange { start: 4, end: 7 }));
    let redelivered = consumer.read_range(state.in_flight.unwrap()).unwrap();
    assert_eq!(
        payload_strings(&redelivered),
        vec!["message 4", "message 5", "message 6"]
    );
    let fresh = queue.consumer("archive").unwrap();
    assert_eq!(
        fresh.state().next_offset,
        0,
        "a new consumer starts at the oldest record"
    );
    queue.close();
}

fn last_segment_path(dir: &std::path::Path) -> std::path::PathBuf {
    list_segments(&dir.join("queue/segments"))
        .unwrap()
        .pop()
        .unwrap()
        .1
}

#[tokio::test]
async fn a_torn_or_scribbled_tail_is_cut_and_the_queue_serves_on() {
    for damage in [
        "append garbage",
        "truncate mid-record",
        "scribble last record",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(config(dir.path())).unwrap();
        let payloads: Vec<String> = (0..5)
            .map(|index| format!("record number {index}"))
            .collect();
        queue.append(batch_of(&payloads)).await.unwrap();
        queue.close();
        let path = last_segment_path(dir.path());
        let length = std::fs::metadata(&path).unwrap().len();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        match damage {
            "append garbage" => {
                file.seek(SeekFrom::End(0)).unwrap();
                file.write_all(&[0xAB; 37]).unwrap();
            }
            "truncate mid-record" => file.set_len(length - 3).unwrap(),
            _ => {
                file.seek(SeekFrom::Start(length - 4)).unwrap();
                file.write_all(b"XXXX").unwrap();
            }
        }
        drop(file);

        let queue = RegionQueue::open(config(dir.path())).unwrap();
        let expected_survivors = if damage == "append garbage" { 5 } else { 4 };
        assert_eq!(queue.durable_end(), expected_survivors, "{damage}");
        queue
            .append(batch_of(&["after recovery".to_string()]))
            .await
            .unwrap();
        let mut consumer = queue.consumer("archive").unwrap();
        let mut expected: Vec<String> = payloads[..expected_survivors as usize].to_vec();
        expected.push("after recovery".to_string());
        assert_eq!(
            payload_strings(&read_all(&mut consumer)),
            expected,
            "{damage}"
        );
        queue.close();
    }
}

#[tokio::test]
async fn a_flipped_bit_in_the_last_segment_loses_only_its_record_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let payloads: Vec<String> = (0..1000)
        .map(|index| format!("message {index:04}"))
        .collect();
    for chunk in payloads.chunks(50) {
        queue.append(batch_of(chunk)).await.unwrap();
    }
    queue.close();
    let path = last_segment_path(dir.path());
    let length = std::fs::metadata(&path).unwrap().len();
    flip_bit(&path, length / 4);

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(
        queue.durable_end(),
        1000,
        "the intact records after the flip are kept"
    );
    let stats = queue.stats();
    assert_eq!(stats.damaged_records, 1, "{stats:?}");
    assert!(stats.quarantined_bytes > 0, "{stats:?}");
    assert_eq!(
        crate::quarantine::list_quarantined(&dir.path().join("queue")).len(),
        1
    );
    let appended = queue
        .append(batch_of(&["after recovery".to_string()]))
        .await
        .unwrap();
    assert_eq!(appended.start, 1000, "no offset shifted");

    let mut consumer = queue.consumer("archive").unwrap();
    let (records, lost) = read_all_with_losses(&mut consumer);
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].len(), 1, "exactly the damaged record: {lost:?}");
    let lost_offset = lost[0].start;
    assert!(
        (200..300).contains(&lost_offset),
        "near a quarter: {lost_offset}"
    );
    let mut expected: Vec<Record> = payloads
        .iter()
        .enumerate()
        .filter(|(index, _)| *index as u64 != lost_offset)
        .map(|(index, payload)| Record {
            offset: index as u64,
            payload: payload.clone().into_bytes(),
        })
        .collect();
    expected.push(Record {
        offset: 1000,
        payload: b"after recovery".to_vec(),
    });
    assert_eq!(records, expected, "every intact record, at its own offset");
    queue.close();
}

#[tokio::test]
async fn a_flipped_bit_in_a_closed_segment_loses_only_its_record_for_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.segment_max_bytes = 1024;
    let queue = RegionQueue::open(queue_config).unwrap();
    let payloads: Vec<String> = (0..200)
        .map(|index| format!("message {index:04}"))
        .collect();
    for chunk in payloads.chunks(10) {
        queue.append(batch_of(chunk)).await.unwrap();
    }
    let segments = list_segments(&dir.path().join("queue/segments")).unwrap();
    assert!(segments.len() > 3, "segments rolled");
    let (base_offset, closed_segment) = &segments[1];
    let length = std::fs::metadata(closed_segment).unwrap().len();
    flip_bit(closed_segment, length / 2);

    for reader_name in ["archive", "clickhouse"] {
        let mut consumer = queue.consumer(reader_name).unwrap();
        let (records, lost) = read_all_with_losses(&mut consumer);
        assert_eq!(lost.len(), 1, "{reader_name}: {lost:?}");
        assert_eq!(lost[0].len(), 1, "{reader_name}: {lost:?}");
        assert!(lost[0].start > *base_offset && lost[0].start < segments[2].0);
        assert_eq!(records.len(), 199, "{reader_name}");
        assert!(
            records
                .iter()
                .all(|record| record.payload == payloads[record.offset as usize].as_bytes()),
            "{reader_name}: every record at its own offset"
        );
    }
    let stats = queue.stats();
    assert_eq!(
        stats.damaged_records, 1,
        "counted once for both readers: {stats:?}"
    );
    assert_eq!(
        crate::quarantine::list_quarantined(&dir.path().join("queue")).len(),
        1
    );
    queue.close();
}

#[tokio::test]
async fn readers_never_see_bytes_past_what_the_writer_completed() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["a".into(), "b".into(), "c".into()]))
        .await
        .unwrap();
    // The remains of a failed write past the completed bytes (the writer cuts such bytes off and
    // writes its next group over them).
    let path = last_segment_path(dir.path());
    let completed = std::fs::metadata(&path).unwrap().len();
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(completed)).unwrap();
    file.write_all(&[0x5a; 200]).unwrap();
    drop(file);
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(
        payload_strings(&read_all(&mut consumer)),
        vec!["a", "b", "c"]
    );
    // The next group lands where those bytes were; a reader that had buffered them would take
    // the stale bytes for damage and skip acknowledged records.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(completed).unwrap();
    drop(file);
    queue
        .append(batch_of(&["d".into(), "e".into()]))
        .await
        .unwrap();
    let (rest, lost) = read_all_with_losses_from(&mut consumer, 3);
    assert_eq!(lost, Vec::new(), "nothing taken for damage");
    assert_eq!(payload_strings(&rest), vec!["d", "e"]);
    assert_eq!(queue.stats().damaged_records, 0);
    queue.close();
}

#[tokio::test]
async fn a_damaged_segment_header_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue.close();
    let path = last_segment_path(dir.path());
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5)
        .unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue.append(batch_of(&["fine".to_string()])).await.unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(payload_strings(&read_all(&mut consumer)), vec!["fine"]);
    queue.close();
}

#[tokio::test]
async fn a_damaged_header_of_the_last_segment_keeps_the_intact_records_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["one".into(), "two".into(), "three".into()]))
        .await
        .unwrap();
    queue.close();
    let path = last_segment_path(dir.path());
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(2)).unwrap();
    file.write_all(b"XX").unwrap(); // the magic is scribbled over
    drop(file);

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(
        queue.durable_end(),
        3,
        "the three acknowledged records are kept"
    );
    queue.append(batch_of(&["four".to_string()])).await.unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(
        payload_strings(&read_all(&mut consumer)),
        vec!["one", "two", "three", "four"]
    );
    queue.close();
}

#[tokio::test]
async fn segments_roll_and_are_deleted_once_every_consumer_passed_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.segment_max_bytes = 512;
    let queue = RegionQueue::open(queue_config).unwrap();
    let mut archive = queue.consumer("archive").unwrap();
    let mut warehouse = queue.consumer("clickhouse").unwrap();
    for index in 0..40 {
        queue
            .append(batch_of(&[format!("{index:0>60}")]))
            .await
            .unwrap();
    }
    let segment_count = queue.stats().segment_count;
    assert!(segment_count > 4, "segments rolled: {segment_count}");
    assert_eq!(queue.stats().first_offset, 0);

    let all = read_all(&mut archive);
    assert_eq!(all.len(), 40);
    archive.begin(OffsetRange { start: 0, end: 40 }).unwrap();
    archive.commit(40).unwrap();
    assert_eq!(queue.stats().first_offset, 0, "clickhouse still needs them");

    let all_again = read_all(&mut warehouse);
    assert_eq!(all_again, all);
    warehouse.begin(OffsetRange { start: 0, end: 40 }).unwrap();
    warehouse.commit(40).unwrap();
    let stats = queue.stats();
    assert_eq!(
        stats.segment_count, 1,
        "only the active segment remains: {stats:?}"
    );
    assert!(
        stats.first_offset > 0 && stats.first_offset <= 40,
        "{stats:?}"
    );
    queue.close();
}

#[tokio::test]
async fn a_full_budget_refuses_appends_until_consumers_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.segment_max_bytes = 1024;
    queue_config.disk_budget_bytes = 4096;
    let queue = RegionQueue::open(queue_config).unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    let payload = "x".repeat(200);
    let mut accepted = 0u64;
    let full_error = loop {
        match queue.append(batch_of(std::slice::from_ref(&payload))).await {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 100, "the budget never filled up");
    };
    assert!(
        matches!(full_error, QueueError::Full { .. }),
        "{full_error}"
    );
    let still_full = queue.append(batch_of(std::slice::from_ref(&payload))).await;
    assert!(matches!(still_full, Err(QueueError::Full { .. })));
    assert!(
        !queue.is_writable(),
        "a queue refusing appends for its budget is not writable"
    );

    let records = read_all(&mut consumer);
    assert_eq!(records.len() as u64, accepted);
    consumer
        .begin(OffsetRange {
            start: 0,
            end: accepted,
        })
        .unwrap();
    consumer.commit(accepted).unwrap();
    queue
        .append(batch_of(std::slice::from_ref(&payload)))
        .await
        .expect("space was freed by the consumer");
    assert!(queue.is_writable());
    queue.close();
}

#[tokio::test]
async fn buffered_durability_acknowledges_and_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.durability = Durability::Buffered {
        sync_interval: Duration::from_millis(10),
    };
    let queue = RegionQueue::open(queue_config).unwrap();
    queue.append(batch_of(&["a".to_string()])).await.unwrap();
    let mut end = queue.subscribe_durable_end();
    end.wait_for(|end| *end == 1).await.unwrap();
    queue.close();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(queue.durable_end(), 1);
    queue.close();
}

#[tokio::test]
async fn an_empty_queue_starts_past_existing_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["a".into(), "b".into(), "c".into()]))
        .await
        .unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    consumer.begin(OffsetRange { start: 0, end: 3 }).unwrap();
    consumer.commit(3).unwrap();
    queue.close();
    drop(consumer);
    std::fs::remove_dir_all(dir.path().join("queue/segments")).unwrap();
    std::fs::create_dir_all(dir.path().join("queue/segments")).unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(queue.durable_end(), 3);
    queue.append(batch_of(&["d".into()])).await.unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(payload_strings(&read_all(&mut consumer)), vec!["d"]);
    queue.close();
}

#[tokio::test]
async fn an_encrypted_queue_keeps_no_plaintext_on_disk_and_reads_back_through_rotation() {
    use crate::encryption::{Keyring, QueueEncryption};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let keyring = |ids: &[u8], active: u8| {
        Keyring::new(ids.iter().map(|id| (*id, [*id; 32])).collect(), active).unwrap()
    };
    let encryption = Arc::new(QueueEncryption::new(keyring(&[1], 1)));
    let mut queue_config = config(dir.path());
    queue_config.encryption = Some(Arc::clone(&encryption));
    let queue = RegionQueue::open(queue_config.clone()).unwrap();
    let mut batch = queue.new_batch();
    batch.push(br#"{"userId":"secret-user-1"}"#).unwrap();
    queue.append(batch).await.unwrap();
    encryption.replace_keyring(keyring(&[1, 2], 2));
    let mut batch = queue.new_batch();
    batch.push(br#"{"userId":"secret-user-2"}"#).unwrap();
    queue.append(batch).await.unwrap();
    queue.close();
    let segment = std::fs::read(last_segment_path(dir.path())).unwrap();
    assert!(
        !segment.windows(11).any(|window| window == b"secret-user"),
        "no plaintext at rest"
    );

    let queue = RegionQueue::open(queue_config).unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(
        payload_strings(&read_all(&mut consumer)),
        vec![
            r#"{"userId":"secret-user-1"}"#,
            r#"{"userId":"secret-user-2"}"#
        ]
    );
    queue.close();

    let without_key = RegionQueue::open(config(dir.path())).unwrap();
    let mut consumer = without_key.consumer("clickhouse").unwrap();
    assert!(
        matches!(
            consumer.read(0, 10, 1 << 20),
            Err(QueueError::Encryption(_))
        ),
        "never handed out undecrypted"
    );
    without_key.close();
}

fn incarnation_of(dir: &std::path::Path) -> String {
    crate::incarnation::read_incarnation(&dir.join("queue"))
        .unwrap()
        .expect("the queue has an incarnation")
        .incarnation
}

#[tokio::test]
async fn a_queue_keeps_its_incarnation_across_restarts_and_a_replaced_directory_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let first = queue.incarnation().to_string();
    assert!(crate::incarnation::is_valid_incarnation_id(&first));
    assert_eq!(incarnation_of(dir.path()), first, "persisted at creation");
    queue.append(batch_of(&["a".into()])).await.unwrap();
    queue.close();

    let reopened = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(reopened.incarnation(), first, "stable across restarts");
    reopened.close();

    std::fs::remove_dir_all(dir.path().join("queue")).unwrap();
    let replaced = RegionQueue::open(config(dir.path())).unwrap();
    assert_ne!(
        replaced.incarnation(),
        first,
        "offsets restart at 0 in a replaced directory: a new identity names them"
    );
    assert_eq!(replaced.durable_end(), 0);
    replaced.close();
}

#[tokio::test]
async fn a_cursor_of_another_incarnation_redelivers_from_the_oldest_record() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["a".into(), "b".into(), "c".into()]))
        .await
        .unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    consumer.begin(OffsetRange { start: 0, end: 2 }).unwrap();
    consumer.commit(2).unwrap();
    drop(consumer);
    queue.close();
    // The cursor file is copied in from another queue's life.
    let cursor_path = dir.path().join("queue/cursors/archive.cursor");
    let foreign = std::fs::read_to_string(&cursor_path).unwrap().replace(
        &incarnation_of(dir.path()),
        &crate::incarnation::new_incarnation_id(),
    );
    std::fs::write(&cursor_path, foreign).unwrap();

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(
        consumer.state(),
        CursorState {
            next_offset: 0,
            in_flight: None
        },
        "never trusted silently: everything is delivered again"
    );
    assert_eq!(
        payload_strings(&read_all(&mut consumer)),
        vec!["a", "b", "c"]
    );
    let rewritten = std::fs::read_to_string(&cursor_path).unwrap();
    assert!(
        rewritten.contains(queue.incarnation()),
        "the cursor now names this incarnation: {rewritten}"
    );
    queue.close();
}

#[tokio::test]
async fn an_end_that_moved_below_a_sinks_position_mints_a_new_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["a".into(), "b".into(), "c".into(), "d".into()]))
        .await
        .unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    consumer.begin(OffsetRange { start: 0, end: 4 }).unwrap();
    consumer.commit(4).unwrap();
    let before = queue.incarnation().to_string();
    drop(consumer);
    queue.close();
    // The disk lost the last two records after the sink had delivered them.
    let segment = last_segment_path(dir.path());
    let bytes = std::fs::read(&segment).unwrap();
    std::fs::write(
        &segment,
        &bytes[..bytes.len() - 2 * (RECORD_HEADER_BYTES + 1)],
    )
    .unwrap();

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    assert_eq!(queue.durable_end(), 2);
    assert_ne!(
        queue.incarnation(),
        before,
        "offsets 2 and 3 will name new records: they need a new identity"
    );
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(
        consumer.state().next_offset,
        0,
        "redelivers from the oldest"
    );
    assert_eq!(payload_strings(&read_all(&mut consumer)), vec!["a", "b"]);
    queue.close();
}

#[tokio::test]
async fn a_queue_from_before_incarnations_adopts_its_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let queue = RegionQueue::open(config(dir.path())).unwrap();
    queue
        .append(batch_of(&["a".into(), "b".into()]))
        .await
        .unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    consumer.begin(OffsetRange { start: 0, end: 1 }).unwrap();
    consumer.commit(1).unwrap();
    drop(consumer);
    queue.close();
    std::fs::remove_file(dir.path().join("queue/incarnation")).unwrap();
    std::fs::write(
        dir.path().join("queue/cursors/archive.cursor"),
        r#"{"next_offset":1,"in_flight":null}"#,
    )
    .unwrap();

    let queue = RegionQueue::open(config(dir.path())).unwrap();
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(consumer.state().next_offset, 1, "the legacy cursor is kept");
    assert_eq!(payload_strings(&read_all(&mut consumer)), vec!["b"]);
    queue.close();
}

#[tokio::test]
async fn segments_are_kept_for_a_cursor_on_disk_whose_consumer_is_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.segment_max_bytes = 512;
    let queue = RegionQueue::open(queue_config.clone()).unwrap();
    // A previous run had a ClickHouse sink; this run's config briefly lacks it.
    drop(queue.consumer("clickhouse").unwrap());
    queue.close();
    let queue = RegionQueue::open(queue_config).unwrap();
    let mut archive = queue.consumer("archive").unwrap();
    for index in 0..40 {
        queue
            .append(batch_of(&[format!("{index:0>60}")]))
            .await
            .unwrap();
    }
    assert!(queue.stats().segment_count > 4);
    assert_eq!(read_all(&mut archive).len(), 40);
    archive.begin(OffsetRange { start: 0, end: 40 }).unwrap();
    archive.commit(40).unwrap();
    assert_eq!(
        queue.stats().first_offset,
        0,
        "the clickhouse cursor on disk still needs every record"
    );

    // An unreadable cursor file protects everything too.
    let clickhouse_cursor = dir.path().join("queue/cursors/clickhouse.cursor");
    std::fs::remove_file(&clickhouse_cursor).unwrap();
    std::fs::create_dir(&clickhouse_cursor).unwrap();
    archive.begin(OffsetRange { start: 40, end: 40 }).unwrap();
    archive.commit(40).unwrap();
    assert_eq!(queue.stats().first_offset, 0);

    std::fs::remove_dir(&clickhouse_cursor).unwrap();
    archive.begin(OffsetRange { start: 40, end: 40 }).unwrap();
    archive.commit(40).unwrap();
    assert!(
        queue.stats().first_offset > 0,
        "with the cursor gone for good, consumed segments are collected"
    );
    queue.close();
}

#[tokio::test]
async fn buffered_mode_shows_readers_only_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.durability = Durability::Buffered {
        sync_interval: Duration::from_secs(3600),
    };
    let queue = RegionQueue::open(queue_config).unwrap();
    let range = queue.append(batch_of(&["a".into()])).await.unwrap();
    assert_eq!(range, OffsetRange { start: 0, end: 1 });
    assert_eq!(
        queue.durable_end(),
        0,
        "written but not synced: no reader may deliver it yet"
    );
    let mut consumer = queue.consumer("archive").unwrap();
    assert!(consumer.read(0, 10, 1 << 20).unwrap().is_empty());
    queue.close();
    assert_eq!(queue.durable_end(), 1, "closing syncs and publishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_syncs_on_its_interval_under_continuous_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    let interval = Duration::from_millis(50);
    queue_config.durability = Durability::Buffered {
        sync_interval: interval,
    };
    let queue = RegionQueue::open(queue_config).unwrap();
    let load_queue = queue.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_stop = std::sync::Arc::clone(&stop);
    // Appends back to back: the writer's channel never goes quiet for a whole interval.
    let load = tokio::spawn(async move {
        let mut appended = 0u64;
        while !load_stop.load(std::sync::atomic::Ordering::Relaxed) {
            load_queue
                .append(batch_of(&[format!("record {appended}")]))
                .await
                .unwrap();
            appended += 1;
        }
        appended
    });
    let mut end = queue.subscribe_durable_end();
    let load_duration = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let mut published_ends = Vec::new();
    while started.elapsed() < load_duration {
        if tokio::time::timeout(load_duration, end.changed())
            .await
            .is_ok()
        {
            published_ends.push(*end.borrow_and_update());
        }
    }
    let syncs_during_load = queue.stats().sync_count;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let appended = load.await.unwrap();
    assert!(appended > 100, "the load kept appending: {appended}");
    // 1 s at a 50 ms interval is 20 syncs; a busy machine may stretch some of them.
    assert!(
        syncs_during_load >= 5,
        "only {syncs_during_load} syncs in 1 s of continuous appends at a 50 ms interval"
    );
    assert!(
        published_ends.len() >= 5 && published_ends.windows(2).all(|pair| pair[0] < pair[1]),
        "readers saw the synced end advance while the load ran: {published_ends:?}"
    );
    queue.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The stall guard is held across awaits on purpose: it stands for a disk that does not answer,
// and only the writer thread (never this task) waits for it.
#[allow(clippy::await_holding_lock)]
async fn an_abandoned_append_keeps_its_bytes_until_the_writer_drops_it_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue_config = config(dir.path());
    queue_config.max_in_flight_bytes = 64 * 1024;
    let queue = RegionQueue::open(queue_config).unwrap();
    let payload = "x".repeat(20 * 1024);
    let stall = queue.stall_writer(); // the disk stalls
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        queue.append(batch_of(std::slice::from_ref(&payload))),
    )
    .await;
    assert!(abandoned.is_err(), "the caller gave up waiting");
    let charged = 64 * 1024 - queue.in_flight_bytes_available();
    assert!(
        charged >= 20 * 1024,
        "the request still waits for the writer, so its bytes still count: {charged}"
    );
    // More requests cannot pile up past the in-flight budget while the disk stalls.
    let mut given_up = 0;
    for _ in 0..4 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(50),
            queue.append(batch_of(std::slice::from_ref(&payload))),
        )
        .await;
        given_up += usize::from(attempt.is_err());
    }
    assert_eq!(given_up, 4);
    assert!(
        queue.in_flight_bytes_available() < 20 * 1024,
        "budget held by waiting requests"
    );

    drop(stall); // the disk recovers
    let written = queue.append(batch_of(&["kept".to_string()])).await.unwrap();
    assert_eq!(
        written,
        OffsetRange { start: 0, end: 1 },
        "nothing nobody waited for was written"
    );
    // The first and two more fit the 64 KiB budget (20 KiB each); the last two never got in.
    assert_eq!(queue.stats().abandoned_appends, 3, "{:?}", queue.stats());
    assert_eq!(
        queue.in_flight_bytes_available(),
        64 * 1024,
        "every byte is back"
    );
    let mut consumer = queue.consumer("archive").unwrap();
    assert_eq!(payload_strings(&read_all(&mut consumer)), vec!["kept"]);
    queue.close();
}

#[test]
fn a_batch_keeping_identities_hands_out_each_stored_payload_with_its_identity() {
    let mut batch = RecordBatch::keeping_identities(None);
    batch.push_identified(b"first", "prj_a", "m-1").unwrap();
    batch.push_identified(b"", "prj_a", "m-2").unwrap();
    batch
        .push_identified(b"third record", "prj_b", "m-3")
        .unwrap();
    let payloads: Vec<&[u8]> = batch.stored_payloads().collect();
    assert_eq!(
        payloads,
        vec![&b"first"[..], &b""[..], &b"third record"[..]]
    );
    assert_eq!(
        batch.identities().unwrap(),
        &["prj_a:m-1", "prj_a:m-2", "prj_b:m-3"]
    );
    // The local log's batches keep no identities (nothing allocated for them).
    let mut local = RecordBatch::default();
    local.push_identified(b"x", "prj_a", "m-1").unwrap();
    assert!(local.identities().is_none());
    assert_eq!(local.stored_payloads().count(), 1);
}
