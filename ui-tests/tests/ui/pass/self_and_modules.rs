use pgflow::{workflow, StepError, Workflow};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Counter {
    pub n: u32,
}

// `Self` in step types means the workflow type itself.
#[workflow]
impl Counter {
    #[step]
    async fn bump(c: Self) -> Result<Self, StepError> {
        Ok(Self { n: c.n + 1 })
    }

    #[step]
    async fn read(c: Counter) -> Result<u32, StepError> {
        Ok(c.n)
    }
}

pub mod flows {
    pub struct Nested;
}

mod defs {
    use pgflow::{workflow, StepError};

    // The impl lives in another module than the type.
    #[workflow(name = "nested")]
    impl super::flows::Nested {
        #[step]
        async fn only(n: u8) -> Result<u8, StepError> {
            Ok(n)
        }
    }
}

fn main() {
    assert_eq!(Counter::definition().steps()[0].output().type_name, "Counter");
    assert_eq!(flows::Nested::definition().rust_type(), "super::flows::Nested");
    assert!(Counter::definition().rust_type().ends_with("::Counter"));
}
