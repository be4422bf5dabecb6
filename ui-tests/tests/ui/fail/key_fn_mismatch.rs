use pgflow::{workflow, StepError};

pub struct Keyed;

// The key fn takes a reference to the input (a `u32` here), not a `String`.
#[workflow(key = Self::tenant)]
impl Keyed {
    #[step]
    async fn call(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    fn tenant(name: &String) -> String {
        name.clone()
    }
}

pub struct Unkeyed;

// `key` takes a path, not a string.
#[workflow(key = "tenant")]
impl Unkeyed {
    #[step]
    async fn call(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
