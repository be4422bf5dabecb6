//! HTML building for the dashboard: every piece of text from the database goes
//! through [`Esc`] (or [`esc`]); markup is written only by this module and the
//! pages. There is no template engine: pages are `write!` into a `String`.

use std::fmt::{self, Display, Write as _};

use chrono::{DateTime, Utc};

/// Text escaped for HTML element content and quoted attribute values.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                // NUL and other C0 controls (but tab and newlines) are not valid
                // HTML text: shown as the replacement character
                '\0'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}' => "\u{fffd}",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + c.len_utf8();
        }
        f.write_str(&self.0[last..])
    }
}

/// `s` escaped (see [`Esc`]).
pub(crate) fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

/// Percent-encodes `s` for a URL query value.
pub(crate) fn url_enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration in ms for people: `850 ms`, `2.4 s`, `3 min 5 s`, `2 h 10 min`.
pub(crate) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1e3),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1_000),
        _ => format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

/// A time, UTC, to the second.
pub(crate) fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Cents as dollars: `$1.25`.
pub(crate) fn cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    let c = c.unsigned_abs();
    format!("{sign}${}.{:02}", c / 100, c % 100)
}

/// A status badge (`running`, `succeeded`, `failed`, `queued`, ..).
pub(crate) fn badge(status: &str) -> String {
    let class: String = status
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    format!(
        "<span class=\"badge s-{class}\" data-status=\"{}\">{}</span>",
        esc(status),
        esc(&status.replace('_', " "))
    )
}

/// JSON pretty-printed, escaped, in a `<pre>` with `id`, cut at `max` bytes (a
/// 100 MB output does not become a 100 MB page).
pub(crate) fn json_block(id: &str, value: &serde_json::Value, max: usize) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let (shown, cut) = if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        (&text[..end], Some(text.len()))
    } else {
        (text.as_str(), None)
    };
    let mut out = format!("<pre class=\"json\" id=\"{id}\">{}</pre>", esc(shown));
    if let Some(len) = cut {
        let _ = write!(
            out,
            "<p class=\"muted\">Shown: the first {max} of {len} bytes.</p>"
        );
    }
    out
}

/// The pages of the navigation: (path, title, `data-page`).
const NAV: [(&str, &str, &str); 6] = [
    ("", "Overview", "overview"),
    ("runs", "Runs", "runs"),
    ("queues", "Queues", "queues"),
    ("instances", "Instances", "instances"),
    ("workflows", "Workflows", "workflows"),
    ("schedules", "Schedules", "schedules"),
];

/// A whole page: `controls` (forms: not replaced by live updates) and `body` (the
/// live region) in the layout; `page` names it (`data-page`, the active tab).
/// `base` is the path the dashboard is mounted at (ends with `/`).
pub(crate) fn page(
    base: &str,
    page: &str,
    title: &str,
    read_only: bool,
    controls: &str,
    body: &str,
) -> String {
    let mut out = String::with_capacity(body.len() + 2_048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · pgflow</title>\
         <link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"{base}assets/app.css\">\
         <script src=\"{base}assets/app.js\" defer></script></head><body>\
         <header><a class=\"brand\" href=\"{base}\">pgflow</a><nav>",
        esc(title)
    );
    for (path, name, id) in NAV {
        let active = if id == page || (page == "run" && id == "runs") {
            " class=\"active\" aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(out, "<a href=\"{base}{path}\"{active}>{name}</a>");
    }
    let _ = write!(
        out,
        "</nav><label class=\"live\"><input type=\"checkbox\" id=\"live\" checked> live</label>{}</header>\
         <main id=\"page\" data-page=\"{page}\">{controls}<div id=\"live-region\">{body}</div></main></body></html>",
        if read_only {
            "<span class=\"badge s-read_only\" id=\"read-only\">read-only</span>"
        } else {
            ""
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_controls() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\"\0").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;\u{fffd}"
        );
        assert_eq!(
            esc("plain ünïcode\nline").to_string(),
            "plain ünïcode\nline"
        );
    }

    #[test]
    fn formats_numbers_for_people() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(2_400), "2.4 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(cents(-125), "-$1.25");
        assert_eq!(url_enc("a b&c=é"), "a%20b%26c%3D%C3%A9");
    }

    #[test]
    fn cuts_long_json_on_a_char_boundary() {
        let v = serde_json::Value::String("é".repeat(100));
        let html = json_block("out", &v, 11);
        assert!(html.contains("Shown: the first 11 of"), "{html}");
    }
}
