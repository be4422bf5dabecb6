use pgflow::{workflow, StepError, Workflow};

pub struct ProcessOrder;

#[workflow]
impl ProcessOrder {
    #[step]
    fn total(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

// Code that names the workflow reports nothing more than the missing `async`.
async fn run() -> u32 {
    assert_eq!(ProcessOrder::NAME, "process_order");
    pgflow::execute::<ProcessOrder>(7).await.unwrap()
}

fn main() {
    let _ = run();
}
