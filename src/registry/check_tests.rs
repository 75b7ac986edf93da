//! Tests of `registry::check`.

use super::*;
use crate::registry::load::assemble;

fn run(text: &str) -> (Registry, Vec<Finding>) {
    assemble(&[("t.toml", text)], None).expect("parses")
}

/// The one finding of this severity; fails listing all findings otherwise.
fn only(findings: &[Finding], severity: Severity) -> &Finding {
    let matching: Vec<&Finding> = findings.iter().filter(|f| f.severity == severity).collect();
    assert_eq!(matching.len(), 1, "{findings:#?}");
    matching[0]
}

fn line(f: &Finding) -> usize {
    f.location.as_ref().expect("located").line
}

const ORG_FROM_ACCOUNTS: &str = r#"
[[dataflow]]
source = "exactonline.Accounts"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "Name"
target = "name"
type = "string"
"#;

#[test]
fn a_clean_registry_has_no_findings() {
    let (registry, findings) = run(ORG_FROM_ACCOUNTS);
    assert!(findings.is_empty(), "{findings:#?}");
    assert!(registry.dataflows[0].switches.create_in_target);
}

#[test]
fn unknown_system_is_an_error() {
    let (registry, findings) = run(&ORG_FROM_ACCOUNTS.replace("exactonline.", "exact."));
    let f = only(&findings, Severity::Error);
    assert_eq!(line(f), 3);
    assert!(f.message.contains("unknown system \"exact\""), "{f}");
    assert!(registry.dataflows.is_empty());
}

#[test]
fn unknown_type_is_an_error() {
    let (_, findings) =
        run(&ORG_FROM_ACCOUNTS.replace("zendesk.Organizations", "zendesk.Organisations"));
    let f = only(&findings, Severity::Error);
    assert_eq!(line(f), 2);
    assert!(
        f.message.contains("no entity type \"Organisations\""),
        "{f}"
    );
    let (_, findings) = run(&ORG_FROM_ACCOUNTS.replace("zendesk.Organizations", "Organizations"));
    assert!(only(&findings, Severity::Error)
        .message
        .contains("system.Type"));
}

#[test]
fn unknown_property_is_an_error() {
    let (_, findings) =
        run(&ORG_FROM_ACCOUNTS.replace("target = \"name\"", "target = \"website\""));
    let errors: Vec<_> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    assert_eq!(errors.len(), 1, "{findings:#?}");
    assert_eq!(line(errors[0]), 6);
    assert!(errors[0].message.contains("`website`"), "{}", errors[0]);
    // Without a mapping for `name`, the flow also cannot create: a warning, not an error.
    assert!(findings
        .iter()
        .any(|f| f.severity == Severity::Warning && f.message.contains("cannot create")));

    let text =
        format!("{ORG_FROM_ACCOUNTS}\n[[dataflow.merge]]\nsource = \"Nmae\"\ntarget = \"name\"\n");
    let f = only(&run(&text).1, Severity::Error).clone();
    assert!(
        f.message.contains("`Nmae`") && f.message.contains("merge criterion"),
        "{f}"
    );
}

#[test]
fn unknown_data_type_is_an_error() {
    let (_, findings) = run(&ORG_FROM_ACCOUNTS.replace("\"string\"", "\"text\""));
    let f = only(&findings, Severity::Error);
    assert!(f.message.contains("data type \"text\""), "{f}");
}

const TWO_WRITERS: &str = r#"
[[dataflow]]
source = "exactonline.Accounts"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "Name"
target = "name"
type = "string"

[[dataflow.merge]]
source = "Name"
target = "name"

[[dataflow]]
source = "poweroffice.Customers"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "Name"
target = "name"
type = "string"
"#;

#[test]
fn a_property_written_by_two_flows_needs_a_rule() {
    let (_, findings) = run(TWO_WRITERS);
    let f = only(&findings, Severity::Error);
    assert_eq!(line(f), 6);
    assert!(
        f.message
            .contains("zendesk.Organizations.name is written by 2 dataflows"),
        "{f}"
    );

    // Without merge criteria each flow only writes the organizations it created.
    let (_, findings) = run(&TWO_WRITERS.replace(
        "[[dataflow.merge]]\nsource = \"Name\"\ntarget = \"name\"\n",
        "",
    ));
    assert!(findings.is_empty(), "{findings:#?}");

    // Writing back to the source counts as a writer too.
    let text = format!(
        "{ORG_FROM_ACCOUNTS}\n[[dataflow]]\nsource = \"zendesk.Organizations\"\ntarget = \"customerp.Customer\"\n\n[[dataflow.property]]\nsource = \"name\"\ntarget = \"title\"\ntype = \"string\"\n"
    );
    let f = only(&run(&text).1, Severity::Error).clone();
    assert!(f.message.contains("(written back)"), "{f}");

    let ruled = format!("{TWO_WRITERS}\n[[rule]]\nentity = \"zendesk.Organizations\"\nproperty = \"name\"\nresolve = \"latest_wins\"\n");
    assert!(run(&ruled).1.is_empty());
    let owned = format!("{TWO_WRITERS}\n[[rule]]\nentity = \"zendesk.Organizations\"\nproperty = \"name\"\nresolve = \"owner\"\nowner = \"poweroffice.Customers->zendesk.Organizations\"\n");
    assert!(run(&owned).1.is_empty());
}

#[test]
fn rules_must_name_a_real_property_and_a_writing_owner() {
    let bad_owner = format!("{TWO_WRITERS}\n[[rule]]\nentity = \"zendesk.Organizations\"\nproperty = \"name\"\nresolve = \"owner\"\nowner = \"zendesk.Users->crmoffice.Contacts\"\n");
    let f = only(&run(&bad_owner).1, Severity::Error).clone();
    assert_eq!(line(&f), 24);
    assert!(f.message.contains("not a dataflow that writes"), "{f}");
    let bad_property =
        "[[rule]]\nentity = \"zendesk.Users\"\nproperty = \"nope\"\nresolve = \"latest_wins\"\n";
    let f = only(&run(bad_property).1, Severity::Error).clone();
    assert!(f.message.contains("names a property"), "{f}");
    let bad_resolution =
        "[[rule]]\nentity = \"zendesk.Users\"\nproperty = \"name\"\nresolve = \"first_wins\"\n";
    let f = only(&run(bad_resolution).1, Severity::Error).clone();
    assert!(f.message.contains("not a rule"), "{f}");
}

const EMPLOYEES: &str = r#"
[[dataflow]]
source = "poweroffice.Employees"
target = "zendesk.Users"
create_in_target = false

[[dataflow.merge]]
source = "EmailAddress"
target = "email"

[[dataflow.property]]
source = "DepartmentId"
target = "organization_id"
type = "string"
reference = { source = ["Departments"], target = "Organizations" }
"#;

const DEPARTMENTS: &str = r#"
[[dataflow]]
source = "poweroffice.Departments"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "Name"
target = "name"
type = "string"
"#;

#[test]
fn a_reference_no_dataflow_resolves_is_a_warning() {
    let (_, findings) = run(EMPLOYEES);
    let f = only(&findings, Severity::Warning);
    assert_eq!(line(f), 11);
    assert!(
        f.message
            .contains("none links poweroffice.Departments and zendesk.Organizations"),
        "{f}"
    );
    assert!(findings.iter().all(|f| f.severity == Severity::Warning));
    let (_, findings) = run(&format!("{EMPLOYEES}{DEPARTMENTS}"));
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn reference_fields_must_declare_their_types() {
    let text = format!("{EMPLOYEES}{DEPARTMENTS}");
    let without = text.replace(
        "reference = { source = [\"Departments\"], target = \"Organizations\" }\n",
        "",
    );
    let (_, findings) = run(&without);
    assert_eq!(findings.len(), 2, "{findings:#?}");
    for f in &findings {
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("translated, never copied"), "{f}");
    }
    let wrong = text.replace("source = [\"Departments\"]", "source = [\"Customers\"]");
    let f = only(&run(&wrong).1, Severity::Error).clone();
    assert!(
        f.message.contains("declares it refers to Departments"),
        "{f}"
    );
}

#[test]
fn a_required_target_field_nothing_fills_means_link_only() {
    let text =
        "[[dataflow]]\nsource = \"exactonline.Departments\"\ntarget = \"zendesk.Organizations\"\n";
    let (registry, findings) = run(text);
    let f = only(&findings, Severity::Warning);
    assert_eq!(line(f), 1);
    assert!(f.message.contains("required field(s) `name`"), "{f}");
    assert!(
        f.message
            .contains("only links records matched by merge criteria"),
        "{f}"
    );
    assert!(!registry.dataflows[0].switches.create_in_target);

    // Switched off by the operator with nothing to link by: still said.
    let off = format!("{text}create_in_target = false\n");
    let f = only(&run(&off).1, Severity::Warning).clone();
    assert!(f.message.contains("links nothing"), "{f}");
}

#[test]
fn a_read_only_field_mapped_as_writable_is_an_error() {
    let url = "[[dataflow]]\nsource = \"poweroffice.Customers\"\ntarget = \"zendesk.Organizations\"\n\n[[dataflow.property]]\nsource = \"Name\"\ntarget = \"name\"\ntype = \"string\"\n\n[[dataflow.property]]\nsource = \"WebsiteUrl\"\ntarget = \"url\"\ntype = \"string\"\n";
    let f = only(&run(url).1, Severity::Error).clone();
    assert_eq!(line(&f), 10);
    assert!(
        f.message.contains("read-only in zendesk.Organizations"),
        "{f}"
    );
    // Kept but off: a warning telling how to carry the value.
    let off = format!("{url}sync = \"off\"\n");
    let (_, findings) = run(&off);
    let f = only(&findings, Severity::Warning);
    assert!(
        f.message.contains("not synced") && f.message.contains("overlay"),
        "{f}"
    );

    // Written back into a field fixed at creation.
    let party = "[[dataflow]]\nsource = \"poweroffice.Contactperson\"\ntarget = \"zendesk.Users\"\ncreate_in_target = false\nmerge = [{ source = \"EmailAddress\", target = \"email\" }]\n\n[[dataflow.property]]\nsource = \"partyId\"\ntarget = \"organization_id\"\ntype = \"string\"\nreference = { source = [\"Customers\", \"Suppliers\"], target = \"Organizations\" }\n";
    let with_customers = format!("{party}\n{}", url.replace("\n[[dataflow.property]]\nsource = \"WebsiteUrl\"\ntarget = \"url\"\ntype = \"string\"\n", ""));
    let f = only(&run(&with_customers).1, Severity::Error).clone();
    assert!(
        f.message.contains("writes changes back to `partyId`"),
        "{f}"
    );
    let fixed = with_customers.replace("reference = { source = [\"Customers\", \"Suppliers\"], target = \"Organizations\" }\n", "reference = { source = [\"Customers\", \"Suppliers\"], target = \"Organizations\" }\nsync = \"to_target\"\n");
    let (_, findings) = run(&fixed);
    // Left: no Suppliers flow in this small registry to translate supplier owners.
    let f = only(&findings, Severity::Warning);
    assert!(f.message.contains("poweroffice.Suppliers"), "{f}");
    assert!(findings.iter().all(|f| f.severity == Severity::Warning));
}

#[test]
fn writing_back_to_immutable_comments_is_an_error() {
    let text =
        "[[dataflow]]\nsource = \"zendesk.Ticketcomments\"\ntarget = \"customerp.Project\"\n";
    let f = only(&run(text).1, Severity::Error).clone();
    assert!(f.message.contains("immutable"), "{f}");
    let fixed = format!("{text}write_back_to_source = false\n");
    assert!(run(&fixed).1.is_empty());
}

#[test]
fn mapping_onto_immutable_records_is_said() {
    let text = "[[dataflow]]\nsource = \"customerp.Project\"\ntarget = \"zendesk.Ticketcomments\"\nwrite_back_to_source = false\n\n[[dataflow.property]]\nsource = \"text\"\ntarget = \"body\"\ntype = \"string\"\n";
    let f = only(&run(text).1, Severity::Warning).clone();
    assert!(
        f.message.contains("never updated") && f.message.contains("immutable"),
        "{f}"
    );
}

#[test]
fn unconfigured_systems_are_reported_idle() {
    let (registry, _) = run(&format!("{ORG_FROM_ACCOUNTS}{DEPARTMENTS}"));
    let findings = idle_systems(&registry, |s| s == SystemId::Zendesk);
    assert_eq!(findings.len(), 2, "{findings:#?}");
    assert!(findings
        .iter()
        .all(|f| f.severity == Severity::Warning && f.location.is_none()));
    assert!(findings[0].message.contains("Exact Online (exactonline) is not configured, so 1 dataflow is idle: exactonline.Accounts->zendesk.Organizations"), "{}", findings[0]);
    assert!(idle_systems(&registry, |_| true).is_empty());
}
