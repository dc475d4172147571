//! The queue's segment scanner on damaged segments. Both halves of its promise:
//! - it never panics and never yields a record that was not written at that offset;
//! - every intact record (one whose bytes the damage did not touch) is yielded, at its own offset,
//!   however much damage lies before it.
//!
//! Payloads here hold no NUL byte, as in the queue (JSON text; serde_json escapes control
//! characters): every length and offset field has one, so no frame can hide inside a payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_queue::segment::{
    SEGMENT_HEADER_BYTES, SEGMENT_MAGIC, SegmentFormat, encode_record, scan_records,
    stamp_offsets,
};

const BASE_OFFSET: u64 = 1_000;

fuzz_target!(|data: &[u8]| {
    // The first half, split on 0xFF, is what gets written; the second half damages it.
    let (written, damage) = data.split_at(data.len() / 2);
    let payloads: Vec<Vec<u8>> = written
        .split(|byte| *byte == 0xFF)
        .map(|payload| payload.iter().map(|byte| (*byte).max(1)).collect())
        .collect();
    let mut segment = Vec::new();
    segment.extend_from_slice(SEGMENT_MAGIC);
    segment.extend_from_slice(&BASE_OFFSET.to_le_bytes());
    let mut frames = Vec::new();
    let mut records = Vec::new();
    for payload in &payloads {
        let start = SEGMENT_HEADER_BYTES as usize + records.len();
        encode_record(payload, &mut records);
        frames.push(start..SEGMENT_HEADER_BYTES as usize + records.len());
    }
    stamp_offsets(&mut records, BASE_OFFSET);
    segment.extend_from_slice(&records);
    // Damage only the records, not the segment header (recovery rebuilds a header on its own).
    let header = SEGMENT_HEADER_BYTES as usize;
    let mut touched = vec![false; segment.len()];
    for op in damage.chunks(3) {
        let records_length = segment.len() - header;
        match op {
            [0, position, _] if records_length > 0 => {
                let cut = header + (*position as usize) % records_length;
                segment.truncate(cut);
                touched.truncate(cut);
            }
            [position_high, position_low, flip] if records_length > 0 && *flip != 0 => {
                let position = header
                    + (usize::from(*position_high) << 8 | usize::from(*position_low))
                        % records_length;
                segment[position] ^= flip;
                touched[position] = true;
            }
            [extra] => {
                segment.push(*extra);
                touched.push(true);
            }
            _ => {}
        }
    }
    let mut yielded = Vec::new();
    let scan = scan_records(&segment[..], BASE_OFFSET, SegmentFormat::Numbered, |offset, payload| {
        yielded.push((offset, payload.to_vec()))
    })
    .expect("scanning memory cannot fail");
    let mut previous: Option<u64> = None;
    for (offset, payload) in &yielded {
        let index = offset
            .checked_sub(BASE_OFFSET)
            .map(|index| index as usize)
            .filter(|index| *index < payloads.len())
            .unwrap_or_else(|| panic!("offset {offset} was never written"));
        assert_eq!(payload, &payloads[index], "record {offset} differs from what was written");
        assert!(previous.is_none_or(|previous| previous < *offset), "offsets ascend");
        previous = Some(*offset);
    }
    for (index, frame) in frames.iter().enumerate() {
        let intact = frame.end <= segment.len() && !touched[frame.clone()].iter().any(|t| *t);
        if intact {
            let offset = BASE_OFFSET + index as u64;
            assert!(
                yielded.iter().any(|(yielded_offset, _)| *yielded_offset == offset),
                "intact record {offset} was not yielded (scan: {scan:?})"
            );
        }
    }
});
