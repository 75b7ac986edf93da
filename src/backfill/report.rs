//! What `tether backfill plan` and `status` print: a table per flow, the JSON of the issue, the
//! per-record CSV.

use std::fmt::Write as _;

use super::store::{ItemRow, Progress};
use super::{FlowCounts, Summary};

/// The table: one block per flow with its counts, then the calls and the estimate.
pub fn table(s: &Summary) -> String {
    let mut out = format!("backfill plan {}\n", s.plan);
    let (empty, flows): (Vec<&FlowCounts>, Vec<&FlowCounts>) = s
        .flows
        .iter()
        .partition(|f| f.linked + f.link + f.create + f.conflict + f.skip == 0);
    for f in flows {
        let _ = writeln!(out, "\n  {}", f.flow);
        for (label, n) in [
            ("already linked", f.linked),
            ("link to an existing record", f.link),
            ("create", f.create),
            ("conflict (review)", f.conflict),
            ("skip", f.skip),
        ] {
            let _ = writeln!(out, "    {label:<28} {n:>8}");
        }
        let _ = writeln!(out, "    {:<28} {:>8}", "values written by links", f.writes);
    }
    if !empty.is_empty() {
        let _ = writeln!(
            out,
            "\n  {} more flow(s) with no records on either side",
            empty.len()
        );
    }
    let _ = writeln!(out, "\n  vendor calls to run it:");
    for (system, n) in &s.vendor_calls {
        let _ = writeln!(out, "    {system:<28} {n:>8}");
    }
    let _ = writeln!(
        out,
        "  records to run: {}; estimated time at the vendors' limits: {}",
        s.records_to_run,
        duration(s.estimated_seconds)
    );
    out
}

/// `1h 02m 03s`, `4m 05s`, `6s`.
pub fn duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s:02}s"),
        _ => format!("{h}h {m:02}m {s:02}s"),
    }
}

/// The summary as JSON, keys in the issue's order.
pub fn json(s: &Summary) -> String {
    serde_json::to_string(s).expect("a summary serializes")
}

/// The items as CSV (RFC 4180: fields with a comma, quote or line break are quoted).
pub fn csv(items: &[ItemRow]) -> String {
    let mut out = String::from("flow,source_id,verdict,target_id,reason,writes,detail\n");
    for i in items {
        let fields = [
            i.flow.as_str(),
            i.source_id.as_str(),
            i.verdict.as_str(),
            i.target_id.as_deref().unwrap_or(""),
            i.reason.as_deref().unwrap_or(""),
            &i.writes.to_string(),
            i.detail.as_deref().unwrap_or(""),
        ]
        .map(csv_field);
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `tether backfill status`: the plan's figures and where its run stands.
pub fn status(
    s: &Summary,
    p: &Progress,
    decisions: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut out = table(s);
    if !p.enqueued {
        let _ = writeln!(out, "\nnot run yet: `tether backfill run {}`", s.plan);
        return out;
    }
    let _ = writeln!(
        out,
        "\nrun: {} of {} items carried out, {} failed (dead letters: `tether dead-letters list`){}",
        p.done,
        p.total,
        p.failed,
        if p.finished() { "; finished" } else { "" }
    );
    for (result, n) in &p.results {
        let _ = writeln!(out, "    {result:<28} {n:>8}");
    }
    if !decisions.is_empty() {
        let _ = writeln!(out, "  the engine's decisions:");
        for (d, n) in decisions {
            let _ = writeln!(out, "    {d:<28} {n:>8}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::FlowCounts;

    #[test]
    fn json_has_exactly_the_issue_shape_first() {
        let s = Summary {
            plan: 7,
            flows: vec![FlowCounts {
                flow: "zendesk.Organizations->customerp.Customer".into(),
                linked: 1,
                link: 2,
                create: 3,
                conflict: 4,
                skip: 5,
                writes: 6,
            }],
            vendor_calls: [("zendesk".to_owned(), 10u64)].into(),
            estimated_seconds: 3,
            records_to_run: 5,
        };
        assert_eq!(
            json(&s),
            r#"{"plan":7,"flows":[{"flow":"zendesk.Organizations->customerp.Customer","linked":1,"link":2,"create":3,"conflict":4,"skip":5,"writes":6}],"vendor_calls":{"zendesk":10},"estimated_seconds":3,"records_to_run":5}"#
        );
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let row = ItemRow {
            flow: "a->b".into(),
            source_id: "1".into(),
            verdict: "conflict".into(),
            target_id: Some("9".into()),
            reason: Some("several_candidates".into()),
            detail: Some("2 target records match: 9, 10".into()),
            writes: 0,
        };
        assert_eq!(
            csv(&[row]),
            "flow,source_id,verdict,target_id,reason,writes,detail\n\
             a->b,1,conflict,9,several_candidates,0,\"2 target records match: 9, 10\"\n"
        );
        assert_eq!(duration(3723), "1h 02m 03s");
        assert_eq!(duration(65), "1m 05s");
    }
}
