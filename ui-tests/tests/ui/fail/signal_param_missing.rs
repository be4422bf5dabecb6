use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step(signal = approval)]
    async fn publish(draft: String) -> Result<String, StepError> {
        Ok(draft)
    }
}

fn main() {}
