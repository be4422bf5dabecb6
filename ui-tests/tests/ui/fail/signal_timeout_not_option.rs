use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    // With a timeout the step may run without the payload: it takes an `Option`.
    #[step(signal = approval, signal_timeout = "72h")]
    async fn publish(draft: String, approval: bool) -> Result<String, StepError> {
        Ok(format!("{draft} {approval}"))
    }

    // Without one it always gets the payload: an `Option` would never be `None`.
    #[step(signal = go_live)]
    async fn announce(publish: String, go_live: Option<bool>) -> Result<String, StepError> {
        Ok(format!("{publish} {go_live:?}"))
    }
}

fn main() {}
