use pgflow::workflow;

pub struct Empty;

#[workflow]
impl Empty {
    async fn not_a_step(n: u32) -> u32 {
        n
    }
}

fn main() {}
