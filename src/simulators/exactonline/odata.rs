//! The part of OData that Exact's REST API understands and the simulator needs (docs/vendors.md,
//! Exact Online): entity paths with a key, `$filter` clauses joined by `and` (`eq`, `ne`, `gt`,
//! `ge`, `lt`, `le`), and `__next` links carrying a `$skiptoken`.

use super::*;

/// `Accounts`, `Accounts(guid'…')`, `Divisions(12)`.
pub(super) fn parse_segment(segment: &str) -> Option<(&str, Option<String>)> {
    match segment.split_once('(') {
        None => Some((segment, None)),
        Some((name, rest)) => {
            let key = rest.strip_suffix(')')?;
            let key = key
                .strip_prefix("guid'")
                .and_then(|k| k.strip_suffix('\''))
                .unwrap_or(key);
            Some((name, Some(key.to_lowercase())))
        }
    }
}

pub(super) fn set_of(module: &str, name: &str) -> Option<Set> {
    match (module, name) {
        ("crm", "Accounts") => Some(Set::Accounts),
        ("hrm", "Departments") => Some(Set::Departments),
        ("hrm", "Divisions") => Some(Set::Divisions),
        _ => None,
    }
}

/// One `$filter` clause: `Name eq 'x'`, `Timestamp gt 5`, `Modified ge datetime'…'`.
pub(super) struct Clause {
    field: String,
    op: String,
    value: Value,
}

pub(super) fn parse_filter(filter: &str) -> Result<Vec<Clause>, String> {
    let mut clauses = Vec::new();
    for part in split_and(filter) {
        let part = part.trim();
        let mut pieces = part.splitn(3, ' ');
        let (Some(field), Some(op), Some(literal)) = (pieces.next(), pieces.next(), pieces.next())
        else {
            return Err(format!("cannot parse filter clause `{part}`"));
        };
        let literal = literal.trim();
        let value = if let Some(s) = literal
            .strip_prefix("datetime'")
            .and_then(|s| s.strip_suffix('\''))
        {
            let at = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .map_err(|_| format!("bad datetime `{s}`"))?;
            json!(Utc.from_utc_datetime(&at).timestamp_millis())
        } else if let Some(s) = literal
            .strip_prefix("guid'")
            .and_then(|s| s.strip_suffix('\''))
        {
            json!(s.to_lowercase())
        } else if let Some(s) = literal
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
        {
            json!(s.replace("''", "'"))
        } else if literal == "true" || literal == "false" {
            json!(literal == "true")
        } else if literal == "null" {
            Value::Null
        } else if let Ok(whole) = literal.strip_suffix('L').unwrap_or(literal).parse::<i64>() {
            // Int64 literals (`Timestamp gt 9007199254740993L`) stay exact: no detour via f64.
            json!(whole)
        } else {
            json!(literal
                .parse::<f64>()
                .map_err(|_| format!("bad literal `{literal}`"))?)
        };
        if !matches!(op, "eq" | "gt" | "ge" | "lt" | "le" | "ne") {
            return Err(format!("unsupported operator `{op}`"));
        }
        clauses.push(Clause {
            field: field.to_owned(),
            op: op.to_owned(),
            value,
        });
    }
    Ok(clauses)
}

/// Splits on ` and ` outside quotes.
pub(super) fn split_and(filter: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let chars: Vec<char> = filter.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            quoted = !quoted;
        }
        if !quoted && chars[i..].iter().collect::<String>().starts_with(" and ") {
            parts.push(std::mem::take(&mut current));
            i += 5;
            continue;
        }
        current.push(c);
        i += 1;
    }
    parts.push(current);
    parts
}

pub(super) fn compare(have: &Value, op: &str, want: &Value) -> bool {
    let ordering = match (have, want) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => a.as_f64().partial_cmp(&b.as_f64()),
        },
        (Value::String(a), Value::String(b)) => Some(a.to_lowercase().cmp(&b.to_lowercase())),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Null, Value::Null) => Some(std::cmp::Ordering::Equal),
        _ => None,
    };
    use std::cmp::Ordering::*;
    match (op, ordering) {
        ("eq", Some(Equal)) => true,
        ("ne", o) => o != Some(Equal),
        ("gt", Some(Greater)) => true,
        ("ge", Some(Greater | Equal)) => true,
        ("lt", Some(Less)) => true,
        ("le", Some(Less | Equal)) => true,
        _ => false,
    }
}

pub(super) fn matches(row: &Row, clauses: &[Clause]) -> bool {
    clauses.iter().all(|c| {
        let have = match c.field.as_str() {
            "Modified" => json!(row.modified_ms),
            "Timestamp" => json!(row.timestamp),
            f => row.props.get(f).cloned().unwrap_or(Value::Null),
        };
        compare(&have, &c.op, &c.value)
    })
}

pub(super) fn next_link(
    base: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    skip: usize,
) -> String {
    let mut url = url::Url::parse(&format!("{base}{path}")).expect("simulator URL");
    {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in query {
            if k != "$skiptoken" {
                pairs.append_pair(k, v);
            }
        }
        pairs.append_pair("$skiptoken", &skip.to_string());
    }
    url.to_string()
}
