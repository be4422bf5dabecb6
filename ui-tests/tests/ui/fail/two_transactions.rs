use pgflow::{workflow, StepError};

pub struct Db;

pub struct Twice;

#[workflow]
impl Twice {
    // One transaction per step: its writes commit with the step's completion.
    #[step]
    async fn write(n: u32, a: &mut Db, b: &mut Db) -> Result<u32, StepError> {
        let _ = (a, b);
        Ok(n)
    }
}

fn main() {}
