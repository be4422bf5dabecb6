use pgflow::{workflow, StepContext, StepError};

pub struct ByValue;

#[workflow]
impl ByValue {
    #[step]
    async fn a(n: u32, ctx: StepContext) -> Result<u32, StepError> {
        Ok(n + ctx.attempt())
    }
}

fn main() {}
