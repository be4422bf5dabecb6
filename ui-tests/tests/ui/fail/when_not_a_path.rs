use pgflow::{workflow, StepError};

pub struct Conditional;

#[workflow]
impl Conditional {
    #[step(when = "Self::is_big")]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
