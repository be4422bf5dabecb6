use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step(map, signal = approval)]
    async fn publish(draft: String, approval: bool) -> Result<String, StepError> {
        Ok(format!("{draft} {approval}"))
    }
}

fn main() {}
