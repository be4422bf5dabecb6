use pgflow::workflow;

pub struct NoResult;

#[workflow]
impl NoResult {
    #[step]
    async fn a(n: u32) -> u32 {
        n
    }

    #[step]
    async fn b(n: u32) {
        let _ = n;
    }
}

fn main() {}
