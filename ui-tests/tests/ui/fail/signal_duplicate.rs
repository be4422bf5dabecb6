use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step(signal = approval)]
    async fn publish(draft: String, approval: bool) -> Result<String, StepError> {
        Ok(format!("{draft} {approval}"))
    }

    #[step(signal = approval)]
    async fn announce(publish: String, approval: bool) -> Result<String, StepError> {
        Ok(format!("{publish} {approval}"))
    }
}

fn main() {}
