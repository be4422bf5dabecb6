use std::time::Duration;

use pgflow::{workflow, StepError, Workflow};

pub struct Reminder;

#[workflow(max_snoozes = 50)]
impl Reminder {
    #[step(delay = "10m")]
    async fn remind(who: String) -> Result<String, StepError> {
        Ok(who)
    }

    #[step(delay = "0s", max_snoozes = 0)]
    async fn poll(remind: String) -> Result<String, StepError> {
        if remind.is_empty() {
            return Err(StepError::snooze(Duration::from_secs(30)));
        }
        Ok(remind)
    }
}

fn main() {
    let steps = Reminder::definition().steps();
    assert_eq!(steps[0].options().delay, Duration::from_secs(600));
    assert_eq!(steps[0].options().max_snoozes, 50);
    assert_eq!(steps[1].options().delay, Duration::ZERO);
    assert_eq!(steps[1].options().max_snoozes, 0);
}
