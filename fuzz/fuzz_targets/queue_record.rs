//! The queue's record decoder on corrupted segments: never panics, and never yields a record that
//! was not written — every record it returns is the one written at that position, and decoding
//! stops at the first damaged record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_queue::segment::{NextRecord, encode_record, read_record};

fuzz_target!(|data: &[u8]| {
    // The first half, split on 0xFF, is what gets written; the second half damages it.
    let (written, damage) = data.split_at(data.len() / 2);
    let payloads: Vec<&[u8]> = written.split(|byte| *byte == 0xFF).collect();
    let mut segment = Vec::new();
    for payload in &payloads {
        encode_record(payload, &mut segment);
    }
    for pair in damage.chunks(3) {
        match pair {
            [0, position, _] if !segment.is_empty() => {
                let cut = (*position as usize) % segment.len();
                segment.truncate(cut);
            }
            [position_high, position_low, flip] if !segment.is_empty() => {
                let position = (usize::from(*position_high) << 8 | usize::from(*position_low)) % segment.len();
                segment[position] ^= flip;
            }
            [extra] => segment.push(*extra),
            _ => {}
        }
    }
    let mut reader = &segment[..];
    let mut index = 0;
    while let Ok(NextRecord::Record(payload)) = read_record(&mut reader) {
        assert!(index < payloads.len(), "a record was decoded that was never written");
        assert_eq!(payload, payloads[index], "record {index} differs from what was written");
        index += 1;
    }
});
