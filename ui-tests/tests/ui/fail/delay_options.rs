use pgflow::{workflow, StepError};

pub struct BadDelays;

// `delay` is a step option; `max_snoozes` counts, so it cannot be negative.
#[workflow(delay = "1h", max_snoozes = -1)]
impl BadDelays {
    #[step(delay = "ten minutes")]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(delay = 600, max_snoozes = "many")]
    async fn b(a: u32) -> Result<u32, StepError> {
        Ok(a)
    }
}

fn main() {}
