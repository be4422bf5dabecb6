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
/// (`.scores[2]`) and what. The walk allocates nothing unless it finds one: the
/// path is a chain of segments on the stack, written out only for the error.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NotFinite> {
    match value.serialize(Checker { at: At::Root }) {
        Err(NotFinite::Other) => Ok(()),
        other => other,
    }
}

/// Where the walk is: a segment and the path of its parent.
#[derive(Clone, Copy)]
enum At<'a> {
    Root,
    /// `[i]`
    Index(&'a At<'a>, usize),
    /// `.name`: a field, a variant, or a map key already written out.
    Field(&'a At<'a>, &'a str),
    /// `.key`: a map key, written out only if the path is.
    Key(&'a At<'a>, &'a dyn Fn() -> String),
}

impl At<'_> {
    fn write(&self, out: &mut String) {
        use fmt::Write as _;
        match self {
            At::Root => {}
            At::Index(parent, i) => {
                parent.write(out);
                let _ = write!(out, "[{i}]");
            }
            At::Field(parent, name) => {
                parent.write(out);
                out.push('.');
                out.push_str(name);
            }
            At::Key(parent, key) => {
                parent.write(out);
                out.push('.');
                out.push_str(&key());
            }
        }
    }
}

struct Checker<'a> {
    at: At<'a>,
}

impl Checker<'_> {
    fn float(&self, v: f64) -> Result<(), NotFinite> {
        if v.is_finite() {
            return Ok(());
        }
        let mut path = String::new();
        self.at.write(&mut path);
        let at = if path.is_empty() { "the value" } else { &path };
        Err(NotFinite::Float(format!(
            "{v} at {at} cannot be stored: JSON has no NaN or infinity (it would be stored as null)"
        )))
    }
}

/// A map key as `serde_json` writes it (a string, or a number as one).
fn key_text<K: Serialize + ?Sized>(key: &K) -> String {
    match serde_json::to_value(key) {
        Ok(serde_json::Value::String(key)) => key,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

/// Walks the elements of a sequence, tuple, map or struct (of `variant`, for an
/// enum's tuple or struct variant).
struct Compound<'a> {
    at: At<'a>,
    variant: Option<&'static str>,
    index: usize,
    /// A key given alone (`serialize_key`), for the value that follows.
    key: Option<String>,
}

/// A segment below a compound's path.
#[derive(Clone, Copy)]
enum Segment<'k> {
    Index(usize),
    Field(&'k str),
    Key(&'k dyn Fn() -> String),
}

impl Compound<'_> {
    /// Checks `value` at `segment` below this compound's path.
    fn child<T: Serialize + ?Sized>(
        &self,
        value: &T,
        segment: Segment<'_>,
    ) -> Result<(), NotFinite> {
        let below = |parent: &At<'_>| {
            let at = match segment {
                Segment::Index(i) => At::Index(parent, i),
                Segment::Field(name) => At::Field(parent, name),
                Segment::Key(key) => At::Key(parent, key),
            };
            value.serialize(Checker { at })
        };
        match self.variant {
            Some(variant) => below(&At::Field(&self.at, variant)),
            None => below(&self.at),
        }
    }

    fn next_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
        let i = self.index;
        self.index += 1;
        self.child(value, Segment::Index(i))
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), NotFinite> {
        self.child(value, Segment::Field(name))
    }
}

macro_rules! accept {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, _: $ty) -> Result<(), NotFinite> { Ok(()) })*
    };
}

impl<'a> ser::Serializer for Checker<'a> {
    type Ok = ();
    type Error = NotFinite;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

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
        v.serialize(Checker {
            at: At::Field(&self.at, variant),
        })
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(None))
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(None))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(None))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(Some(variant)))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(None))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(None))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, NotFinite> {
        Ok(self.compound(Some(variant)))
    }
}

impl<'a> Checker<'a> {
    fn compound(self, variant: Option<&'static str>) -> Compound<'a> {
        Compound {
            at: self.at,
            variant,
            index: 0,
            key: None,
        }
    }
}

/// The sequence-like compounds: each element is the next index.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
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

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = NotFinite;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), NotFinite> {
        self.key = Some(key_text(k));
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), NotFinite> {
        let key = self.key.take().unwrap_or_else(|| "?".into());
        self.field(&key, v)
    }
    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        k: &K,
        v: &V,
    ) -> Result<(), NotFinite> {
        // the key is written out only if the path is
        let key = || key_text(k);
        self.child(v, Segment::Key(&key))
    }
    fn end(self) -> Result<(), NotFinite> {
        Ok(())
    }
}

/// The struct-like compounds: each field is named.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
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

    #[derive(serde::Serialize)]
    enum Shape {
        Point { x: f64, y: f64 },
        Pair(f64, f64),
        Radius(f64),
    }

    #[derive(serde::Serialize)]
    struct Scene {
        shapes: Vec<Shape>,
        weights: BTreeMap<u32, Vec<f64>>,
    }

    #[test]
    fn paths_name_variants_map_keys_and_nesting() {
        let path = |scene: &Scene| {
            let e = check(scene).unwrap_err().to_string();
            e[e.find(" at ").unwrap() + 4..e.find(" cannot").unwrap()].to_owned()
        };
        let mut scene = Scene {
            shapes: vec![
                Shape::Point { x: 1.0, y: 2.0 },
                Shape::Pair(0.5, 1.5),
                Shape::Radius(3.0),
            ],
            weights: BTreeMap::from([(7, vec![0.1, 0.2]), (9, vec![0.3])]),
        };
        assert!(check(&scene).is_ok());
        scene.weights.insert(9, vec![0.3, f64::NAN]);
        assert_eq!(path(&scene), ".weights.9[1]");
        scene.weights.clear();
        scene.shapes[2] = Shape::Radius(f64::INFINITY);
        assert_eq!(path(&scene), ".shapes[2].Radius");
        scene.shapes[1] = Shape::Pair(0.5, f64::NAN);
        assert_eq!(path(&scene), ".shapes[1].Pair[1]");
        scene.shapes[0] = Shape::Point {
            x: 1.0,
            y: f64::NEG_INFINITY,
        };
        assert_eq!(path(&scene), ".shapes[0].Point.y");
    }
}
