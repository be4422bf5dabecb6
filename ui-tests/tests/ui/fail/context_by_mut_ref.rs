use pgflow::{workflow, StepContext, StepError};

pub struct MutContext;

#[workflow]
impl MutContext {
    #[step]
    async fn a(n: u32, ctx: &mut StepContext) -> Result<u32, StepError> {
        Ok(n + ctx.attempt())
    }
}

fn main() {}
