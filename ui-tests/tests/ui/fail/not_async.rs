use pgflow::{workflow, StepError};

pub struct Sync;

#[workflow]
impl Sync {
    #[step]
    fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
