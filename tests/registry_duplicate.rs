//! Two workflows with the same (name, version) make the registry an error that
//! names both definitions.

use pgflow::{RegistryError, StepError, workflow};

pub struct First;

#[workflow(name = "twice")]
impl First {
    #[step]
    async fn a(n: u8) -> Result<u8, StepError> {
        Ok(n)
    }
}

pub struct Second;

#[workflow(name = "twice")]
impl Second {
    #[step]
    async fn b(n: u8) -> Result<u8, StepError> {
        Ok(n)
    }
}

#[test]
fn duplicate_name_and_version_is_an_error_naming_both_places() {
    let err = pgflow::registry().unwrap_err();
    let RegistryError::Duplicate {
        name,
        version,
        first,
        second,
    } = &err;
    assert_eq!((name.as_str(), *version), ("twice", 1));
    let both = format!("{first} | {second}");
    assert!(
        both.contains("registry_duplicate::First at tests/registry_duplicate.rs:8"),
        "{both}"
    );
    assert!(
        both.contains("registry_duplicate::Second at tests/registry_duplicate.rs:18"),
        "{both}"
    );
    assert!(err.to_string().contains("defined twice"), "{err}");
}
