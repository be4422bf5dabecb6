use pgflow::{workflow, Signals, StepError};

pub struct Approval {
    pub by: String,
}

pub struct Review;

#[workflow]
impl Review {
    #[step(signal = approval, signal_timeout = "72h")]
    async fn publish(draft: String, approval: Option<bool>) -> Result<String, StepError> {
        Ok(format!("{draft} {approval:?}"))
    }
}

fn main() {
    let signals = Signals::new();
    // The payload of `approval` is a `bool`.
    let _ = signals.send(Review::approval, "yes");
}
