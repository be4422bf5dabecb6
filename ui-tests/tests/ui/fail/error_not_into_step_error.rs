use pgflow::workflow;

pub struct MyError;

pub struct BadError;

#[workflow]
impl BadError {
    #[step]
    async fn a(n: u32) -> Result<u32, MyError> {
        Ok(n)
    }
}

fn main() {}
