//! The console's markup (maud escapes every interpolated value). No page renders a secret: the
//! configuration is shown only as "connected" or not.

use maud::{html, Markup, DOCTYPE};

use crate::admin::explain::RecordExplanation;
use crate::admin::status::{DeadLetterView, FlowStatus, SystemStatus};
use crate::admin::AdminState;
use crate::backfill::store::Progress;
use crate::backfill::Summary;
use crate::domain::SystemId;
use crate::ops::gauges::QueueState;

/// A queue older than this is flagged on the overview (the alert rule uses the same 5 minutes).
const OLDEST_READY_WARN_SECONDS: f64 = 300.0;

/// What every logged-in page needs: the form token and which nav entry is current.
pub struct Ctx {
    csrf: String,
    here: &'static str,
}

impl Ctx {
    pub fn new(state: &AdminState, session: &str, here: &'static str) -> Ctx {
        Ctx {
            csrf: state.auth.csrf_token(session),
            here,
        }
    }
}

/// The record search form's values, echoed back.
pub struct RecordForm {
    pub system: String,
    pub entity_type: String,
    pub id: String,
}

fn document(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tether" }
                link rel="stylesheet" href="/admin/console.css";
                link rel="icon" type="image/svg+xml" href="/admin/favicon.svg";
            }
            body { (body) }
        }
    }
}

fn layout(ctx: &Ctx, title: &str, content: Markup) -> Markup {
    let nav = [
        ("overview", "/admin", "Overview"),
        ("records", "/admin/records", "Records"),
        ("dead-letters", "/admin/dead-letters", "Dead letters"),
        ("backfill", "/admin/backfill", "Backfill"),
    ];
    document(
        title,
        html! {
            header {
                div.bar {
                    span.brand { "Tether" }
                    nav {
                        @for (id, href, label) in nav {
                            a href=(href) class=[(id == ctx.here).then_some("here")] { (label) }
                        }
                    }
                    form.inline method="post" action="/admin/logout" {
                        input type="hidden" name="csrf" value=(ctx.csrf);
                        button type="submit" id="logout" { "Log out" }
                    }
                }
            }
            main { (content) }
        },
    )
}

fn notice(text: Option<&str>) -> Markup {
    html! { @if let Some(t) = text { div.notice id="notice" { (t) } } }
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> Markup {
    match t {
        Some(t) => html! { span title=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } },
        None => html! { span.muted { "never" } },
    }
}

fn csrf_field(ctx: &Ctx) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.csrf); }
}

/// The URL path segment of a flow id (ids hold `->`).
fn flow_path(flow: &str) -> String {
    url::form_urlencoded::byte_serialize(flow.as_bytes()).collect::<String>()
}

pub fn login(nonce: &str, problem: Option<&str>) -> Markup {
    document(
        "Log in",
        html! {
            main {
                section.panel.login {
                    h1 { "Tether console" }
                    p.muted { "Log in with the admin token (configuration key " code { "admin.token" } ")." }
                    @if let Some(p) = problem { p.bad id="login-problem" { (p) } }
                    form method="post" action="/admin/login" {
                        input type="hidden" name="csrf" value=(nonce);
                        label for="token" { "Admin token" }
                        input type="password" id="token" name="token" autocomplete="current-password" required;
                        button type="submit" id="login" { "Log in" }
                    }
                }
            }
        },
    )
}

pub fn error(message: &str) -> Markup {
    document(
        "Problem",
        html! { main { section.panel { h1 { "Something needs attention" } p id="problem" { (message) } p { a href="/admin" { "Back to the overview" } } } } },
    )
}

/// What needs an operator first, most urgent first.
fn attention(
    systems: &[SystemStatus],
    flows: &[FlowStatus],
    queue: &QueueState,
) -> Vec<(&'static str, Markup)> {
    let mut items = Vec::new();
    if queue.dead > 0 {
        items.push(("bad", html! { (queue.dead) " dead letter(s): " a href="/admin/dead-letters" { "review and retry" } }));
    }
    for s in systems.iter().filter(|s| s.connected && !s.credentials_ok) {
        items.push(("bad", html! { (s.name) ": " (s.credentials_problem.as_deref().unwrap_or("credentials refused")) }));
    }
    if queue.oldest_ready_seconds > OLDEST_READY_WARN_SECONDS {
        items.push(("warn", html! { "The oldest due job has waited " (format!("{:.0}", queue.oldest_ready_seconds)) " s: the workers are behind." }));
    }
    for s in systems.iter().filter(|s| s.connected) {
        if let Some(e) = &s.last_poll_error {
            items.push((
                "warn",
                html! { (s.name) " polling failed: " span.error-text { (e) } },
            ));
        }
    }
    for f in flows.iter().filter(|f| f.paused) {
        items.push(("warn", html! { code { (f.id) } " is paused." }));
    }
    items
}

pub fn overview(
    ctx: &Ctx,
    systems: &[SystemStatus],
    flows: &[FlowStatus],
    queue: &QueueState,
    note: Option<&str>,
) -> Markup {
    let items = attention(systems, flows, queue);
    let content = html! {
        h1 { "Overview" }
        (notice(note))
        section.panel id="attention" {
            h2.first { "Needs attention" }
            @if items.is_empty() {
                ul.attention { li.ok { "Nothing: every connected system answers and no job is stuck." } }
            } @else {
                ul.attention { @for (class, item) in &items { li class=(class) { (item) } } }
            }
        }
        (queue_cards(queue))
        (systems_table(systems))
        (flows_table(ctx, flows))
    };
    layout(ctx, "Overview", content)
}

fn queue_cards(q: &QueueState) -> Markup {
    let cards = [
        ("Ready", q.ready.to_string(), ""),
        ("Running", q.running.to_string(), ""),
        (
            "Retrying",
            q.retrying.to_string(),
            if q.retrying > 0 { "warn" } else { "" },
        ),
        (
            "Dead letters",
            q.dead.to_string(),
            if q.dead > 0 { "bad" } else { "" },
        ),
        (
            "Oldest due job",
            format!("{:.0} s", q.oldest_ready_seconds),
            if q.oldest_ready_seconds > OLDEST_READY_WARN_SECONDS {
                "warn"
            } else {
                ""
            },
        ),
    ];
    html! {
        h2 { "Queue" }
        div.cards id="queue" {
            @for (label, n, class) in cards { div.card { div.n class=(class) { (n) } div.l { (label) } } }
        }
    }
}

fn systems_table(systems: &[SystemStatus]) -> Markup {
    html! {
        h2 { "Systems" }
        section.panel {
            table id="systems" {
                thead { tr { th { "System" } th { "Connected" } th { "Credentials" } th { "Last webhook" } th { "Last poll" } th { "Paused flows" } } }
                tbody {
                    @for s in systems {
                        tr {
                            td { strong { (s.name) } br; span.muted.mono { (s.system) } }
                            td { @if s.connected { span.chip.ok { "connected" } } @else { span.chip { "not connected" } } }
                            td { @if !s.connected { span.muted { "—" } } @else if s.credentials_ok { span.chip.ok { "ok" } } @else { span.chip.bad { "refused" } } }
                            td { (when(s.last_delivery)) }
                            td { (when(s.last_poll)) @if let Some(e) = &s.last_poll_error { br; span.error-text { (e) } } }
                            td { @if s.paused_flows.is_empty() { span.muted { "none" } } @else { (s.paused_flows.len()) } }
                        }
                    }
                }
            }
        }
    }
}

fn flows_table(ctx: &Ctx, flows: &[FlowStatus]) -> Markup {
    html! {
        h2 { "Dataflows" }
        section.panel {
            table id="flows" {
                thead { tr { th { "Dataflow" } th { "Links" } th { "Recent decisions" } th { "Last errors" } th { "" } } }
                tbody {
                    @for f in flows {
                        tr {
                            td {
                                code { (f.source) } " → " code { (f.target) }
                                @if !f.enabled { " " span.chip { "switched off" } }
                                @if f.paused { " " span.chip.warn { "paused" } }
                            }
                            td { (f.links_active) @if f.links_ended > 0 { span.muted { " (+" (f.links_ended) " ended)" } } }
                            td { @for (d, n) in &f.decisions { span.chip { (d) " " (n) } } }
                            td { @for e in &f.last_errors { div.error-text title=(e.at.to_rfc3339()) { (e.error) } } }
                            td {
                                @let action = if f.paused { "resume" } else { "pause" };
                                form.inline method="post" action=(format!("/admin/flows/{}/{action}", flow_path(&f.id))) {
                                    (csrf_field(ctx))
                                    button.secondary type="submit" { @if f.paused { "Resume" } @else { "Pause" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn record_search(form: Option<&RecordForm>) -> Markup {
    let (system, entity_type, id) = form.map_or(("", "", ""), |f| {
        (f.system.as_str(), f.entity_type.as_str(), f.id.as_str())
    });
    html! {
        section.panel {
            form.search method="get" action="/admin/records" id="record-search" {
                label { "System" select name="system" id="system" {
                    @for s in SystemId::ALL { option value=(s.as_str()) selected[s.as_str() == system] { (s.display_name()) } }
                } }
                label { "Entity type" input type="text" name="entity_type" id="entity_type" value=(entity_type) placeholder="Organizations" required; }
                label { "Record id" input type="text" name="id" id="record_id" value=(id) required; }
                button type="submit" id="explain" { "Explain" }
            }
        }
    }
}

pub fn records_problem(ctx: &Ctx, form: &RecordForm, problem: &str) -> Markup {
    layout(
        ctx,
        "Records",
        html! { h1 { "Records" } (record_search(Some(form))) p.bad { (problem) } },
    )
}

pub fn records(ctx: &Ctx, form: Option<&RecordForm>, x: Option<&RecordExplanation>) -> Markup {
    let content = html! {
        h1 { "Records" }
        p.muted { "Why a record is, or is not, in sync: its links and every decision Tether made about it." }
        (record_search(form))
        @if let Some(x) = x { (explanation(x)) }
    };
    layout(ctx, "Records", content)
}

fn explanation(x: &RecordExplanation) -> Markup {
    html! {
        section.panel id="explanation" {
            h2.first { code { (x.record) } }
            @if let Some(n) = &x.not_synced {
                p id="not-synced" { span.chip.warn { "not synced" } " " strong { (format!("{:?}", n.reason)) } " — " (n.detail) }
            } @else {
                p { span.chip.ok { "linked" } }
            }
            p.muted { (x.jobs_pending) " job(s) pending, " (x.jobs_dead) " dead" }
            @if !x.links.is_empty() {
                h2 { "Links" }
                table id="links" {
                    thead { tr { th { "Link" } th { "Dataflow" } th { "Source" } th { "Target" } th { "State" } } }
                    tbody { @for l in &x.links { tr {
                        td { (l.id) } td { code { (l.flow_id) } } td.mono { (l.source) } td.mono { (l.target) }
                        td { (l.state) @if let Some(r) = &l.end_reason { span.muted { " (" (r) ")" } } }
                    } } }
                }
            }
            h2 { "Decisions" }
            @if x.history.is_empty() { p.muted { "No decision recorded." } } @else {
                table id="decisions" {
                    thead { tr { th { "When" } th { "Dataflow" } th { "Decision" } th { "Detail" } } }
                    tbody { @for e in &x.history { tr {
                        td { (when(Some(e.at))) }
                        td { @if let Some(f) = &e.flow_id { code { (f) } } }
                        td { span.chip { (e.decision) } }
                        td {
                            @if let Some(d) = &e.detail { div { (d) } }
                            @if let Some(err) = &e.error { div.error-text { (err) } }
                            @if let Some(w) = &e.written { pre { (w) } }
                        }
                    } } }
                }
            }
        }
    }
}

pub fn dead_letters(ctx: &Ctx, letters: &[DeadLetterView], note: Option<&str>) -> Markup {
    let content = html! {
        h1 { "Dead letters" }
        (notice(note))
        p.muted { "Jobs that failed on every attempt. Retrying puts one back in the queue with all its attempts." }
        section.panel {
            @if letters.is_empty() { p id="no-dead-letters" { "No dead letters." } } @else {
                table id="dead-letters" {
                    thead { tr { th { "Job" } th { "Record" } th { "Attempts" } th { "Failed at" } th { "Last error" } th { "" } } }
                    tbody { @for d in letters { tr id=(format!("dead-{}", d.id)) {
                        td { (d.id) }
                        td { a.mono href=(record_link(&d.record)) { (d.record) } }
                        td { (d.attempts) @if d.deferrals > 0 { span.muted { " (+" (d.deferrals) " deferred)" } } }
                        td { (when(d.finished_at)) }
                        td.error-text { (d.last_error.as_deref().unwrap_or("")) }
                        td { form.inline method="post" action=(format!("/admin/dead-letters/{}/retry", d.id)) {
                            (csrf_field(ctx))
                            button type="submit" id=(format!("retry-{}", d.id)) { "Retry" }
                        } }
                    } } }
                }
            }
        }
    };
    layout(ctx, "Dead letters", content)
}

/// The records page of a `system/Type/id` record key.
fn record_link(record: &str) -> String {
    let mut parts = record.splitn(3, '/');
    let (s, t, i) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("system", s)
        .append_pair("entity_type", t)
        .append_pair("id", i)
        .finish();
    format!("/admin/records?{query}")
}

pub fn backfill(ctx: &Ctx, plans: &[(Summary, Progress)]) -> Markup {
    let content = html! {
        h1 { "Backfill" }
        p.muted { "Plans made with " code { "tether backfill plan" } " and run with " code { "tether backfill run <plan>" } " (docs/backfill.md)." }
        section.panel id="backfill" {
            @if plans.is_empty() { p id="no-backfill-plans" { "No backfill plan yet." } } @else {
                table id="backfill-plans" {
                    thead { tr { th { "Plan" } th { "Flows" } th { "Linked" } th { "Link" } th { "Create" } th { "Conflict" } th { "Skip" } th { "Estimate" } th { "Run" } } }
                    tbody { @for (s, p) in plans { tr id=(format!("plan-{}", s.plan)) {
                        td { (s.plan) }
                        td { (s.flows.iter().filter(|f| f.linked + f.link + f.create + f.conflict + f.skip > 0).count()) }
                        td { (s.flows.iter().map(|f| f.linked).sum::<u64>()) }
                        td { (s.flows.iter().map(|f| f.link).sum::<u64>()) }
                        td { (s.flows.iter().map(|f| f.create).sum::<u64>()) }
                        td { (s.flows.iter().map(|f| f.conflict).sum::<u64>()) }
                        td { (s.flows.iter().map(|f| f.skip).sum::<u64>()) }
                        td { (crate::backfill::report::duration(s.estimated_seconds)) }
                        td { (run_state(p)) }
                    } } }
                }
            }
        }
    };
    layout(ctx, "Backfill", content)
}

/// Where a plan's run stands, in words.
fn run_state(p: &Progress) -> String {
    match (p.enqueued, p.finished()) {
        (false, _) => "not run".to_owned(),
        (true, false) => format!(
            "running: {} of {} ({} failed)",
            p.done + p.failed,
            p.total,
            p.failed
        ),
        (true, true) => format!("finished: {} carried out, {} failed", p.done, p.failed),
    }
}
