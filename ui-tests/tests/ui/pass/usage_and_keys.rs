//! Run keys from the input (a fn returning `&str`, `String` or a number), estimates
//! on steps, and usage reported through the context.
use pgflow::{workflow, StepContext, StepError, Workflow};

pub struct ByTenant;

#[workflow(key = Self::tenant)]
impl ByTenant {
    #[step(estimate_cents = 5, estimate_tokens = 2000)]
    async fn call(input: (String, u32), ctx: &StepContext) -> Result<u32, StepError> {
        ctx.add_usage("small", 1000, 200, 2);
        Ok(input.1)
    }

    fn tenant(input: &(String, u32)) -> &str {
        &input.0
    }
}

pub struct ByNumber;

#[workflow(key = shard_of)]
impl ByNumber {
    #[step]
    async fn call(n: u64) -> Result<u64, StepError> {
        Ok(n)
    }
}

fn shard_of(n: &u64) -> u64 {
    n % 16
}

fn main() {
    assert_eq!(ByTenant::key(&("acme".to_owned(), 1)).as_deref(), Some("acme"));
    assert_eq!(ByNumber::key(&35).as_deref(), Some("3"));
    let call = ByTenant::definition().step("call").unwrap();
    assert_eq!((call.options().estimate_cents, call.options().estimate_tokens), (5, 2000));
    assert_eq!(ByTenant::definition().to_definition().steps[0].estimate_cents, 5);
}
