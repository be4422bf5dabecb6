use pgflow::{workflow, StepError};

pub struct ProcessOrder;

#[workflow]
impl ProcessOrder {
    #[step]
    async fn total(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [totl])]
    async fn receipt(total: u32) -> Result<String, StepError> {
        Ok(total.to_string())
    }
}

// Code that names the workflow reports nothing more than the misspelling.
async fn run() -> String {
    pgflow::execute::<ProcessOrder>(7).await.unwrap()
}

fn main() {
    let _ = run();
}
