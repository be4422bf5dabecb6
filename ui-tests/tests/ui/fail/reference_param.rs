use pgflow::{workflow, StepError};

pub struct ByRef;

#[workflow]
impl ByRef {
    #[step]
    async fn a(n: u32) -> Result<String, StepError> {
        Ok(n.to_string())
    }

    #[step]
    async fn b(a: &String) -> Result<usize, StepError> {
        Ok(a.len())
    }
}

fn main() {}
