use pgflow::{workflow, StepError};

pub struct Unbound;

#[workflow]
impl Unbound {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [a])]
    async fn b(a: u32, extra: String) -> Result<String, StepError> {
        Ok(format!("{a}{extra}"))
    }
}

fn main() {}
