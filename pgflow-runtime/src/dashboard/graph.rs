//! The step graph of a run (or of a workflow definition) as inline SVG: steps in
//! columns by depth (a step one column right of its deepest parent), edges as
//! curves from parent to child. Each step is a `<g class="node">` carrying
//! `data-step` and `data-state`, so a test (or a script) can read the graph.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::html::{duration, esc};

/// One step to draw.
pub(crate) struct Node<'a> {
    pub(crate) name: &'a str,
    pub(crate) parents: &'a [String],
    /// `completed`, `running`, `failed`, .. (a CSS class `st-<state>`).
    pub(crate) state: &'a str,
    pub(crate) duration_ms: Option<i64>,
    /// A second line (attempts, elements).
    pub(crate) note: Option<String>,
}

const W: i64 = 180;
const H: i64 = 48;
const GAP_X: i64 = 56;
const GAP_Y: i64 = 18;
const PAD: i64 = 8;

/// The SVG of `nodes` (in graph order: parents before children).
pub(crate) fn svg(nodes: &[Node<'_>]) -> String {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    let mut depth = vec![0_i64; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        depth[i] = n
            .parents
            .iter()
            .filter_map(|p| index.get(p.as_str()))
            .filter(|&&p| p < i)
            .map(|&p| depth[p] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut rows_in = HashMap::<i64, i64>::new();
    let mut pos = Vec::with_capacity(nodes.len());
    for d in &depth {
        let row = rows_in.entry(*d).or_insert(0);
        pos.push((PAD + d * (W + GAP_X), PAD + *row * (H + GAP_Y)));
        *row += 1;
    }
    let width = pos.iter().map(|p| p.0 + W + PAD).max().unwrap_or(2 * PAD);
    let height = pos.iter().map(|p| p.1 + H + PAD).max().unwrap_or(2 * PAD);
    let mut out = format!(
        "<svg id=\"graph\" class=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-label=\"step graph\">"
    );
    for (i, n) in nodes.iter().enumerate() {
        for p in n.parents {
            let Some(&j) = index.get(p.as_str()) else {
                continue;
            };
            let (x1, y1) = (pos[j].0 + W, pos[j].1 + H / 2);
            let (x2, y2) = (pos[i].0, pos[i].1 + H / 2);
            let mid = (x1 + x2) / 2;
            let _ = write!(
                out,
                "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" \
                 d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\"/>",
                esc(p),
                esc(n.name)
            );
        }
    }
    for (n, (x, y)) in nodes.iter().zip(&pos) {
        let state: String = n
            .state
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = truncate(n.name, 22);
        let mut second = n.state.replace('_', " ");
        if let Some(ms) = n.duration_ms {
            let _ = write!(second, " · {}", duration(ms));
        }
        if let Some(note) = &n.note {
            let _ = write!(second, " · {note}");
        }
        let _ = write!(
            out,
            "<g class=\"node st-{state}\" data-step=\"{}\" data-state=\"{}\" \
             transform=\"translate({x},{y})\"><title>{}</title>\
             <rect width=\"{W}\" height=\"{H}\" rx=\"6\"/>\
             <text x=\"10\" y=\"19\" class=\"name\">{}</text>\
             <text x=\"10\" y=\"37\" class=\"sub\">{}</text></g>",
            esc(n.name),
            esc(n.state),
            esc(n.name),
            esc(&name),
            esc(&truncate(&second, 30)),
        );
    }
    out.push_str("</svg>");
    out
}

/// `s` cut to `max` characters, with an ellipsis.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_per_step_and_one_edge_per_dependency() {
        let p_a = vec!["a".to_owned()];
        let p_bc = vec!["b".to_owned(), "c".to_owned()];
        let nodes = [
            Node {
                name: "a",
                parents: &[],
                state: "completed",
                duration_ms: Some(5),
                note: None,
            },
            Node {
                name: "b",
                parents: &p_a,
                state: "running",
                duration_ms: None,
                note: None,
            },
            Node {
                name: "c",
                parents: &p_a,
                state: "queued",
                duration_ms: None,
                note: None,
            },
            Node {
                name: "<d>",
                parents: &p_bc,
                state: "not_started",
                duration_ms: None,
                note: None,
            },
        ];
        let svg = svg(&nodes);
        assert_eq!(svg.matches("<g class=\"node").count(), 4);
        assert_eq!(svg.matches("<path class=\"edge\"").count(), 4);
        assert!(svg.contains("data-step=\"&lt;d&gt;\""), "{svg}");
        assert!(!svg.contains("<d>"), "{svg}");
        // b and c share column 1, d is in column 2
        assert!(
            svg.contains("translate(244,8)") && svg.contains("translate(244,74)"),
            "{svg}"
        );
        assert!(svg.contains("translate(480,8)"), "{svg}");
    }
}
