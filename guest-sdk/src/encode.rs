//! Encoding one variant of an enum as its name and JSON payload — how the
//! SDK turns an event value into an event type and data.
//!
//! A [`VariantSerializer`] takes the place of a JSON serializer for the
//! enum: it keeps the variant's name and writes only the variant's content
//! as JSON, fields in declaration order. Anything that is not an enum
//! variant is an error.

use serde::Serialize;
use serde::ser::{self, Impossible, SerializeStructVariant, SerializeTupleVariant, Serializer};

/// Splits `value`, one variant of an enum, into the variant's name and its
/// content as JSON: the fields as an object for a struct variant, the inner
/// value for a newtype variant, an array for a tuple variant, and `{}` for
/// a unit variant.
pub(crate) fn encode_variant<T: Serialize + ?Sized>(
    value: &T,
) -> Result<(&'static str, Vec<u8>), serde_json::Error> {
    value.serialize(VariantSerializer)
}

/// See the module's documentation.
struct VariantSerializer;

/// Writes a JSON object or array field by field.
struct Compound {
    name: &'static str,
    out: Vec<u8>,
    first: bool,
}

impl Compound {
    fn open(name: &'static str, bracket: u8) -> Self {
        Compound {
            name,
            out: vec![bracket],
            first: true,
        }
    }

    fn separate(&mut self) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
    }

    fn close(mut self, bracket: u8) -> (&'static str, Vec<u8>) {
        self.out.push(bracket);
        (self.name, self.out)
    }
}

impl SerializeStructVariant for Compound {
    type Ok = (&'static str, Vec<u8>);
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        self.separate();
        serde_json::to_writer(&mut self.out, key)?;
        self.out.push(b':');
        serde_json::to_writer(&mut self.out, value)
    }

    fn end(self) -> Result<Self::Ok, Self::Error> {
        Ok(self.close(b'}'))
    }
}

impl SerializeTupleVariant for Compound {
    type Ok = (&'static str, Vec<u8>);
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.separate();
        serde_json::to_writer(&mut self.out, value)
    }

    fn end(self) -> Result<Self::Ok, Self::Error> {
        Ok(self.close(b']'))
    }
}

/// The error for anything but an enum variant.
fn not_a_variant<T>() -> Result<T, serde_json::Error> {
    Err(ser::Error::custom(
        "expected a variant of a plain enum (derive Serialize on an enum without `tag`/`untagged`)",
    ))
}

type Never = Impossible<(&'static str, Vec<u8>), serde_json::Error>;

impl Serializer for VariantSerializer {
    type Ok = (&'static str, Vec<u8>);
    type Error = serde_json::Error;
    type SerializeSeq = Never;
    type SerializeTuple = Never;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Compound;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Compound;

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok, Self::Error> {
        Ok((variant, b"{}".to_vec()))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok, Self::Error> {
        Ok((variant, serde_json::to_vec(value)?))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound, Self::Error> {
        Ok(Compound::open(variant, b'['))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound, Self::Error> {
        Ok(Compound::open(variant, b'{'))
    }

    fn serialize_bool(self, _: bool) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_i8(self, _: i8) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_i16(self, _: i16) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_i32(self, _: i32) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_i64(self, _: i64) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_u8(self, _: u8) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_u16(self, _: u16) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_u32(self, _: u32) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_u64(self, _: u64) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_f32(self, _: f32) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_f64(self, _: f64) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_char(self, _: char) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_str(self, _: &str) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_none(self) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_unit(self) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<Self::Ok, Self::Error> {
        not_a_variant()
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Never, Self::Error> {
        not_a_variant()
    }
    fn serialize_tuple(self, _: usize) -> Result<Never, Self::Error> {
        not_a_variant()
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Never, Self::Error> {
        not_a_variant()
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Never, Self::Error> {
        not_a_variant()
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Never, Self::Error> {
        not_a_variant()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    enum Event {
        Moved {
            to: String,
            by: u32,
        },
        Noted(Note),
        Pair(u8, bool),
        Stopped,
        #[serde(rename = "Renamed")]
        Old {
            #[serde(skip_serializing_if = "Option::is_none")]
            why: Option<String>,
            n: u8,
        },
    }

    #[derive(Serialize)]
    struct Note {
        text: String,
    }

    fn encoded(event: &Event) -> (&'static str, String) {
        let (name, data) = encode_variant(event).unwrap();
        (name, String::from_utf8(data).unwrap())
    }

    #[test]
    fn encodes_each_kind_of_variant_in_field_order() {
        let moved = Event::Moved {
            to: "a\"b".into(),
            by: 2,
        };
        assert_eq!(encoded(&moved), ("Moved", r#"{"to":"a\"b","by":2}"#.into()));
        let noted = Event::Noted(Note { text: "hi".into() });
        assert_eq!(encoded(&noted), ("Noted", r#"{"text":"hi"}"#.into()));
        assert_eq!(encoded(&Event::Pair(1, true)), ("Pair", "[1,true]".into()));
        assert_eq!(encoded(&Event::Stopped), ("Stopped", "{}".into()));
        let old = Event::Old { why: None, n: 3 };
        assert_eq!(encoded(&old), ("Renamed", r#"{"n":3}"#.into()));
    }

    #[test]
    fn refuses_what_is_not_a_variant() {
        assert!(encode_variant(&5u32).is_err());
        assert!(encode_variant(&Note { text: "x".into() }).is_err());
        assert!(encode_variant("Moved").is_err());
    }
}
