//! The benchmark program (DESIGN §6). Prints one line per scenario:
//! `BENCH scenario=NAME key=value ...`.
//!
//! ```text
//! cargo run --release --example bench -- [--scenario inline] [--n N]
//! ```
//!
//! Scenarios:
//! - `inline`: in-process executor overhead, a 10-step chain of trivial steps run
//!   `--n` times per sample (default 20,000), 15 samples; reports the median and the
//!   best nanoseconds per step. The durable-runtime scenarios arrive with the runtime.

use std::time::Instant;

use pgflow::{StepError, workflow};

/// Ten trivial steps in a chain.
pub struct Chain10;

#[workflow(name = "bench_chain10", max_attempts = 1)]
impl Chain10 {
    #[step]
    async fn s1(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s2(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s3(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s4(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s5(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s6(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s7(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s8(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s9(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s10(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

/// The same chain with the default 3 attempts: each step keeps a copy of its input
/// for a retry.
pub struct Chain10Retrying;

#[workflow(name = "bench_chain10_retrying")]
impl Chain10Retrying {
    #[step]
    async fn s1(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s2(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s3(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s4(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s5(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s6(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s7(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s8(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s9(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s10(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

struct Args {
    scenario: Option<String>,
    n: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        scenario: None,
        n: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scenario" => args.scenario = Some(it.next().ok_or("--scenario needs a name")?),
            "--n" => {
                let v = it.next().ok_or("--n needs a number")?;
                args.n = Some(v.parse().map_err(|_| format!("--n: not a number: {v}"))?);
            }
            "-h" | "--help" => {
                return Err("usage: bench [--scenario inline] [--n N]".to_owned());
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: bench [--scenario inline] [--n N]"
                ));
            }
        }
    }
    Ok(args)
}

async fn inline<W: pgflow::Workflow<Input = u64, Output = u64>>(label: &str, runs: u64) {
    const SAMPLES: usize = 15;
    const STEPS: u64 = 10;
    // warm up
    for i in 0..1_000 {
        let out = pgflow::execute::<W>(i).await.expect("bench workflow");
        assert_eq!(out, i + STEPS);
    }
    let mut per_step = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        for i in 0..runs {
            let out = pgflow::execute::<W>(i).await.expect("bench workflow");
            assert_eq!(out, i + STEPS);
        }
        per_step.push(start.elapsed().as_nanos() as f64 / (runs * STEPS) as f64);
    }
    per_step.sort_by(f64::total_cmp);
    println!(
        "BENCH scenario={label} runs={} steps={} samples={SAMPLES} ns_per_step_p50={:.0} ns_per_step_min={:.0} ns_per_run_p50={:.0}",
        runs,
        runs * STEPS,
        per_step[SAMPLES / 2],
        per_step[0],
        per_step[SAMPLES / 2] * STEPS as f64
    );
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let n = args.n.unwrap_or(20_000);
    match args.scenario.as_deref() {
        None | Some("inline") => rt.block_on(async {
            inline::<Chain10>("inline", n).await;
            inline::<Chain10Retrying>("inline_retrying", n).await;
        }),
        Some(other) => {
            eprintln!("unknown scenario {other}; known: inline");
            std::process::exit(2);
        }
    }
}
