//! Aligned text tables (rendered by `comfy-table`: widths in terminal columns,
//! long cells wrapped to a terminal's width, colour on a terminal only) and the small
//! formatters the human output uses.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

/// A table with a header row; numeric columns are right-aligned.
pub(crate) struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns as `(header, right_aligned)`.
    pub(crate) fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, two spaces between columns, no trailing spaces; statuses in colour
    /// on a terminal only, long cells wrapped to the terminal's width.
    pub(crate) fn render(&self) -> String {
        use comfy_table::{Cell, CellAlignment, ContentArrangement, presets::NOTHING};
        let mut t = comfy_table::Table::new();
        t.load_preset(NOTHING)
            .set_header(self.headers.iter().map(|h| Cell::new(*h)));
        // Wrap long cells to a real terminal's width; a pipe, or a terminal too
        // narrow to tell, gets whole lines.
        if t.width().is_some_and(|w| w >= 60) {
            t.set_content_arrangement(ContentArrangement::Dynamic);
        }
        for r in &self.rows {
            t.add_row(r.iter().map(|c| styled(c)));
        }
        let last = self.headers.len().saturating_sub(1);
        for (i, col) in t.column_iter_mut().enumerate() {
            col.set_padding((0, if i == last { 0 } else { 2 }));
            col.set_cell_alignment(if self.right.get(i).copied().unwrap_or(false) {
                CellAlignment::Right
            } else {
                CellAlignment::Left
            });
        }
        let mut out = String::new();
        for line in t.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell, in colour when it is a status (only shown on a terminal).
fn styled(text: &str) -> comfy_table::Cell {
    use comfy_table::{Cell, Color};
    let cell = Cell::new(text);
    match text {
        "failed" | "failure" | "offline" => cell.fg(Color::Red),
        "succeeded" | "success" | "completed" | "online" => cell.fg(Color::Green),
        "running" | "queued" | "waiting" | "awaiting signal" | "awaiting_signal"
        | "awaiting subflow" | "awaiting_subflow" => cell.fg(Color::Yellow),
        _ => cell,
    }
}

/// A duration in milliseconds, short and without spaces (one cell for `awk`):
/// `850ms`, `1.25s`, `3m04s`, `2h03m`, `3d04h`.
pub(crate) fn ms(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{:02}s", s, (ms % 1000) / 10),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Like [`ms`] for an average or percentile.
pub(crate) fn ms_f(v: f64) -> String {
    if v.is_finite() {
        // Durations are far below i64::MAX milliseconds.
        #[allow(clippy::cast_possible_truncation)]
        ms(v.round() as i64)
    } else {
        "-".to_owned()
    }
}

pub(crate) fn opt_ms(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), ms)
}

/// A window in seconds the way `--since` takes it: `1h30m`, `7d`, `45s`.
pub(crate) fn window(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut left = secs;
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if left >= n {
            let _ = write!(out, "{}{unit}", left / n);
            left %= n;
        }
    }
    out
}

/// A UTC timestamp to the second.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub(crate) fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

/// The first line of `s`, at most `max` characters (an ellipsis marks a cut).
pub(crate) fn clip(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    let cut = line.chars().count() > max || line.len() < s.trim_end().len();
    if !cut {
        return line.to_owned();
    }
    let mut out: String = line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&[("NAME", false), ("N", true), ("NOTE", false)]);
        t.row(vec!["a".into(), "10".into(), String::new()]);
        t.row(vec!["long name".into(), "2".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "NAME        N  NOTE\na          10\nlong name   2  x\n"
        );
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(ms(850), "850ms");
        assert_eq!(ms(1_250), "1.25s");
        assert_eq!(ms(184_000), "3m04s");
        assert_eq!(ms(7_380_000), "2h03m");
        assert_eq!(ms(273_600_000), "3d04h");
        assert_eq!(ms_f(f64::NAN), "-");
        assert_eq!(window(3_600), "1h");
        assert_eq!(window(5_400), "1h30m");
        assert_eq!(window(7 * 86_400 + 5), "7d5s");
    }

    #[test]
    fn clip_keeps_one_line() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a very long line", 6), "a ver…");
        assert_eq!(clip("two\nlines", 10), "two…");
    }
}
