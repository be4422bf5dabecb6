use pgflow::{workflow, StepError, Workflow};

pub struct Diamond;

#[workflow(name = "diamond_pass")]
impl Diamond {
    #[step]
    async fn start(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [start])]
    async fn left(start: u32) -> Result<u64, StepError> {
        Ok(u64::from(start))
    }

    #[step(depends_on = [start])]
    async fn right(start: u32) -> Result<String, StepError> {
        Ok(start.to_string())
    }

    #[step(depends_on = [left, right])]
    async fn join(right: String, left: u64) -> Result<(u64, String), StepError> {
        Ok((left, right))
    }
}

fn main() {
    let def = Diamond::definition();
    assert_eq!(def.terminal().name(), "join");
    assert_eq!(def.step("join").map(|s| s.parents().to_vec()), Some(vec![1, 2]));
}
