//! A message object split into its top-level fields, each value kept as its JSON text.
//!
//! Enrichment reads and replaces a handful of top-level fields. Parsing the whole message into a
//! `Map` and serializing it again cost an allocation per key and per string and a float format per
//! number; here the nested values (`properties`, `context`, ...) are validated exactly as a
//! `serde_json::Value` parse would validate them, and then copied through as text.
//!
//! What a reader of the stored JSON sees is the same as before: the same top-level keys in the same
//! (sorted) order, one entry per key (the last of duplicates, as `serde_json` keeps), the same
//! values. Only the text of nested values is the client's own (its key order, its number
//! spelling), minus line breaks and tabs, so that a stored message stays on one line.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A top-level key: borrowed from the text when it has no escapes, else unescaped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct FieldKey<'a>(pub(crate) Cow<'a, str>);

impl FieldKey<'_> {
    /// Whether the key can be written back between quotes as it is. A key borrowed from valid
    /// JSON had no escape sequence, so it holds no quote, backslash or control character.
    fn is_plain(&self) -> bool {
        matches!(self.0, Cow::Borrowed(_))
    }
}

impl<'de> Deserialize<'de> for FieldKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = FieldKey<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string key")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                key: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(FieldKey(Cow::Borrowed(key)))
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
                Ok(FieldKey(Cow::Owned(key.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, key: String) -> Result<Self::Value, E> {
                Ok(FieldKey(Cow::Owned(key)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

/// One top-level field: its key and the JSON text of its value.
#[derive(Clone, Debug)]
pub(crate) struct RawField<'a> {
    pub(crate) key: FieldKey<'a>,
    pub(crate) value: &'a RawValue,
}

/// A message object as its top-level fields, sorted by key, one per key.
#[derive(Clone, Debug)]
pub struct RawMessage<'a> {
    fields: Vec<RawField<'a>>,
}

/// The JSON type of a raw value, read from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonType {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

pub(crate) fn json_type(value: &RawValue) -> JsonType {
    match value.get().as_bytes().first() {
        Some(b'n') => JsonType::Null,
        Some(b't' | b'f') => JsonType::Bool,
        Some(b'"') => JsonType::String,
        Some(b'[') => JsonType::Array,
        Some(b'{') => JsonType::Object,
        // A raw value is valid JSON without leading whitespace: anything else is a number.
        _ => JsonType::Number,
    }
}

impl<'a> RawMessage<'a> {
    /// Parses a message's JSON text. Fails like parsing it into a `serde_json::Map` fails: a
    /// syntax error, a number out of range or nesting past serde_json's recursion limit is a
    /// syntax error; valid JSON that is not an object is a data error.
    pub fn parse(text: &'a [u8]) -> Result<RawMessage<'a>, serde_json::Error> {
        match std::str::from_utf8(text) {
            Ok(text) => RawMessage::parse_str(text),
            // Let serde_json say where and why, as a parse of the bytes would.
            Err(_) => match serde_json::from_slice::<ValidJson>(text) {
                Err(error) => Err(error),
                Ok(ValidJson) => Err(serde::de::Error::custom("the text is not UTF-8")),
            },
        }
    }

    /// [`RawMessage::parse`] of text already known to be UTF-8, which serde_json then does not
    /// check again for every string and raw value.
    pub fn parse_str(text: &'a str) -> Result<RawMessage<'a>, serde_json::Error> {
        // Pass 1 checks the whole text as a `Value` parse would, allocating nothing.
        serde_json::from_str::<ValidJson>(text)?;
        // Pass 2 splits the object into its fields, borrowing every value's text.
        let FieldList(mut fields) = serde_json::from_str::<FieldList<'a>>(text)?;
        // The stable sort keeps duplicates in text order: the last of each run is the one kept.
        fields.sort_by(|left, right| left.key.cmp(&right.key));
        let mut kept: Vec<RawField<'a>> = Vec::with_capacity(fields.len());
        for field in fields {
            match kept.last_mut() {
                Some(previous) if previous.key == field.key => *previous = field,
                _ => kept.push(field),
            }
        }
        debug_assert!(kept.windows(2).all(|pair| pair[0].key < pair[1].key));
        Ok(RawMessage { fields: kept })
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .binary_search_by(|field| field.key.0.as_ref().cmp(key))
            .ok()
            .map(|index| self.fields[index].value)
    }

    /// The field's value when it is a non-empty JSON string.
    pub fn non_empty_string(&self, key: &str) -> Option<String> {
        let value = self.get(key)?;
        if json_type(value) != JsonType::String {
            return None;
        }
        serde_json::from_str::<String>(value.get())
            .ok()
            .filter(|text| !text.is_empty())
    }

    pub(crate) fn into_fields(self) -> Vec<RawField<'a>> {
        self.fields
    }
}

/// The top-level object's fields in text order, duplicates included.
struct FieldList<'a>(Vec<RawField<'a>>);

impl<'de> Deserialize<'de> for FieldList<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = FieldList<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16).min(64));
                while let Some((key, value)) = map.next_entry::<FieldKey<'de>, &'de RawValue>()? {
                    fields.push(RawField { key, value });
                }
                Ok(FieldList(fields))
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Accepts exactly the JSON a `serde_json::Value` parse accepts, building nothing: numbers are
/// parsed (so one out of f64 range fails), strings are unescaped only into serde_json's scratch
/// buffer, and nesting counts against serde_json's own recursion limit.
struct ValidJson;

impl<'de> Deserialize<'de> for ValidJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValidJsonVisitor)
    }
}

impl<'de> DeserializeSeed<'de> for ValidJsonVisitor {
    type Value = ValidJson;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<ValidJson, D::Error> {
        deserializer.deserialize_any(self)
    }
}

struct ValidJsonVisitor;

impl<'de> Visitor<'de> for ValidJsonVisitor {
    type Value = ValidJson;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_i64<E>(self, _: i64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_u64<E>(self, _: u64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_f64<E>(self, _: f64) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_str<E>(self, _: &str) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_unit<E>(self) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_none<E>(self) -> Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<ValidJson, A::Error> {
        while sequence.next_element_seed(ValidJsonVisitor)?.is_some() {}
        Ok(ValidJson)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValidJson, A::Error> {
        while map.next_key_seed(ValidJsonVisitor)?.is_some() {
            map.next_value_seed(ValidJsonVisitor)?;
        }
        Ok(ValidJson)
    }
}

/// Builds the stored document: the message's fields, some replaced, some added, in key order.
pub(crate) struct StoredDocument<'a> {
    /// Sorted by key, one per key.
    entries: Vec<(FieldKey<'a>, Cow<'a, str>)>,
}

impl<'a> StoredDocument<'a> {
    pub(crate) fn from_fields(fields: Vec<RawField<'a>>) -> StoredDocument<'a> {
        let entries = fields
            .into_iter()
            .map(|field| (field.key, Cow::Borrowed(field.value.get())))
            .collect();
        StoredDocument { entries }
    }

    /// Sets `key` to the JSON text `value`, replacing what the message had.
    pub(crate) fn set(&mut self, key: &'static str, value: Cow<'a, str>) {
        match self.position(key) {
            Ok(index) => self.entries[index].1 = value,
            Err(index) => self
                .entries
                .insert(index, (FieldKey(Cow::Borrowed(key)), value)),
        }
    }

    /// Sets `key` to a JSON string holding `text`.
    pub(crate) fn set_string(&mut self, key: &'static str, text: &str) {
        self.set(key, Cow::Owned(json_string(text)));
    }

    pub(crate) fn remove(&mut self, key: &str) {
        if let Ok(index) = self.position(key) {
            self.entries.remove(index);
        }
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|(entry_key, _)| entry_key.0.as_ref().cmp(key))
    }

    /// The document's JSON text, on one line.
    pub(crate) fn into_json(self) -> Vec<u8> {
        let capacity = self
            .entries
            .iter()
            .map(|(key, value)| key.0.len() + value.len() + 4)
            .sum::<usize>()
            + 2;
        let mut json = Vec::with_capacity(capacity);
        json.push(b'{');
        for (index, (key, value)) in self.entries.iter().enumerate() {
            if index > 0 {
                json.push(b',');
            }
            if key.is_plain() {
                json.push(b'"');
                json.extend_from_slice(key.0.as_bytes());
                json.push(b'"');
            } else {
                json.extend_from_slice(json_string(&key.0).as_bytes());
            }
            json.push(b':');
            append_on_one_line(&mut json, value);
        }
        json.push(b'}');
        json
    }
}

/// A JSON string literal holding `text`.
pub(crate) fn json_string(text: &str) -> String {
    // Serializing a str cannot fail; the fallback keeps the document valid regardless.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// Appends valid JSON text without its line breaks and tabs. In valid JSON those bytes only occur
/// as whitespace between tokens (inside strings they must be escaped), so dropping them keeps the
/// value and its meaning.
fn append_on_one_line(json: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .any(|byte| matches!(byte, b'\n' | b'\r' | b'\t'))
    {
        json.extend_from_slice(bytes);
        return;
    }
    json.extend(
        bytes
            .iter()
            .copied()
            .filter(|byte| !matches!(byte, b'\n' | b'\r' | b'\t')),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sorts_and_keeps_the_last_of_duplicate_keys() {
        let message =
            RawMessage::parse(br#"{"b": [1, 2], "a\u0041": "x", "b": {"c": 1}, "a": null}"#)
                .unwrap();
        let keys: Vec<&str> = message
            .fields
            .iter()
            .map(|field| field.key.0.as_ref())
            .collect();
        assert_eq!(keys, ["a", "aA", "b"]);
        assert_eq!(message.get("b").unwrap().get(), r#"{"c": 1}"#);
        assert_eq!(json_type(message.get("a").unwrap()), JsonType::Null);
        assert!(
            !message.fields[1].key.is_plain(),
            "an escaped key is rewritten"
        );
    }

    #[test]
    fn refuses_what_a_value_parse_refuses_with_the_same_category() {
        use serde_json::error::Category;
        for (text, category) in [
            (&b"[1, 2]"[..], Category::Data),
            (b"\"text\"", Category::Data),
            (b"{\"a\": 1e400}", Category::Syntax),
            (b"{\"a\": [1,]}", Category::Syntax),
            (b"{\"a\": \"\xff\"}", Category::Syntax),
            (b"{\"a\": 1} x", Category::Syntax),
            (b"{\"a\": ", Category::Eof),
        ] {
            let expected =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(text)
                    .unwrap_err()
                    .classify();
            assert_eq!(expected, category, "{}", String::from_utf8_lossy(text));
            let error = RawMessage::parse(text).unwrap_err();
            assert_eq!(
                error.classify(),
                category,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        let nested =
            |depth: usize| format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        for depth in [125, 126, 127, 200] {
            let text = nested(depth);
            let by_value = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            assert_eq!(
                RawMessage::parse(text.as_bytes()).is_ok(),
                by_value,
                "depth {depth}"
            );
        }
        assert!(RawMessage::parse(nested(126).as_bytes()).is_ok());
        assert!(RawMessage::parse(nested(127).as_bytes()).is_err());
    }

    #[test]
    fn writes_sorted_entries_on_one_line() {
        let message = RawMessage::parse(
            b"{\"z\": {\n\t\"deep\": \"a b\"\r\n}, \"a\\\"q\": 1, \"writeKey\": \"k\"}",
        )
        .unwrap();
        let mut document = StoredDocument::from_fields(message.into_fields());
        document.remove("writeKey");
        document.set_string("m", "quote\"d");
        let json = String::from_utf8(document.into_json()).unwrap();
        assert_eq!(json, r#"{"a\"q":1,"m":"quote\"d","z":{"deep": "a b"}}"#);
    }
}
