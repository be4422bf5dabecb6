use pgflow::{workflow, StepContext, StepError};

pub struct WithContext;

#[workflow]
impl WithContext {
    #[step]
    async fn first(ctx: &StepContext, n: u32) -> Result<u32, StepError> {
        ctx.add_cost_cents(1);
        Ok(n + ctx.attempt())
    }

    #[step]
    async fn second(n: u32, ctx: &pgflow::StepContext) -> Result<u32, StepError> {
        ctx.check_cancelled()?;
        Ok(n)
    }
}

fn main() {}
