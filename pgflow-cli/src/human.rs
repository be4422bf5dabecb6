//! The human-readable output of each command.

use std::fmt::Write as _;

use pgflow_runtime::ScheduleInfo;
use pgflow_runtime::admin::{
    CancelReport, ForkReport, Instance, MigrateReport, PruneReport, Results, RetryReport,
    RunDetail, RunFilter, RunSummary, StartReport, Status,
};

use crate::table::{Table, clip, ms, ms_f, opt_ms, percent, time, window};

/// Errors in tables are cut to this many characters (`pgflow run` shows them whole).
const ERROR_WIDTH: usize = 80;

pub(crate) fn migrate(r: &MigrateReport) -> String {
    let mut out = String::new();
    for m in &r.applied {
        let _ = writeln!(out, "applied {:04} {}", m.version, m.description);
    }
    if r.applied.is_empty() {
        let _ = writeln!(
            out,
            "the pgflow schema is up to date ({} migration(s) applied)",
            r.already_applied
        );
    }
    out
}

pub(crate) fn status(s: &Status) -> String {
    let mut out = String::from("INSTANCES\n");
    let mut t = Table::new(&[
        ("ID", false),
        ("STATUS", false),
        ("LOAD", true),
        ("CAPACITY", true),
        ("IDLE", true),
        ("HOST", false),
        ("PID", true),
        ("QUEUES", false),
        ("STARTED (UTC)", false),
    ]);
    for i in &s.instances {
        t.row(vec![
            i.id.clone(),
            i.status.clone(),
            i.load.to_string(),
            i.capacity.to_string(),
            ms(i.idle_ms),
            i.host.clone(),
            i.pid.to_string(),
            queues(i),
            time(i.started_at),
        ]);
    }
    section(&mut out, &t, "no instance has registered");

    out.push_str("\nQUEUES\n");
    let mut t = Table::new(&[
        ("QUEUE", false),
        ("AVAILABLE", true),
        ("SCHEDULED", true),
        ("AWAITING SIGNAL", true),
        ("AWAITING SUBFLOW", true),
        ("RUNNING", true),
    ]);
    for q in &s.queues {
        t.row(vec![
            q.queue.clone(),
            q.available.to_string(),
            q.scheduled.to_string(),
            q.awaiting_signal.to_string(),
            q.awaiting_subflow.to_string(),
            q.running.to_string(),
        ]);
    }
    section(&mut out, &t, "no tasks queued or running");

    out.push_str("\nRUNS\n");
    let mut t = Table::new(&[
        ("WORKFLOW", false),
        ("RUNNING", true),
        ("SUCCEEDED", true),
        ("FAILED", true),
        ("CANCELLED", true),
    ]);
    for w in &s.runs {
        t.row(vec![
            w.workflow.clone(),
            w.running.to_string(),
            w.succeeded.to_string(),
            w.failed.to_string(),
            w.cancelled.to_string(),
        ]);
    }
    section(&mut out, &t, "no runs");

    out.push_str("\nVERSIONS\n");
    let mut t = Table::new(&[
        ("WORKFLOW", false),
        ("VERSION", true),
        ("QUEUE", false),
        ("RUNNING", true),
        ("SERVED BY", false),
    ]);
    for v in &s.versions {
        let served = if v.is_stranded() {
            "NOBODY (runs stranded)".to_owned()
        } else if v.instances.is_empty() {
            "-".to_owned()
        } else {
            v.instances.join(" ")
        };
        t.row(vec![
            v.workflow.clone(),
            v.version.to_string(),
            v.queue.clone(),
            v.running.to_string(),
            served,
        ]);
    }
    section(&mut out, &t, "no workflow registered");
    for u in &s.unserved {
        let _ = writeln!(
            out,
            "\nWARNING: {} run(s) of {} v{} have no instance that serves them: they wait until \
             an instance that links {} v{} and serves its queue `{}` is online",
            u.runs, u.workflow, u.version, u.workflow, u.version, u.queue
        );
    }

    out.push_str("\nSCHEDULES\n");
    out.push_str(&schedule_table(&s.schedules));
    out
}

/// A schedule whose next tick is this late has no instance firing it.
const OVERDUE_MS: i64 = 60_000;

/// `pgflow schedules`.
pub(crate) fn schedules(list: &[ScheduleInfo]) -> String {
    schedule_table(list)
}

/// The schedules as a table (`(no schedules)` when there are none), then a warning
/// per schedule that no instance fires.
fn schedule_table(list: &[ScheduleInfo]) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[
        ("NAME", false),
        ("WORKFLOW", false),
        ("CRON", false),
        ("TIME ZONE", false),
        ("MISSED", false),
        ("NEXT TICK (UTC)", false),
        ("IN", true),
        ("LAST TICK (UTC)", false),
        ("LAST RUN", false),
    ]);
    for s in list {
        let next_in = match s.next_in_ms {
            Some(ms) if ms < 0 => format!("-{}", crate::table::ms(-ms)),
            other => opt_ms(other),
        };
        let last_run = match (s.last_run_id, &s.last_run_status) {
            (Some(id), Some(status)) => format!("{id} {status}"),
            (Some(id), None) => id.to_string(),
            _ => "-".to_owned(),
        };
        t.row(vec![
            s.name.clone(),
            s.workflow.clone(),
            s.cron.clone(),
            s.time_zone.clone(),
            s.missed.to_string(),
            s.next_tick.map_or_else(|| "none left".to_owned(), time),
            next_in,
            s.last_tick.map_or_else(|| "-".to_owned(), time),
            last_run,
        ]);
    }
    section(&mut out, &t, "no schedules");
    for s in list {
        if s.next_in_ms.is_some_and(|ms| ms < -OVERDUE_MS) {
            let _ = writeln!(
                out,
                "\nWARNING: schedule {} is {} overdue: no running instance fires it (those that \
                 register it are down); if no code registers it any more, remove it with \
                 `pgflow schedules remove {}`",
                s.name,
                crate::table::ms(-s.next_in_ms.unwrap_or(0)),
                s.name
            );
        }
    }
    out
}

/// `pgflow schedules remove`.
pub(crate) fn schedule_removed(s: &ScheduleInfo) -> String {
    format!(
        "removed schedule {} ({} `{}` in {}); an instance that registers it in code stores it \
         again when it starts\n",
        s.name, s.workflow, s.cron, s.time_zone
    )
}

/// `{"default": 16, "llm": 4}` as `default:16 llm:4`.
fn queues(i: &Instance) -> String {
    match &i.queues {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(q, c)| format!("{q}:{c}"))
            .collect::<Vec<_>>()
            .join(" "),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|q| q.as_str().map_or_else(|| q.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

fn section(out: &mut String, t: &Table, empty: &str) {
    if t.is_empty() {
        let _ = writeln!(out, "  ({empty})");
    } else {
        out.push_str(&t.render());
    }
}

pub(crate) fn runs(runs: &[RunSummary], filter: &RunFilter) -> String {
    if runs.is_empty() {
        let mut what = vec!["runs".to_owned()];
        if let Some(s) = filter.status {
            what.insert(0, s.to_string());
        }
        if let Some(w) = &filter.workflow {
            what.push(format!("of workflow `{w}`"));
        }
        return format!("no {}\n", what.join(" "));
    }
    let mut t = Table::new(&[
        ("ID", true),
        ("WORKFLOW", false),
        ("VERSION", true),
        ("STATUS", false),
        ("CREATED (UTC)", false),
        ("DURATION", true),
        ("COST (cents)", true),
        ("ERROR", false),
    ]);
    for r in runs {
        t.row(vec![
            r.id.to_string(),
            r.workflow.clone(),
            r.version.to_string(),
            r.status.clone(),
            time(r.created_at),
            opt_ms(r.duration_ms),
            r.cost_cents.to_string(),
            run_error(r),
        ]);
    }
    t.render()
}

/// `charge: attempt 1 permanent: card declined`, clipped (the row names the workflow).
fn run_error(r: &RunSummary) -> String {
    let short = match (&r.failed_step, &r.last_error) {
        (Some(step), Some(last)) => format!("{step}: {last}"),
        _ => r.error.clone().unwrap_or_default(),
    };
    clip(&short, ERROR_WIDTH)
}

pub(crate) fn run(d: &RunDetail) -> String {
    let r = &d.run;
    let mut out = format!(
        "run {}  workflow {} v{}  status {}\n",
        r.id, r.workflow, r.version, r.status
    );
    let mut facts: Vec<(&str, String)> = vec![("created", format!("{} UTC", time(r.created_at)))];
    if r.run_at > r.created_at {
        facts.push(("due", format!("{} UTC", time(r.run_at))));
    }
    if let Some(c) = r.completed_at {
        facts.push(("finished", format!("{} UTC", time(c))));
    }
    if let Some(ms) = r.duration_ms {
        facts.push(("duration", crate::table::ms(ms)));
    }
    facts.push(("cost", format!("{} cents", r.cost_cents)));
    if let Some(i) = &r.instance_id {
        facts.push(("instance", i.clone()));
    }
    if let Some(f) = d.forked_from {
        let at = d.forked_at.as_deref().unwrap_or("?");
        facts.push(("forked", format!("from run {f} at step {at}")));
    }
    if !d.forks.is_empty() {
        let ids: Vec<String> = d.forks.iter().map(ToString::to_string).collect();
        facts.push(("forks", ids.join(", ")));
    }
    if let Some(p) = &d.parent {
        facts.push(("parent", format!("run {} at {}", p.run_id, step_at(p))));
    }
    facts.push(("input", clip(&d.input.to_string(), 100)));
    if let Some(o) = &d.output {
        facts.push(("output", clip(&o.to_string(), 100)));
    }
    if let Some(e) = &r.error {
        facts.push(("error", e.clone()));
    }
    for (k, v) in facts {
        let _ = writeln!(out, "  {k:<9} {v}");
    }
    out.push('\n');
    let mut t = Table::new(&[
        ("STEP", false),
        ("STATUS", false),
        ("ATTEMPTS", true),
        ("DURATION", true),
        ("WAITED", true),
        ("INSTANCE", false),
        ("ERROR", false),
    ]);
    for s in &d.steps {
        t.row(vec![
            s.name.clone(),
            s.status.to_string(),
            s.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            opt_ms(s.duration_ms),
            opt_ms(s.wait_ms),
            s.instance_id.clone().unwrap_or_default(),
            s.error
                .as_deref()
                .map(|e| clip(e, ERROR_WIDTH))
                .unwrap_or_default(),
        ]);
    }
    out.push_str(&t.render());
    // What the table has no room for: why a step was skipped, a map step's elements.
    for s in &d.steps {
        if let Some(reason) = &s.reason {
            let _ = writeln!(out, "  {}: skipped: {reason}", s.name);
        }
        if let Some(e) = &s.elements {
            let total = e.total.map_or_else(|| "?".to_owned(), |t| t.to_string());
            let mut line = format!(
                "  {}: {} of {total} elements completed",
                s.name, e.completed
            );
            if e.running > 0 {
                let _ = write!(line, ", {} running", e.running);
            }
            if e.queued > 0 {
                let _ = write!(line, ", {} queued", e.queued);
            }
            if let Some(f) = e.failed {
                let _ = write!(line, ", element {f} failed");
            }
            if let Some(ms) = e.slowest_ms {
                let _ = write!(line, ", slowest {}", crate::table::ms(ms));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    if !d.subflows.is_empty() {
        // The tree of child runs, indented by depth, each under the run it belongs to.
        out.push_str("\nSUBFLOWS\n");
        let _ = writeln!(out, "  run {} {}", r.id, r.workflow);
        for c in &d.subflows {
            let indent = "    ".repeat(usize::try_from(c.depth).unwrap_or(1));
            let _ = writeln!(
                out,
                "{indent}└ run {} {} v{}  {}  (from {})",
                c.id,
                c.workflow,
                c.version,
                c.status,
                step_at(&c.parent)
            );
        }
    }
    out
}

/// `step research` or `step research[2]` (an element of a map step).
fn step_at(p: &pgflow_runtime::admin::ParentLink) -> String {
    match p.element {
        Some(e) => format!("step {}[{e}]", p.step),
        None => format!("step {}", p.step),
    }
}

pub(crate) fn costs(c: &pgflow_runtime::admin::Costs) -> String {
    let mut out = format!(
        "Spend recorded in the last {}, by {}\n\n",
        window(c.since_secs),
        c.by
    );
    let mut t = Table::new(&[
        (
            match c.by {
                pgflow_runtime::admin::CostsBy::Workflow => "WORKFLOW",
                pgflow_runtime::admin::CostsBy::Model => "MODEL",
                pgflow_runtime::admin::CostsBy::Key => "KEY",
            },
            false,
        ),
        ("RUNS", true),
        ("ATTEMPTS", true),
        ("TOKENS IN", true),
        ("TOKENS OUT", true),
        ("COST (cents)", true),
    ]);
    let label = |g: &str| {
        if g.is_empty() {
            "(none)".to_owned()
        } else {
            g.to_owned()
        }
    };
    for r in c.rows.iter().chain(c.rows.first().map(|_| &c.total)) {
        t.row(vec![
            label(&r.group),
            r.runs.to_string(),
            r.attempts.to_string(),
            r.tokens_in.to_string(),
            r.tokens_out.to_string(),
            r.cost_cents.to_string(),
        ]);
    }
    section(&mut out, &t, "no usage recorded");
    out
}

pub(crate) fn results(r: &Results) -> String {
    let mut out = format!("Runs finished in the last {}", window(r.since_secs));
    if let Some(w) = &r.workflow {
        let _ = write!(out, " (workflow `{w}`)");
    }
    out.push_str("\n\nBY WORKFLOW\n");
    let mut t = Table::new(&[
        ("WORKFLOW", false),
        ("RUNS", true),
        ("SUCCESS", true),
        ("AVG", true),
        ("P95", true),
        ("COST (cents)", true),
    ]);
    for w in &r.workflows {
        t.row(vec![
            w.workflow.clone(),
            w.count.to_string(),
            percent(w.success_rate),
            ms_f(w.avg_ms),
            ms_f(w.p95_ms),
            w.total_cost_cents.to_string(),
        ]);
    }
    section(&mut out, &t, "no finished runs");

    out.push_str("\nBY INSTANCE\n");
    let mut t = Table::new(&[
        ("INSTANCE", false),
        ("RUNS", true),
        ("SUCCEEDED", true),
        ("FAILED", true),
        ("SHARE", true),
    ]);
    for i in &r.instances {
        t.row(vec![
            i.instance_id.clone().unwrap_or_else(|| "-".to_owned()),
            i.count.to_string(),
            i.succeeded.to_string(),
            i.failed.to_string(),
            percent(i.share),
        ]);
    }
    section(&mut out, &t, "no finished runs");

    out.push_str("\nBY STATUS\n");
    let mut t = Table::new(&[
        ("WORKFLOW", false),
        ("STATUS", false),
        ("RUNS", true),
        ("AVG", true),
        ("COST (cents)", true),
    ]);
    for s in &r.statuses {
        t.row(vec![
            s.workflow.clone(),
            s.status.clone(),
            s.count.to_string(),
            ms_f(s.avg_ms),
            s.total_cost_cents.to_string(),
        ]);
    }
    section(&mut out, &t, "no finished runs");
    out
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

pub(crate) fn retry(r: &RetryReport) -> String {
    let mut out = format!(
        "run {} ({}) is running again\n  reused   {}\n  cleared  {}\n  enqueued {}\n",
        r.id,
        r.workflow,
        list(&r.reused),
        list(&r.cleared),
        list(&r.enqueued)
    );
    for m in &r.resumed {
        let _ = writeln!(
            out,
            "  resumed  {}: {} elements kept, {} run again",
            m.step, m.kept, m.rerun
        );
    }
    out
}

pub(crate) fn fork(r: &ForkReport) -> String {
    format!(
        "run {} ({} v{}) forked from run {} at step {}\n  reused   {}\n  rerun    {}\n  enqueued {}\n",
        r.id,
        r.workflow,
        r.version,
        r.forked_from,
        r.from,
        list(&r.reused),
        list(&r.rerun),
        list(&r.enqueued)
    )
}

pub(crate) fn start(r: &StartReport) -> String {
    if r.created {
        format!("run {} of {} v{} started\n", r.id, r.workflow, r.version)
    } else {
        format!(
            "run {} of {} v{} already holds this idempotency key: not started again\n",
            r.id, r.workflow, r.version
        )
    }
}

/// What `pgflow signal` reports.
#[derive(Debug, serde::Serialize)]
pub(crate) struct SignalReport {
    pub(crate) run_id: i64,
    pub(crate) name: String,
    pub(crate) outcome: pgflow::SignalOutcome,
}

pub(crate) fn signal(r: &SignalReport) -> String {
    let what = match r.outcome {
        pgflow::SignalOutcome::Delivered => "delivered: the waiting step runs now",
        pgflow::SignalOutcome::Kept => "kept: the step receives it when it is reached",
        pgflow::SignalOutcome::Duplicate => {
            "a duplicate: the run already has this signal (the first one wins); recorded, not delivered"
        }
        pgflow::SignalOutcome::TooLate => {
            "too late: the step already ran without it (its timeout passed); recorded, not delivered"
        }
        _ => "sent",
    };
    format!("signal `{}` to run {}: {what}\n", r.name, r.run_id)
}

pub(crate) fn cancel(r: &CancelReport) -> String {
    if r.cancelled && !r.children.is_empty() {
        let ids: Vec<String> = r.children.iter().map(ToString::to_string).collect();
        format!(
            "run {} cancelled, with its child runs {}\n",
            r.id,
            ids.join(", ")
        )
    } else if r.cancelled {
        format!("run {} cancelled\n", r.id)
    } else {
        format!("run {} was already cancelled\n", r.id)
    }
}

pub(crate) fn prune(r: &PruneReport) -> String {
    if r.busy {
        return "another instance is pruning right now: nothing done (try again later)\n"
            .to_owned();
    }
    let verb = match (r.dry_run, r.archived) {
        (true, _) => "would prune",
        (false, true) => "archived",
        (false, false) => "deleted",
    };
    format!(
        "{verb} {} runs ({} step states, {} map elements) that finished before {} UTC\n",
        r.runs,
        r.steps,
        r.elements,
        time(r.cutoff)
    )
}
