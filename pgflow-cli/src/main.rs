//! `pgflow`: the operator CLI of pgflow.
//!
//! It reads and changes the `pgflow` schema directly, from the step tables stored in
//! `pgflow.workflows`, so it needs none of the workflows linked in:
//!
//! ```text
//! pgflow status                         instances, queue depths, runs per workflow
//! pgflow runs --status failed           the newest failed runs
//! pgflow run 42                         one run, step by step
//! pgflow results --since 24h            count, success rate, durations, cost
//! pgflow costs --by model --since 24h   spend from the usage ledger (tokens, cents)
//! pgflow runs --watch                   the same, refreshed every 2 s
//! pgflow start llm_request --input '{..}'  start a run by name
//! pgflow retry 42                       resume a failed or cancelled run where it stopped
//! pgflow fork 42 --from summarize       a new run redoing `summarize` and what follows
//! pgflow export 42 > run42.json         a run as JSON, to replay it in a test
//! pgflow prune --older-than 7d --dry-run  what retention would delete
//! pgflow schedules                      cron schedules: next and last tick, last run
//! pgflow schedules remove nightly       stop a schedule (its code registers it again at start)
//! ```
//!
//! Tables by default, `--json` for scripts. The database is `--database-url`, else
//! `DATABASE_URL`, else the local server.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgflow::RunId;
use pgflow_runtime::admin::{self, RunFilter};
use pgflow_runtime::{Error, RunStatus};
use serde::Serialize;

mod duration;
mod human;
mod table;

/// The server used when neither `--database-url` nor `DATABASE_URL` is given.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Operate pgflow: inspect instances, queues and runs; retry and cancel runs.
#[derive(Debug, Parser)]
#[command(name = "pgflow", version)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres)
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,

    /// Print JSON (for scripts) instead of tables
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the pgflow schema migrations that are not applied yet
    Migrate,
    /// Instances (status, load, idle time), queue depths and runs per workflow
    Status,
    /// List the newest runs
    Runs {
        /// Only runs of this workflow
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs with this status: running, succeeded (or success), failed (or
        /// failure), cancelled
        #[arg(long)]
        status: Option<RunStatus>,
        /// At most this many runs
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the list again every this many seconds until interrupted (Ctrl-C)
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Start a run of a workflow by name, from its stored definition
    Start {
        /// The workflow's name
        workflow: String,
        /// The run's input, as JSON
        #[arg(long, value_parser = parse_json)]
        input: serde_json::Value,
        /// The workflow version (default: the highest stored one)
        #[arg(long)]
        version: Option<i32>,
        /// A second start with the same key returns the first run
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// One run with each of its steps, in graph order
    Run {
        /// The run id
        id: i64,
    },
    /// Finished runs: per workflow, per instance and per status
    Results {
        /// The window, back from now: 30m, 1h, 7d, 1h30m
        #[arg(long, default_value = "1h", value_parser = parse_since)]
        since: Duration,
        /// Only runs of this workflow
        #[arg(long)]
        workflow: Option<String>,
    },
    /// Spend from the usage ledger (tokens and cents, failed attempts included),
    /// grouped by workflow, model or key
    Costs {
        /// workflow, model or key
        #[arg(long, default_value = "workflow")]
        by: admin::CostsBy,
        /// The window, back from now: 30m, 1h, 7d, 1h30m
        #[arg(long, default_value = "24h", value_parser = parse_since)]
        since: Duration,
    },
    /// Resume a failed or cancelled run: completed steps (and completed map elements) are
    /// reused, the rest runs again
    Retry {
        /// The run id
        id: i64,
    },
    /// Start a new run from a run, reusing the outputs of the steps upstream of --from
    Fork {
        /// The run id
        id: i64,
        /// The first step to run again (it and everything downstream of it run)
        #[arg(long)]
        from: String,
        /// The new run's input (JSON); default: the original's
        #[arg(long, value_parser = parse_json)]
        input: Option<serde_json::Value>,
        /// The workflow version of the new run; default: the original's
        #[arg(long)]
        version: Option<u32>,
    },
    /// Print a run as JSON (input, step outputs, errors) to replay it in a test with
    /// `pgflow::replay`
    Export {
        /// The run id
        id: i64,
    },
    /// Cancel a running run: no further step starts
    Cancel {
        /// The run id
        id: i64,
    },
    /// Serve the web dashboard (runs, step graphs, queues, instances, workflows,
    /// schedules; cancel and retry) until interrupted
    Dashboard {
        /// The address to listen on; one that is not a loopback address needs a
        /// token
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Every request must carry this token (Authorization: Bearer, or once as
        /// ?token=)
        #[arg(long, env = "PGFLOW_DASHBOARD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// No actions (cancel, retry)
        #[arg(long)]
        read_only: bool,
    },
    /// Delete (or archive) finished runs older than an age, with their steps
    Prune {
        /// Runs that finished longer ago than this go: 7d, 12h, 90m
        #[arg(long, value_parser = parse_since)]
        older_than: Duration,
        /// Move them to pgflow.archived_runs instead of deleting them
        #[arg(long)]
        archive: bool,
        /// Count what would go; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Runs per transaction
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Send a signal to a run: the step waiting for it (`#[step(signal = NAME)]`) runs
    /// with the payload, now or when it is reached. Prints delivered, kept, duplicate
    /// (the first one wins) or too_late (the step's timeout passed first)
    Signal {
        /// The run id
        id: i64,
        /// The signal's name
        name: String,
        /// The payload (JSON), e.g. '{"approved": true}'
        #[arg(value_parser = parse_json)]
        payload: serde_json::Value,
    },
    /// Cron schedules: expression, time zone, missed-tick policy, next and last tick
    #[command(args_conflicts_with_subcommands = true)]
    Schedules {
        #[command(subcommand)]
        action: Option<SchedulesAction>,
    },
}

#[derive(Debug, Subcommand)]
enum SchedulesAction {
    /// List the schedules (the default)
    List,
    /// Remove a schedule: no instance fires it any more. An instance that registers it
    /// in code stores it again when it next starts: remove it from the code too
    Remove {
        /// The schedule's name
        name: String,
    },
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

fn parse_since(s: &str) -> Result<Duration, duration::InvalidDuration> {
    duration::parse_duration(s)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`pgflow runs | head`) is not an error worth a panic.
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command and returns what to print.
async fn run(cli: Cli) -> Result<String, Error> {
    let url = cli
        .database_url
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    let pool = admin::connect(&url).await?;
    let json = cli.json;
    let out = match cli.command {
        Command::Migrate => {
            let r = admin::migrate(&pool).await?;
            output(json, &r, human::migrate)
        }
        Command::Status => {
            let s = admin::status(&pool).await?;
            output(json, &s, human::status)
        }
        Command::Runs {
            workflow,
            status,
            limit,
            watch,
        } => {
            let filter = RunFilter {
                workflow,
                status,
                limit,
                ..RunFilter::default()
            };
            if let Some(every) = watch {
                return watch_runs(&pool, &filter, json, every.max(1)).await;
            }
            let runs = admin::list_runs(&pool, &filter).await?;
            output(json, &runs, |r| human::runs(r, &filter))
        }
        Command::Start {
            workflow,
            input,
            version,
            idempotency_key,
        } => {
            let r = admin::start(&pool, &workflow, version, input, idempotency_key).await?;
            output(json, &r, human::start)
        }
        Command::Run { id } => {
            let d = admin::run_detail(&pool, RunId(id)).await?;
            output(json, &d, human::run)
        }
        Command::Costs { by, since } => {
            let c = admin::costs(&pool, since, by).await?;
            output(json, &c, human::costs)
        }
        Command::Results { since, workflow } => {
            let r = admin::results(&pool, since, workflow.as_deref()).await?;
            output(json, &r, human::results)
        }
        Command::Retry { id } => {
            let r = admin::retry(&pool, RunId(id)).await?;
            output(json, &r, human::retry)
        }
        Command::Fork {
            id,
            from,
            input,
            version,
        } => {
            let opts = admin::ForkOptions { input, version };
            let r = admin::fork(&pool, RunId(id), &from, opts).await?;
            output(json, &r, human::fork)
        }
        Command::Export { id } => {
            // Always JSON: the document `pgflow::replay` reads.
            let r = admin::export(&pool, RunId(id)).await?;
            output(true, &r, |_| String::new())
        }
        Command::Cancel { id } => {
            let r = admin::cancel(&pool, RunId(id)).await?;
            output(json, &r, human::cancel)
        }
        Command::Dashboard {
            listen,
            token,
            read_only,
        } => {
            let mut d =
                pgflow_runtime::dashboard::Dashboard::new(pool.clone()).read_only(read_only);
            if let Some(t) = token {
                d = d.token(t);
            }
            let bound = d.bind(listen).await?;
            eprintln!("pgflow dashboard on http://{}/", bound.local_addr());
            bound.serve().await?;
            String::new()
        }
        Command::Prune {
            older_than,
            archive,
            dry_run,
            batch,
        } => {
            let opts = admin::PruneOptions {
                older_than,
                archive,
                dry_run,
                batch,
            };
            let r = admin::prune(&pool, opts).await?;
            output(json, &r, human::prune)
        }
        Command::Signal { id, name, payload } => {
            let outcome = admin::signal(&pool, RunId(id), &name, payload).await?;
            let r = human::SignalReport {
                run_id: id,
                name,
                outcome,
            };
            output(json, &r, human::signal)
        }
        Command::Schedules { action } => match action {
            None | Some(SchedulesAction::List) => {
                let r = admin::schedules(&pool).await?;
                output(json, &r, |s| human::schedules(s))
            }
            Some(SchedulesAction::Remove { name }) => {
                let r = admin::remove_schedule(&pool, &name).await?;
                output(json, &r, human::schedule_removed)
            }
        },
    };
    pool.close().await;
    Ok(out)
}

/// `pgflow runs --watch`: the list again every `every` seconds until Ctrl-C (the
/// screen is cleared between two lists on a terminal).
async fn watch_runs(
    pool: &sqlx::PgPool,
    filter: &RunFilter,
    json: bool,
    every: u64,
) -> Result<String, Error> {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let runs = admin::list_runs(pool, filter).await?;
        let mut text = output(json, &runs, |r| human::runs(r, filter));
        if terminal {
            text.insert_str(0, "\x1b[2J\x1b[H");
        } else {
            text.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(String::new()); // the reader went away
        }
        drop(stdout);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(String::new()),
        }
    }
}

fn output<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> String {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(mut s) => {
                s.push('\n');
                s
            }
            // Only a map with non-string keys fails to serialize; none is used here.
            Err(e) => format!("{}\n", serde_json::json!({ "error": e.to_string() })),
        }
    } else {
        human(value)
    }
}
