//! Zendesk's time-based incremental exports: organizations and ticket events (docs/vendors.md,
//! Zendesk "Incremental exports" and "Comments come from the ticket-event export").
//!
//! Both take a `start_time` at least a minute old, answer `end_time` (the next `start_time`) and
//! `end_of_stream`, and repeat the items of the boundary second on the next page; the cursor keeps
//! the ids already returned at that second so nothing is returned twice. Comments are read from
//! `incremental/ticket_events?include=comment_events`: one call per page, not one listing per
//! changed ticket; a redaction or a privacy change re-reads the comment as it is now.

use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::Value;

use super::{
    array, as_id, comment_record, malformed, record, Entity, ExportCursor, ZendeskConnector,
    EXPORT_MIN_AGE_SECS, MAX_EXPORT_PAGE,
};
use crate::connectors::{ChangePage, ConnectorError, Record};

/// One page of a time-based export, past the items the cursor already covers.
struct TimedPage {
    items: Vec<Value>,
    next: ExportCursor,
    has_more: bool,
}

/// The id an item is deduplicated by and the second it belongs to.
type Stamp = fn(&Value) -> Result<(String, i64), ConnectorError>;

fn organization_stamp(item: &Value) -> Result<(String, i64), ConnectorError> {
    let record = record(Entity::Organizations, item)?;
    let second = record.updated_at.map(|t| t.timestamp()).unwrap_or(0);
    Ok((record.id, second))
}

fn event_stamp(item: &Value) -> Result<(String, i64), ConnectorError> {
    let id = as_id(&item["id"]).ok_or_else(|| malformed("a ticket event without a numeric id"))?;
    let second = item["timestamp"]
        .as_i64()
        .ok_or_else(|| malformed("a ticket event without a `timestamp`"))?;
    Ok((id.to_string(), second))
}

/// The page's items the cursor has not returned yet (the export repeats items at the boundary
/// second), and the ids of those stamped with the page's `end_time`.
fn new_items(
    page: Vec<Value>,
    cursor: &ExportCursor,
    end_time: i64,
    stamp: Stamp,
) -> Result<(Vec<Value>, Vec<String>), ConnectorError> {
    let mut items = Vec::new();
    let mut at_end = Vec::new();
    for item in page {
        let (id, second) = stamp(&item)?;
        if second < cursor.start || (second == cursor.start && cursor.seen.contains(&id)) {
            continue;
        }
        if second == end_time {
            at_end.push(id);
        }
        items.push(item);
    }
    Ok((items, at_end))
}

/// Where the next page starts: after `end_time`, remembering the ids already returned from it.
fn next_cursor(
    cursor: ExportCursor,
    end_time: i64,
    end_of_stream: bool,
    at_end: Vec<String>,
) -> ExportCursor {
    if end_time != cursor.start {
        return ExportCursor {
            start: end_time,
            seen: at_end,
            ..ExportCursor::default()
        };
    }
    if end_of_stream {
        let mut seen = cursor.seen;
        seen.extend(at_end);
        return ExportCursor {
            start: end_time,
            seen,
            ..ExportCursor::default()
        };
    }
    // A full page within one second: Zendesk pages hold the whole last second, so the next page
    // starts after it (and this cannot loop).
    ExportCursor {
        start: end_time + 1,
        ..ExportCursor::default()
    }
}

impl ZendeskConnector {
    async fn timed_page(
        &self,
        path: &str,
        key: &str,
        extra: &[(&str, String)],
        cursor: ExportCursor,
        stamp: Stamp,
    ) -> Result<TimedPage, ConnectorError> {
        // Zendesk refuses a `start_time` less than a minute old; ask from a minute back and drop
        // what the cursor already covers.
        let sent_start = cursor
            .start
            .min(Utc::now().timestamp() - EXPORT_MIN_AGE_SECS);
        // Asked from a minute back, the page starts with items the cursor already covers and the
        // next page could only be asked from the same minute back again: ask for the largest page,
        // so the last minute's changes fit in one. If they do not, the rest are read once the
        // minute has passed and `start_time` can be the cursor itself.
        let per_page = if sent_start < cursor.start {
            MAX_EXPORT_PAGE
        } else {
            self.export_page_size
        };
        let mut query = vec![
            ("start_time", sent_start.to_string()),
            ("per_page", per_page.to_string()),
        ];
        query.extend(extra.iter().cloned());
        let page = self.get_export(self.url(path, &query)).await?;
        let end_of_stream = page["end_of_stream"].as_bool().unwrap_or(true);
        let end_time = page["end_time"].as_i64().unwrap_or(sent_start);
        if end_time < cursor.start {
            // The page lies wholly before the cursor (only when asking from a minute back): all
            // of it was returned before. Caught up until the minute has passed.
            return Ok(TimedPage {
                items: Vec::new(),
                next: cursor,
                has_more: false,
            });
        }
        let (items, at_end) = new_items(array(&page, key)?, &cursor, end_time, stamp)?;
        let next = next_cursor(cursor, end_time, end_of_stream, at_end);
        Ok(TimedPage {
            items,
            next,
            has_more: !end_of_stream,
        })
    }

    pub(super) async fn list_organizations(
        &self,
        cursor: ExportCursor,
    ) -> Result<ChangePage, ConnectorError> {
        let page = self
            .timed_page(
                "/api/v2/incremental/organizations",
                "organizations",
                &[],
                cursor,
                organization_stamp,
            )
            .await?;
        let records = page
            .items
            .iter()
            .map(|item| record(Entity::Organizations, item))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChangePage {
            records,
            next_cursor: Some(page.next.encode()),
            has_more: page.has_more,
        })
    }

    /// Comments added, redacted or made private since the cursor, each once per page, as they
    /// are now.
    pub(super) async fn list_comments_changed(
        &self,
        cursor: ExportCursor,
    ) -> Result<ChangePage, ConnectorError> {
        let page = self
            .timed_page(
                "/api/v2/incremental/ticket_events",
                "ticket_events",
                &[("include", "comment_events".to_owned())],
                cursor,
                event_stamp,
            )
            .await?;
        let mut comments: BTreeMap<String, Record> = BTreeMap::new();
        let mut reread: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for event in &page.items {
            let ticket_id = as_id(&event["ticket_id"])
                .ok_or_else(|| malformed("a ticket event without a numeric ticket_id"))?;
            for child in event["child_events"].as_array().into_iter().flatten() {
                match child["event_type"].as_str().or(child["type"].as_str()) {
                    Some("Comment") => {
                        let mut child = child.clone();
                        if child.get("created_at").is_none() {
                            child["created_at"] = event["created_at"].clone();
                        }
                        if let Some(object) = child.as_object_mut() {
                            object.remove("event_type");
                        }
                        let comment = comment_record(ticket_id, &child)?;
                        comments.insert(comment.id.clone(), comment);
                    }
                    Some("CommentRedactionEvent" | "CommentPrivacyChange") => {
                        let comment_id = as_id(&child["comment_id"])
                            .ok_or_else(|| malformed("a comment event without a comment_id"))?;
                        reread.entry(ticket_id).or_default().push(comment_id);
                    }
                    _ => {}
                }
            }
        }
        for (ticket_id, changed) in reread {
            // A ticket deleted since has no comments to show: its links end through the ticket.
            for comment in self.comments_of(ticket_id).await?.unwrap_or_default() {
                let comment_id = comment.id.rsplit(':').next().and_then(|c| c.parse().ok());
                if comment_id.is_some_and(|c: u64| changed.contains(&c)) {
                    comments.insert(comment.id.clone(), comment);
                }
            }
        }
        Ok(ChangePage {
            records: comments.into_values().collect(),
            next_cursor: Some(page.next.encode()),
            has_more: page.has_more,
        })
    }
}
