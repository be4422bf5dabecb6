//! Refusing non-finite floats before they are stored: JSON has no NaN or infinity,
//! and `serde_json` writes them as `null`, so a step returning `f64::NAN` would store
//! a value that no longer deserializes (or silently means "absent"). [`check`] walks
//! a value through its `Serialize` implementation without writing anything and
//! reports the path of the first non-finite float.

use std::fmt;

use serde::ser::{self, Serialize};

/// Why the walk stopped.
#[derive(Debug)]
pub(crate) enum NotFinite {
    /// A non-finite float, with where and what.
    Float(String),
    /// Another error of the value's own `Serialize`: the JSON serializer reports it
    /// later with its own words; the check only looks for floats.
    Other,
}

impl fmt::Display for NotFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Float(m) => f.write_str(m),
            Self::Other => f.write_str("the value does not serialize"),
        }
    }
}

impl std::error::Error for NotFinite {}

impl ser::Error for NotFinite {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Self::Other
    }
}

/// Checks that `value` holds no NaN or infinite float; the error names where
/// (`.scores[2]`) and what.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NotFinite> {
    match value.serialize(Checker {
        path: String::new(),
    }) {
        Err(NotFinite::Other) => Ok(()),
        other => other,
    }
}

struct Checker {
    path: String,
}

impl Checker {
    fn float(&self, v: f64) -> Result<(), NotFinite> {
        if v.is_finite() {
            Ok(())
        } else {
            let at = if self.path.is_empty() {
                "the value"
            } else {
                &self.path
            };
            Err(NotFinite::Float(format!(
                "{v} at {at} cannot be stored: JSON has no NaN or infinity (it would be stored as null)"
            )))
        }
    }

    fn child(&self, segment: fmt::Arguments<'_>) -> Checker {
        Checker {
            path: format!("{}{segment}", self.path),
        }
    }
}

/// Walks the elements of a sequence, tuple, map or struct.
struct Compound {
    path: String,
    index: usize,
    key: Option<String>,
}

impl Compound {
    fn next_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        value.serialize(Checker { path })
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), NotFinite> {
        value.serialize(Checker {
            path: format!("{}.{name}", self.path),
        })
    }
}

macro_rules! accept {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, _: $ty) -> Result<(), NotFinite> { Ok(()) })*
    };
}

impl ser::Serializer for Checker {
    type Ok = ();
    type Error = NotFinite;
    type SerializeSeq = Compound;
    type SerializeTuple = Compound;
    type SerializeTupleStruct = Compound;
    type SerializeTupleVariant = Compound;
    type SerializeMap = Compound;
    type SerializeStruct = Compound;
    type SerializeStructVariant = Compound;

    accept!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char,
        serialize_str: &str, serialize_bytes: &[u8]);

    fn serialize_f32(self, v: f32) -> Result<(), NotFinite> {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), NotFinite> {
        self.float(v)
    }
    fn serialize_none(self) -> Result<(), NotFinite> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), NotFinite> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), NotFinite> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), NotFinite> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), NotFinite> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), NotFinite> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), NotFinite> {
        v.serialize(self.child(format_args!(".{variant}")))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound, NotFinite> {
        Ok(self.compound())
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound, NotFinite> {
        Ok(self.compound())
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound, NotFinite> {
        Ok(self.compound())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, NotFinite> {
        Ok(self.child(format_args!(".{variant}")).compound())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound, NotFinite> {
        Ok(self.compound())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound, NotFinite> {
        Ok(self.compound())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, NotFinite> {
        Ok(self.child(format_args!(".{variant}")).compound())
    }
}

impl Checker {
    fn compound(self) -> Compound {
        Compound {
            path: self.path,
            index: 0,
            key: None,
        }
    }
}

/// The sequence-like compounds: each element is the next index.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Compound {
            type Ok = ();
            type Error = NotFinite;
            fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), NotFinite> {
                self.next_element(v)
            }
            fn end(self) -> Result<(), NotFinite> {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound {
    type Ok = ();
    type Error = NotFinite;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), NotFinite> {
        // A key as serde_json writes it (a string, or a number as one).
        self.key = Some(match serde_json::to_value(k) {
            Ok(serde_json::Value::String(key)) => key,
            Ok(other) => other.to_string(),
            Err(_) => "?".to_owned(),
        });
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), NotFinite> {
        let key = self.key.take().unwrap_or_else(|| "?".into());
        self.field(&key, v)
    }
    fn end(self) -> Result<(), NotFinite> {
        Ok(())
    }
}

/// The struct-like compounds: each field is named.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound {
            type Ok = ();
            type Error = NotFinite;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                v: &T,
            ) -> Result<(), NotFinite> {
                self.field(name, v)
            }
            fn end(self) -> Result<(), NotFinite> {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::check;

    #[derive(serde::Serialize)]
    struct Scores {
        name: String,
        values: Vec<f64>,
        by_key: BTreeMap<String, f32>,
    }

    #[test]
    fn finds_the_first_non_finite_float_with_its_path() {
        let ok = Scores {
            name: "a".into(),
            values: vec![1.0, -2.5],
            by_key: BTreeMap::from([("x".into(), 0.5)]),
        };
        assert!(check(&ok).is_ok());
        let nan = Scores {
            values: vec![1.0, f64::NAN],
            ..ok
        };
        let e = check(&nan).unwrap_err().to_string();
        assert!(e.starts_with("NaN at .values[1] cannot be stored"), "{e}");
        let inf = BTreeMap::from([("k".to_owned(), f32::INFINITY)]);
        assert_eq!(
            check(&inf).unwrap_err().to_string(),
            "inf at .k cannot be stored: JSON has no NaN or infinity (it would be stored as null)"
        );
        assert!(
            check(&f64::NEG_INFINITY)
                .unwrap_err()
                .to_string()
                .contains("the value")
        );
        assert!(check(&Some(1.5_f64)).is_ok());
    }
}
