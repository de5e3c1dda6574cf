//! Printing records the way kubectl does: a table with upper-case headers and columns padded with three
//! spaces (`-o table`, the default), or the records themselves as JSON or YAML.

use serde_json::Value;

/// `-o` / `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Rows of text under headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len(), "one cell per column");
        self.rows.push(row);
    }

    /// kubectl's layout: every column as wide as its widest cell, three spaces between columns, no
    /// trailing spaces. An empty table prints what kubectl prints to stderr, here as the only line.
    pub fn render(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = width - cell.chars().count();
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `value` as pretty JSON or YAML (for [`Format::Table`], the caller renders its own table).
pub fn serialize(value: &Value, format: Format) -> Result<String, String> {
    match format {
        Format::Json | Format::Table => serde_json::to_string_pretty(value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string()),
        Format::Yaml => serde_saphyr::to_string(value).map_err(|e| e.to_string()),
    }
}

/// How long ago `rfc3339` was, as kubectl writes ages: `45s`, `12m`, `5h`, `3d`; `<unknown>` when it
/// does not parse.
pub fn age(rfc3339: &str, now: std::time::SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339(rfc3339) else {
        return "<unknown>".into();
    };
    let secs = now.duration_since(then).map_or(0, |d| d.as_secs());
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The first 8 characters of a commit, as `git log --oneline` would (rather 8 than 7: fewer clashes).
pub fn short_commit(commit: &str) -> String {
    commit.chars().take(8).collect()
}

/// `text` on one line and at most `max` characters, ending in `…` when cut.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn columns_are_padded_like_kubectl_and_lines_have_no_trailing_spaces() {
        let mut table = Table::new(&["ID", "NAME", "MESSAGE"]);
        table.push(vec!["1".into(), "gitops".into(), String::new()]);
        table.push(vec!["12".into(), "a".into(), "boom".into()]);
        assert_eq!(
            table.render("No agents found."),
            "ID   NAME     MESSAGE\n1    gitops\n12   a        boom\n"
        );
        assert_eq!(
            Table::new(&["ID"]).render("No agents found."),
            "No agents found.\n"
        );
    }

    #[test]
    fn ages_are_written_as_kubectl_writes_them() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |ago: u64| {
            humantime::format_rfc3339_seconds(now - Duration::from_secs(ago)).to_string()
        };
        assert_eq!(age(&at(5), now), "5s");
        assert_eq!(age(&at(119), now), "119s");
        assert_eq!(age(&at(600), now), "10m");
        assert_eq!(age(&at(3 * 3600), now), "3h");
        assert_eq!(age(&at(5 * 86400), now), "5d");
        assert_eq!(age("yesterday", now), "<unknown>");
    }

    #[test]
    fn yaml_and_json_carry_the_same_records() {
        let value = serde_json::json!([{ "id": "gid://kas/Clusters::Agent/1", "connected": true }]);
        let yaml = serialize(&value, Format::Yaml).unwrap();
        assert!(yaml.contains("id: gid://kas/Clusters::Agent/1"), "{yaml}");
        assert!(yaml.contains("connected: true"), "{yaml}");
        let json: Value = serde_json::from_str(&serialize(&value, Format::Json).unwrap()).unwrap();
        assert_eq!(json, value);
    }

    #[test]
    fn long_messages_are_cut_to_one_line() {
        assert_eq!(one_line("a\n  b", 10), "a b");
        assert_eq!(one_line("abcdefghijkl", 5), "abcd…");
    }
}
