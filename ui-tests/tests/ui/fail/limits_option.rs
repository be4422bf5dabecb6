use pgflow::{workflow, StepError};

pub struct Limited;

// Limits are declared by the steps that count against them.
#[workflow(limits = ["api"])]
impl Limited {
    // A limit's name is a string.
    #[step(limits = [api])]
    async fn call(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(limits = [""])]
    async fn again(call: u32) -> Result<u32, StepError> {
        Ok(call)
    }
}

fn main() {}
