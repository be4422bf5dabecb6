use pgflow::{workflow, StepError};

pub struct Spend;

// An estimate belongs to the step that spends it.
#[workflow(estimate_cents = 5)]
impl Spend {
    // Not a number; negative.
    #[step(estimate_cents = "5", estimate_tokens = -1)]
    async fn call(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
