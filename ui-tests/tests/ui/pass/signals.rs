#![deny(warnings, clippy::all)]

use std::time::Duration;

use pgflow::{workflow, ParamSource, Signal, StepError, Workflow};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Draft {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
}

pub struct Review;

#[workflow]
impl Review {
    #[step]
    async fn write(topic: String) -> Result<Draft, StepError> {
        Ok(Draft { text: topic })
    }

    #[step(signal = approval, signal_timeout = "72h")]
    async fn publish(write: Draft, approval: Option<Approval>) -> Result<String, StepError> {
        Ok(match approval {
            Some(a) => format!("{} by {}", write.text, a.by),
            None => write.text,
        })
    }

    // Without a timeout the parameter is the payload itself; bound by name with
    // `depends_on`, in any position.
    #[step(depends_on = [publish], signal = go_live)]
    async fn announce(go_live: bool, publish: String) -> Result<String, StepError> {
        Ok(if go_live { publish } else { String::new() })
    }
}

fn main() {
    let approval: Signal<Review, Approval> = Review::approval;
    let go_live: Signal<Review, bool> = Review::go_live;
    assert_eq!((approval.name(), go_live.name()), ("approval", "go_live"));
    let def = Review::definition();
    let publish = def.step("publish").unwrap();
    assert_eq!(publish.params()[1].source, ParamSource::Signal);
    let signal = publish.signal().unwrap();
    assert_eq!(signal.payload_type, "Approval");
    assert_eq!(signal.timeout, Some(Duration::from_secs(72 * 3600)));
    let announce = def.step("announce").unwrap().signal().unwrap();
    assert_eq!((announce.param, announce.timeout), (0, None));
    let stored = def.to_definition();
    assert_eq!(stored.steps[1].signal.as_ref().unwrap().timeout_ms, Some(259_200_000));
    assert!(stored.steps[0].signal.is_none());
}
