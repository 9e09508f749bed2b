//! JSON encoding between the bytes the host passes and the plugin's Rust
//! types: an enum variant chosen by name (commands and events), the list of
//! an enum's variant names, and readable field errors.
//!
//! Commands and events travel as a name plus a JSON payload rather than as
//! one tagged JSON value. [`decode_variant`] presents such a pair to a
//! derived `Deserialize` as an externally tagged enum;
//! [`encode_variant`](crate::encode::encode_variant) does the reverse.

use std::cell::Cell;
use std::fmt::Write as _;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer,
    VariantAccess, Visitor,
};
use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use crate::FieldError;

/// The serialized variant names of enum `T`, read from its derived
/// `Deserialize`; `None` when `T` is not a plain (externally tagged) enum.
pub(crate) fn variant_names<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let found = Cell::new(None);
    // Always an error: the probe stops as soon as it has the names.
    let _ = T::deserialize(VariantNames(&found));
    found.get()
}

/// A deserializer that records the variant list a derived enum passes to
/// `deserialize_enum`, and fails.
struct VariantNames<'a>(&'a Cell<Option<&'static [&'static str]>>);

impl<'de> Deserializer<'de> for VariantNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not an enum"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(Some(variants));
        Err(de::Error::custom("variant names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// Why a (name, data) pair did not decode.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// The enum has no variant of that name.
    UnknownVariant,
    /// The data does not fit the variant.
    Invalid(FieldError),
}

/// Parses a JSON payload; empty (or blank) bytes read as `{}`.
pub(crate) fn parse_payload(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Object(Map::new()))
    } else {
        serde_json::from_slice(bytes)
    }
}

/// Deserializes the variant `name` of enum `T` from `data`.
pub(crate) fn decode_variant<T: DeserializeOwned>(
    name: &str,
    data: Value,
) -> Result<T, DecodeError> {
    let unknown = Cell::new(false);
    let named = Named {
        name,
        payload: Payload(data),
        unknown: &unknown,
    };
    serde_path_to_error::deserialize(named).map_err(|err| {
        if unknown.get() {
            return DecodeError::UnknownVariant;
        }
        let path = field_path(err.path());
        DecodeError::Invalid(field_error(path, err.into_inner().to_string()))
    })
}

/// Deserializes the variant `name` of enum `T` straight from the JSON bytes
/// `data`: no intermediate [`Value`] and no field path kept. This is the
/// quick way for data that reads, which is all of it when an aggregate is
/// rebuilt. `None` when the data does not read (or is blank): then
/// [`parse_payload`] and [`decode_variant`] decode it again and say why
/// (or, for the odd data only they take, such as a repeated key, decode
/// it). Whatever it decodes, they decode to the same value.
pub(crate) fn decode_variant_from_slice<T: DeserializeOwned>(name: &str, data: &[u8]) -> Option<T> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(data);
    let named = Named {
        name,
        payload: SlicePayload(&mut de),
        unknown: &Cell::new(false),
    };
    let value = T::deserialize(named).ok()?;
    de.end().ok()?;
    Some(value)
}

/// The unparsed payload of the chosen variant.
struct SlicePayload<'d, 'de>(&'d mut serde_json::Deserializer<serde_json::de::SliceRead<'de>>);

impl<'de> VariantAccess<'de> for SlicePayload<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        // As [`Payload::unit_variant`]: any object, or null.
        self.0.deserialize_any(UnitPayload)
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_seq(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_map(visitor)
    }
}

/// Accepts what a unit variant's payload may be: an object, whatever it
/// holds, or null.
struct UnitPayload;

impl<'de> Visitor<'de> for UnitPayload {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<M: de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(())
    }
}

/// A readable field path: `amount`, `address.city`, `lines[2].qty`.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            // The enum segment is the command itself, not a field.
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// Turns serde's message at `path` into a field error, moving the name of
/// a missing or unknown field from the message into the path.
fn field_error(path: String, message: String) -> FieldError {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(name) = quoted_after(&message, "missing field `") {
        return FieldError::new(join(name), "is required");
    }
    if let Some(name) = quoted_after(&message, "unknown field `") {
        return FieldError::new(join(name), "is not a known field");
    }
    FieldError::new(path, message)
}

/// The text between `prefix` (which ends with a backquote) and the next
/// backquote, if `message` starts with `prefix`.
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

/// A (variant name, payload) pair seen as an externally tagged enum. The
/// payload is a parsed [`Value`] ([`Payload`]) or JSON still to be parsed
/// ([`SlicePayload`]).
struct Named<'a, P> {
    name: &'a str,
    payload: P,
    /// Set when the enum has no variant called `name`.
    unknown: &'a Cell<bool>,
}

impl<'de, P: VariantAccess<'de, Error = serde_json::Error>> Deserializer<'de> for Named<'_, P> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, P: VariantAccess<'de, Error = serde_json::Error>> EnumAccess<'de> for Named<'_, P> {
    type Error = serde_json::Error;
    type Variant = P;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, P), Self::Error> {
        let name: de::value::StrDeserializer<'_, serde_json::Error> = self.name.into_deserializer();
        match seed.deserialize(name) {
            Ok(variant) => Ok((variant, self.payload)),
            Err(err) => {
                self.unknown.set(true);
                Err(err)
            }
        }
    }
}

/// The payload of the chosen variant.
struct Payload(Value);

impl<'de> VariantAccess<'de> for Payload {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        match self.0 {
            Value::Object(_) | Value::Null => Ok(()),
            _ => Err(de::Error::custom("expected a JSON object")),
        }
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_seq(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_map(visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Cmd {
        Put { key: String, qty: u32 },
        Nested(Inner),
        Stop,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Inner {
        lines: Vec<Line>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Line {
        qty: u32,
    }

    fn invalid(result: Result<Cmd, DecodeError>) -> FieldError {
        match result {
            Err(DecodeError::Invalid(error)) => error,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn lists_variant_names() {
        assert_eq!(variant_names::<Cmd>(), Some(&["put", "nested", "stop"][..]));
        assert_eq!(variant_names::<Inner>(), None);
        assert_eq!(variant_names::<String>(), None);
    }

    #[test]
    fn decodes_each_kind_of_variant() {
        let put = decode_variant::<Cmd>("put", json!({"key": "a", "qty": 2})).unwrap();
        assert_eq!(
            put,
            Cmd::Put {
                key: "a".into(),
                qty: 2
            }
        );
        let nested = decode_variant::<Cmd>("nested", json!({"lines": [{"qty": 1}]})).unwrap();
        assert_eq!(
            nested,
            Cmd::Nested(Inner {
                lines: vec![Line { qty: 1 }]
            })
        );
        assert_eq!(decode_variant::<Cmd>("stop", json!({})).unwrap(), Cmd::Stop);
        assert_eq!(
            decode_variant::<Cmd>("stop", json!({"x": 1})).unwrap(),
            Cmd::Stop
        );
    }

    #[test]
    fn names_the_failing_field() {
        let e = invalid(decode_variant("put", json!({"key": "a"})));
        assert_eq!(e, FieldError::new("qty", "is required"));
        let e = invalid(decode_variant("put", json!({"key": "a", "qty": "many"})));
        assert_eq!(e.field, "qty");
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = invalid(decode_variant(
            "nested",
            json!({"lines": [{"qty": 1}, {"qty": -1}]}),
        ));
        assert_eq!(e.field, "lines[1].qty");
        let e = invalid(decode_variant("nested", json!({"lines": [{}]})));
        assert_eq!(e, FieldError::new("lines[0].qty", "is required"));
        let e = invalid(decode_variant("stop", json!([1])));
        assert_eq!(e.field, "");
    }

    #[test]
    fn reports_unknown_variants() {
        let result = decode_variant::<Cmd>("jump", json!({}));
        assert!(matches!(result, Err(DecodeError::UnknownVariant)));
    }

    /// Whatever the quick decoding gives, the full one gives too; what it
    /// leaves, the full one decodes or refuses.
    #[test]
    fn decoding_from_the_slice_agrees_with_the_value_route() {
        let cases: &[(&str, &[u8])] = &[
            ("put", br#"{"key": "a", "qty": 2}"#),
            ("put", br#"{"qty": 2, "key": "a"}"#),
            (
                "put",
                br#"{"key": "a", "qty": 2, "extra": [1, {"x": null}]}"#,
            ),
            ("put", br#"{"key": "a"}"#),
            ("put", br#"{"key": "a", "qty": "many"}"#),
            ("put", br#"{"key": "a", "qty": -1}"#),
            ("put", br#"[ "a", 2 ]"#),
            ("put", br#"{"key": "a", "qty": 2} x"#),
            ("put", br#"{"key": "a", "qty": 2"#),
            ("nested", br#"{"lines": [{"qty": 1}, {"qty": 3}]}"#),
            ("nested", br#"{"lines": [{}]}"#),
            ("stop", b"{}"),
            ("stop", br#"{"x": {"y": [1, 2]}}"#),
            ("stop", b"null"),
            ("stop", b"[1]"),
            ("stop", b"7"),
            ("jump", b"{}"),
            ("stop", b""),
            ("stop", b"  "),
            ("put", br#"{"key": "a", "qty": 1, "qty": 2}"#),
        ];
        for (name, data) in cases {
            let full = parse_payload(data)
                .ok()
                .and_then(|value| decode_variant::<Cmd>(name, value).ok());
            let quick = decode_variant_from_slice::<Cmd>(name, data);
            let blank = data.iter().all(u8::is_ascii_whitespace);
            let shown = String::from_utf8_lossy(data);
            if blank {
                assert_eq!(quick, None, "blank data is left to the full route");
                assert_eq!(full, Some(Cmd::Stop));
            } else if quick.is_some() {
                assert_eq!(quick, full, "{name} {shown}");
            } else {
                assert!(
                    full.is_none() || shown.contains(r#""qty": 1, "qty""#),
                    "only a repeated key is left to the full route: {name} {shown}"
                );
            }
        }
    }

    #[test]
    fn blank_payload_is_an_empty_object() {
        assert_eq!(parse_payload(b"").unwrap(), json!({}));
        assert_eq!(parse_payload(b" \n").unwrap(), json!({}));
        assert!(parse_payload(b"{").is_err());
    }
}
