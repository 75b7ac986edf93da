//! Tests of `registry::load`.

use super::*;
use crate::domain::SystemId;

/// The seeds as data: (source, target, [(source property, target property, type)]).
/// Kept in code so the comparison means something where `../shared/seeds` is absent.
/// (source property, target property, data type).
type Row = (&'static str, &'static str, &'static str);

pub(crate) const SEEDS: &[(&str, &str, &[Row])] = &[
    (
        "exactonline.Accounts",
        "zendesk.Organizations",
        &[("Name", "name", "string")],
    ),
    ("exactonline.Departments", "zendesk.Organizations", &[]),
    ("exactonline.Divisions", "zendesk.Organizations", &[]),
    ("zendesk.Ticketcomments", "crmoffice.Activities", &[]),
    (
        "zendesk.Tickets",
        "crmoffice.Activities",
        &[
            ("requester_id", "ownerId", "string"),
            ("subject", "subject", "string"),
        ],
    ),
    (
        "zendesk.Users",
        "crmoffice.Contacts",
        &[("organization_id", "company.id", "string")],
    ),
    ("zendesk.Organizations", "customerp.Customer", &[]),
    ("zendesk.Ticketcomments", "customerp.Project", &[]),
    ("zendesk.Tickets", "customerp.Project", &[]),
    ("zendesk.Users", "customerp.Contact", &[]),
    (
        "poweroffice.Contactperson",
        "zendesk.Users",
        &[("partyId", "organization_id", "string")],
    ),
    (
        "poweroffice.Customers",
        "zendesk.Organizations",
        &[("Name", "name", "string"), ("WebsiteUrl", "url", "string")],
    ),
    (
        "poweroffice.Departments",
        "zendesk.Organizations",
        &[("Name", "name", "string")],
    ),
    (
        "poweroffice.Suppliers",
        "zendesk.Organizations",
        &[
            ("LegalName", "name", "string"),
            ("WebsiteUrl", "url", "string"),
        ],
    ),
    (
        "poweroffice.Employees",
        "zendesk.Users",
        &[("DepartmentId", "organization_id", "string")],
    ),
    ("zendesk.Organizations", "custompms.Customer", &[]),
    ("zendesk.Ticketcomments", "custompms.Project", &[]),
    ("zendesk.Tickets", "custompms.Project", &[]),
];

type Flows = Vec<(String, String, Vec<(String, String, String)>)>;

fn expected() -> Flows {
    SEEDS
        .iter()
        .map(|(s, t, props)| {
            (
                s.to_string(),
                t.to_string(),
                props
                    .iter()
                    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                    .collect(),
            )
        })
        .collect()
}

fn shipped() -> (Registry, Vec<Finding>) {
    assemble(SHIPPED, None).expect("the shipped registry parses")
}

fn as_flows(registry: &Registry) -> Flows {
    registry
        .dataflows
        .iter()
        .map(|f| {
            (
                f.source.to_string(),
                f.target.to_string(),
                f.properties
                    .iter()
                    .map(|p| (p.source.clone(), p.target.clone(), p.data_type.clone()))
                    .collect(),
            )
        })
        .collect()
}

/// Reads the seed documents (RST QA checklists): each section heading "<System> <Type> to
/// <System> <Type>" is a flow; its list-table rows after the header are the properties.
fn parse_seeds(dir: &Path) -> Flows {
    const SYSTEMS: &[(&str, &str)] = &[
        ("Exact Online", "exactonline"),
        ("Zendesk", "zendesk"),
        ("Crmoffice", "crmoffice"),
        ("Customerp", "customerp"),
        ("Custom PMS", "custompms"),
        ("Powerofficego", "poweroffice"),
    ];
    let entity = |text: &str| -> String {
        let (name, id) = SYSTEMS
            .iter()
            .find(|(name, _)| text.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("unknown system in {text:?}"));
        let ty = text[name.len() + 1..].trim();
        // Seed 003 spells the Zendesk type the British way.
        let ty = if ty == "Organisations" {
            "Organizations"
        } else {
            ty
        };
        format!("{id}.{ty}")
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    names.sort();
    let mut flows: Flows = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut cells: Vec<String> = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let underlined = lines
                .get(i + 1)
                .is_some_and(|next| !next.is_empty() && next.chars().all(|c| c == '-'));
            if underlined && line.contains(" to ") && !line.contains("Dataflow") {
                let (s, t) = line.split_once(" to ").unwrap();
                flows.push((entity(s), entity(t), Vec::new()));
                cells.clear();
            } else if let Some(cell) = line
                .trim_start()
                .strip_prefix("* - ")
                .or_else(|| line.trim_start().strip_prefix("- "))
            {
                cells.push(cell.trim().trim_matches('"').to_owned());
                if cells.len() == 3 {
                    let row = std::mem::take(&mut cells);
                    // The first row of each table is its header.
                    if !row[0].ends_with(" Property") {
                        flows.last_mut().unwrap().2.push((
                            row[0].clone(),
                            row[1].clone(),
                            row[2].clone(),
                        ));
                    }
                }
            }
        }
    }
    flows
}

#[test]
fn shipped_registry_matches_the_seeds_flow_for_flow_and_property_for_property() {
    let (registry, _) = shipped();
    let flows = as_flows(&registry);
    assert_eq!(flows, expected());
    assert_eq!(flows.len(), 18);
    assert_eq!(flows.iter().map(|f| f.2.len()).sum::<usize>(), 11);

    let dir = std::env::var_os("TETHER_SEEDS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/seeds"));
    if dir.is_dir() {
        assert_eq!(parse_seeds(&dir), flows, "seed files in {}", dir.display());
    } else {
        println!(
            "note: {} is absent; compared with the in-code seed table only",
            dir.display()
        );
    }
}

#[test]
fn shipped_references_and_switches_are_as_documented() {
    let (registry, _) = shipped();
    let mapping = |flow: &str, target: &str| {
        registry
            .flow(flow)
            .unwrap()
            .properties
            .iter()
            .find(|p| p.target == target)
            .unwrap()
            .clone()
    };
    let party = mapping(
        "poweroffice.Contactperson->zendesk.Users",
        "organization_id",
    );
    let r = party.reference.unwrap();
    assert_eq!(r.source_types, ["Customers", "Suppliers"]);
    assert_eq!(r.target_type, "Organizations");
    assert_eq!(party.sync, SyncMode::ToTarget);
    let dept = mapping("poweroffice.Employees->zendesk.Users", "organization_id");
    assert_eq!(dept.reference.unwrap().source_types, ["Departments"]);
    let owner = mapping("zendesk.Tickets->crmoffice.Activities", "ownerId");
    assert_eq!(owner.reference.unwrap().target_type, "Contacts");
    let company = mapping("zendesk.Users->crmoffice.Contacts", "company.id");
    assert_eq!(company.reference.unwrap().target_type, "Companies");
    let url = mapping("poweroffice.Customers->zendesk.Organizations", "url");
    assert_eq!(url.sync, SyncMode::Off);
    assert!(url.note.unwrap().contains("read-only"));
    for flow in registry.flows_from(SystemId::Zendesk, "Ticketcomments") {
        assert!(!flow.switches.write_back_to_source, "{}", flow.id);
    }
    // Flows whose target needs a field nothing maps do not create.
    for id in [
        "exactonline.Departments->zendesk.Organizations",
        "exactonline.Divisions->zendesk.Organizations",
        "poweroffice.Contactperson->zendesk.Users",
        "poweroffice.Employees->zendesk.Users",
    ] {
        assert!(
            !registry.flow(id).unwrap().switches.create_in_target,
            "{id}"
        );
    }
    assert!(
        registry
            .flow("poweroffice.Customers->zendesk.Organizations")
            .unwrap()
            .switches
            .create_in_target
    );
}

#[test]
fn shipped_registry_has_only_its_true_warnings() {
    let (_, findings) = shipped();
    let summary: Vec<(String, usize, &str)> = findings
        .iter()
        .map(|f| {
            assert_eq!(f.severity, Severity::Warning, "{f}");
            let at = f.location.clone().expect("located");
            let kind = if f.message.contains("cannot create") {
                "required"
            } else if f.message.contains("not synced") {
                "off"
            } else if f.message.contains("no dataflow to translate") {
                "reference"
            } else {
                "other"
            };
            (at.file, at.line, kind)
        })
        .collect();
    let file = |n: &str| format!("registry/{n}");
    assert_eq!(
        summary,
        vec![
            (file("000_exactonline_zendesk.toml"), 26, "required"),
            (file("000_exactonline_zendesk.toml"), 31, "required"),
            (file("001_zendesk_crmoffice.toml"), 40, "reference"),
            (file("003_poweroffice_zendesk.toml"), 11, "required"),
            (file("003_poweroffice_zendesk.toml"), 39, "off"),
            (file("003_poweroffice_zendesk.toml"), 65, "off"),
            (file("003_poweroffice_zendesk.toml"), 74, "required"),
        ]
    );
}

const OVERLAY: &str = r#"
[[dataflow]]
source = "exactonline.Departments"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "Description"
target = "name"
type = "string"

[[dataflow.merge]]
source = "Description"
target = "name"

[[dataflow]]
source = "poweroffice.Customers"
target = "zendesk.Organizations"
write_back_to_source = false

[[dataflow.property]]
source = "LegalName"
target = "name"
type = "string"

[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
enabled = false

[[rule]]
entity = "zendesk.Users"
property = "organization_id"
resolve = "owner"
owner = "poweroffice.Employees->zendesk.Users"

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;

#[test]
fn overlay_wins_over_the_shipped_files() {
    let (registry, findings) = assemble(SHIPPED, Some(("overlay.toml", OVERLAY))).unwrap();
    assert!(
        findings.iter().all(|f| f.severity == Severity::Warning),
        "{findings:?}"
    );
    assert_eq!(registry.dataflows.len(), 18);

    // An added mapping makes the flow able to create again; merge criteria are set.
    let dept = registry
        .flow("exactonline.Departments->zendesk.Organizations")
        .unwrap();
    assert_eq!(dept.properties.len(), 1);
    assert!(dept.switches.create_in_target);
    assert_eq!(dept.merge_criteria[0].source, "Description");
    let at = &registry.locations.properties[&(dept.id.clone(), "name".to_owned())];
    assert_eq!((at.file.as_str(), at.line), ("overlay.toml", 6));
    assert!(!findings.iter().any(|f| f.message.contains(&dept.id)));

    // A mapping with the same target replaces the shipped one; switches change.
    let customers = registry
        .flow("poweroffice.Customers->zendesk.Organizations")
        .unwrap();
    assert_eq!(customers.properties.len(), 2);
    assert_eq!(customers.properties[0].source, "LegalName");
    assert!(!customers.switches.write_back_to_source);
    assert!(customers.switches.create_in_target);

    // A disabled flow is out of the lookups.
    assert_eq!(
        registry
            .flows_from(SystemId::Zendesk, "Organizations")
            .count(),
        1
    );

    // The overlay's rule replaces the shipped one.
    let users = EntityRef::new(SystemId::Zendesk, "Users");
    let employees = registry
        .flow("poweroffice.Employees->zendesk.Users")
        .unwrap();
    let contacts = registry
        .flow("poweroffice.Contactperson->zendesk.Users")
        .unwrap();
    assert_eq!(registry.rules.len(), 2);
    assert!(matches!(
        &registry.rule(&users, "organization_id").unwrap().resolve,
        Resolution::Owner(o) if o == &employees.id
    ));
    assert!(registry.may_write(
        employees,
        super::super::Direction::ToTarget,
        "organization_id"
    ));
    assert!(!registry.may_write(
        contacts,
        super::super::Direction::ToTarget,
        "organization_id"
    ));
}

#[test]
fn example_overlay_is_valid() {
    let text = include_str!("../../registry/overlay.example.toml");
    let (registry, findings) = assemble(SHIPPED, Some(("overlay.example.toml", text))).unwrap();
    assert!(
        findings.iter().all(|f| f.severity == Severity::Warning),
        "{findings:?}"
    );
    let suppliers = registry
        .flow("poweroffice.Suppliers->zendesk.Organizations")
        .unwrap();
    assert!(suppliers
        .properties
        .iter()
        .any(|p| p.target == "organization_fields.website" && p.syncs_to_target()));
    assert_eq!(suppliers.guard.max_writes, Some(200));
    assert_eq!(suppliers.guard.max_same_value, None);
    let departments = registry
        .flow("exactonline.Departments->zendesk.Organizations")
        .unwrap();
    assert!(!departments.switches.write_back_to_source);
}

#[test]
fn a_wrong_guard_override_is_an_error_naming_the_flow_and_key() {
    let overlay =
        "[[dataflow]]\nsource = \"poweroffice.Suppliers\"\ntarget = \"zendesk.Organizations\"\n\
                   [dataflow.guard]\nmax_changed_fraction = 2.0\n";
    let (_, findings) = assemble(SHIPPED, Some(("o.toml", overlay))).unwrap();
    let error = findings
        .iter()
        .find(|f| f.severity == Severity::Error)
        .expect("an error");
    let text = error.to_string();
    assert!(
        text.contains("poweroffice.Suppliers->zendesk.Organizations")
            && text.contains("max_changed_fraction"),
        "{text}"
    );
}

#[test]
fn writing_back_to_read_only_exact_departments_and_divisions_is_refused() {
    for source in ["exactonline.Departments", "exactonline.Divisions"] {
        let overlay = format!(
            "[[dataflow]]\nsource = \"{source}\"\ntarget = \"zendesk.Organizations\"\nwrite_back_to_source = true\n"
        );
        let (_, findings) = assemble(SHIPPED, Some(("o.toml", &overlay))).unwrap();
        let errors: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        assert_eq!(errors.len(), 1, "{findings:?}");
        assert!(
            errors[0].message.contains("read-only (GET only)")
                && errors[0].message.contains("write_back_to_source = false"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn overlay_cannot_add_dataflows() {
    let overlay = "[[dataflow]]\nsource = \"zendesk.Users\"\ntarget = \"custompms.Customer\"\n";
    let (_, findings) = assemble(SHIPPED, Some(("o.toml", overlay))).unwrap();
    let f = findings
        .iter()
        .find(|f| f.severity == Severity::Error)
        .unwrap();
    assert_eq!(f.location.as_ref().unwrap().line, 1);
    assert!(f.message.contains("cannot add new ones"), "{f}");

    let overlay = "seed = \"x.txt\"\n";
    let (_, findings) = assemble(SHIPPED, Some(("o.toml", overlay))).unwrap();
    assert!(findings
        .iter()
        .any(|f| f.severity == Severity::Error && f.message.contains("has no `seed`")));
}

#[test]
fn malformed_files_name_file_and_line() {
    let err = assemble(&[("r.toml", "[[dataflow]]\nsource = \"zendesk.Users\"\ntarget = \"custompms.Customer\"\nenabeld = true\n")], None)
        .unwrap_err();
    match err {
        RegistryError::Syntax {
            file,
            line,
            message,
        } => {
            assert_eq!((file.as_str(), line), ("r.toml", 4));
            assert!(message.contains("enabeld"), "{message}");
        }
        other => panic!("{other}"),
    }
    let err = assemble(&[("r.toml", "[[dataflow]\n")], None).unwrap_err();
    assert!(
        matches!(err, RegistryError::Syntax { line: 1, .. }),
        "{err}"
    );
}

#[test]
fn load_refuses_errors_and_reads_the_overlay_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlay.toml");
    std::fs::write(&path, OVERLAY).unwrap();
    let (registry, warnings) = load(Some(&path)).unwrap();
    assert!(
        !registry
            .flow("poweroffice.Customers->zendesk.Organizations")
            .unwrap()
            .switches
            .write_back_to_source
    );
    assert!(warnings.iter().all(|f| f.severity == Severity::Warning));

    std::fs::write(
        &path,
        "[[dataflow]]\nsource = \"zendesk.Nope\"\ntarget = \"custompms.Customer\"\n",
    )
    .unwrap();
    let err = load(Some(&path)).unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("overlay.toml:1"), "{err}");

    let err = load(Some(&dir.path().join("missing.toml"))).unwrap_err();
    assert!(matches!(err, RegistryError::Unreadable { .. }), "{err}");
}
