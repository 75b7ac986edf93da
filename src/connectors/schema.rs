//! What each system's entity types look like, declared for the connectors: which fields exist,
//! which are required to create a record, which are read-only, and which hold references to
//! other records (and of which type). The registry is checked against these declarations
//! (`tether registry check`), and connectors may use them to drop fields a vendor would refuse.
//!
//! Field names are the REGISTRY's property names (a connector maps them to the vendor's: the
//! seed's `partyId` is PowerOffice v2's `ContactId`). Nested paths are written with dots
//! (`company.id`). Plain static data: no I/O, nothing computed.
//!
//! Sources: `vendor-apis.md` (Zendesk section 1.5, Exact Online 2.2, PowerOffice Go 3 DTOs with
//! their RO markers) and `product.md` sections 5 (custom systems) and 6 (CRMOffice). CRMOffice has
//! no public documentation: every CRMOffice declaration below is an ASSUMPTION, named as such in
//! [`EntityDecl::assumption`], so the real API can replace it in one edit.

use crate::domain::SystemId;

/// How a field may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and written freely.
    ReadWrite,
    /// Set by the vendor (ids, timestamps, API addresses): never written by Tether.
    ReadOnly,
    /// Given when the record is created, fixed afterwards (a PowerOffice contact person's owner).
    CreateOnly,
    /// Accepted on write but never returned (a Zendesk ticket's `comment`).
    WriteOnly,
}

/// One field of an entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDecl {
    /// The registry's property path (`name`, `company.id`).
    pub path: &'static str,
    pub access: Access,
    /// The vendor refuses to create a record without it.
    pub required: bool,
    /// Non-empty when the field holds another record's id: the entity types (of the same system)
    /// it may refer to.
    pub refers_to: &'static [&'static str],
    /// The field is an object whose members are addressed by nested paths
    /// (`organization_fields.website`); members inherit the field's access.
    pub object: bool,
}

impl FieldDecl {
    /// Whether a sync may write this field on an existing record.
    pub fn updatable(&self) -> bool {
        matches!(self.access, Access::ReadWrite | Access::WriteOnly)
    }

    /// Whether a sync may give this field when creating a record.
    pub fn creatable(&self) -> bool {
        !matches!(self.access, Access::ReadOnly)
    }

    /// Whether the field can be read back from the vendor.
    pub fn readable(&self) -> bool {
        !matches!(self.access, Access::WriteOnly)
    }
}

/// One entity type of one system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityDecl {
    pub system: SystemId,
    /// The registry's type name (`Organizations`, `Customer`).
    pub entity_type: &'static str,
    pub fields: &'static [FieldDecl],
    /// Fields not listed are accepted too (custom systems define their own fields; CRMOffice's are
    /// unknown). Listed fields keep their declared access.
    pub open: bool,
    /// Records can be created through the API.
    pub creatable: bool,
    /// Existing records can be changed through the API (Zendesk comments cannot).
    pub updatable: bool,
    /// Why `creatable`/`updatable` is false, for messages.
    pub limitation: Option<&'static str>,
    /// Set when the declaration rests on an assumption rather than vendor documentation.
    pub assumption: Option<&'static str>,
}

impl EntityDecl {
    /// The declaration of a field. For an open entity an undeclared field is an ordinary
    /// read-write field: the returned value is then a synthetic declaration.
    pub fn field(&self, path: &str) -> Option<FieldDecl> {
        if let Some(f) = self.fields.iter().find(|f| f.path == path) {
            return Some(*f);
        }
        if let Some(parent) = self.fields.iter().find(|f| {
            f.object
                && path
                    .strip_prefix(f.path)
                    .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
        }) {
            return Some(FieldDecl {
                required: false,
                object: false,
                ..*parent
            });
        }
        self.open.then_some(FieldDecl {
            path: "",
            access: Access::ReadWrite,
            required: false,
            refers_to: &[],
            object: false,
        })
    }

    /// Fields the vendor needs when a record is created.
    pub fn required_fields(&self) -> impl Iterator<Item = &'static FieldDecl> {
        self.fields.iter().filter(|f| f.required)
    }
}

/// The declaration of an entity type, if the system has it.
pub fn entity(system: SystemId, entity_type: &str) -> Option<&'static EntityDecl> {
    ENTITIES
        .iter()
        .find(|e| e.system == system && e.entity_type == entity_type)
}

/// The entity types a system has, in declaration order.
pub fn entities(system: SystemId) -> impl Iterator<Item = &'static EntityDecl> {
    ENTITIES.iter().filter(move |e| e.system == system)
}

/// Exact's REST API offers only GET on these (docs/vendors.md, Exact item 1).
const READ_ONLY_DEPARTMENTS: &str =
    "Exact Online's hrm/Departments is read-only (GET only): departments cannot be created or changed through the API";
const READ_ONLY_DIVISIONS: &str =
    "Exact Online's hrm/Divisions is read-only (GET only): divisions cannot be created or changed through the API";

const fn rw(path: &'static str) -> FieldDecl {
    FieldDecl {
        path,
        access: Access::ReadWrite,
        required: false,
        refers_to: &[],
        object: false,
    }
}

const fn ro(path: &'static str) -> FieldDecl {
    FieldDecl {
        path,
        access: Access::ReadOnly,
        required: false,
        refers_to: &[],
        object: false,
    }
}

const fn req(path: &'static str) -> FieldDecl {
    FieldDecl {
        path,
        access: Access::ReadWrite,
        required: true,
        refers_to: &[],
        object: false,
    }
}

const fn reference(path: &'static str, refers_to: &'static [&'static str]) -> FieldDecl {
    FieldDecl {
        path,
        access: Access::ReadWrite,
        required: false,
        refers_to,
        object: false,
    }
}

const fn obj(path: &'static str) -> FieldDecl {
    FieldDecl {
        path,
        access: Access::ReadWrite,
        required: false,
        refers_to: &[],
        object: true,
    }
}

const fn with(mut f: FieldDecl, access: Access, required: bool) -> FieldDecl {
    f.access = access;
    f.required = required;
    f
}

const CRMOFFICE_ASSUMPTION: &str = "CRMOffice has no public API documentation (product.md section 6): \
     only the fields the seeds map are declared, any other field is accepted, none is assumed required";

const CUSTOM_SYSTEM: &str =
    "a custom system defines its own fields (product.md section 5): any field is \
     accepted besides the read-only `id` and `updated_at`";

/// Every declared entity type.
pub static ENTITIES: &[EntityDecl] = &[
    // Zendesk: vendor-apis.md section 1.5 (Support API OAS).
    EntityDecl {
        system: SystemId::Zendesk,
        entity_type: "Organizations",
        fields: &[
            ro("id"),
            // Required and unique across the account.
            req("name"),
            rw("external_id"),
            rw("details"),
            rw("notes"),
            // An update replaces the whole list.
            rw("domain_names"),
            rw("group_id"),
            obj("organization_fields"),
            rw("shared_comments"),
            rw("shared_tickets"),
            rw("tags"),
            ro("created_at"),
            ro("updated_at"),
            // The API address of the record (…/api/v2/organizations/{id}.json), not a website.
            ro("url"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::Zendesk,
        entity_type: "Users",
        fields: &[
            ro("id"),
            // `UserCreateInput` requires both. The primary email is "writeable on create only"
            // (docs/vendors.md, Zendesk item 10): an update would add a secondary identity.
            req("name"),
            with(rw("email"), Access::CreateOnly, true),
            rw("external_id"),
            reference("organization_id", &["Organizations"]),
            rw("role"),
            rw("phone"),
            rw("details"),
            rw("notes"),
            rw("tags"),
            obj("user_fields"),
            ro("active"),
            rw("verified"),
            rw("suspended"),
            rw("time_zone"),
            rw("locale"),
            rw("default_group_id"),
            ro("created_at"),
            ro("updated_at"),
            ro("url"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::Zendesk,
        entity_type: "Tickets",
        fields: &[
            ro("id"),
            rw("subject"),
            ro("description"),
            rw("status"),
            rw("priority"),
            rw("type"),
            with(
                reference("requester_id", &["Users"]),
                Access::ReadWrite,
                true,
            ),
            reference("submitter_id", &["Users"]),
            reference("assignee_id", &["Users"]),
            reference("organization_id", &["Organizations"]),
            rw("group_id"),
            rw("external_id"),
            rw("tags"),
            rw("custom_fields"),
            ro("via"),
            ro("created_at"),
            ro("updated_at"),
            // A ticket is created with its first comment; the field is never returned.
            with(rw("comment"), Access::WriteOnly, true),
            ro("url"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::Zendesk,
        entity_type: "Ticketcomments",
        fields: &[
            ro("id"),
            ro("type"),
            with(
                reference("author_id", &["Users"]),
                Access::CreateOnly,
                false,
            ),
            with(rw("body"), Access::CreateOnly, true),
            with(rw("html_body"), Access::CreateOnly, false),
            ro("plain_body"),
            with(rw("public"), Access::CreateOnly, false),
            with(rw("attachments"), Access::CreateOnly, false),
            ro("audit_id"),
            ro("via"),
            ro("metadata"),
            ro("created_at"),
        ],
        open: false,
        // Added through `PUT /api/v2/tickets/{id}` with a `comment`; there is no endpoint to edit one.
        creatable: true,
        updatable: false,
        limitation: Some(
            "Zendesk ticket comments are immutable: once added they cannot be edited through the API",
        ),
        assumption: None,
    },
    // Exact Online: vendor-apis.md section 2.2 (picqer model docblocks linking the vendor reference).
    EntityDecl {
        system: SystemId::ExactOnline,
        entity_type: "Accounts",
        fields: &[
            ro("ID"),
            rw("Name"),
            // Fixed-length 18-character numeric string with leading spaces.
            rw("Code"),
            rw("Email"),
            rw("Phone"),
            rw("Website"),
            rw("VATNumber"),
            rw("Country"),
            rw("City"),
            rw("Postcode"),
            rw("AddressLine1"),
            rw("AddressLine2"),
            rw("AddressLine3"),
            rw("Status"),
            rw("IsSales"),
            rw("IsSupplier"),
            rw("Type"),
            rw("MainContact"),
            reference("Parent", &["Accounts"]),
            rw("SearchCode"),
            ro("Division"),
            ro("Created"),
            ro("Modified"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::ExactOnline,
        entity_type: "Departments",
        fields: &[
            ro("ID"),
            ro("Code"),
            // The label: Exact departments have no `Name`.
            ro("Description"),
            ro("Costcenter"),
            ro("CostcenterDescription"),
            ro("Division"),
            ro("Notes"),
            ro("Created"),
            ro("Creator"),
            ro("CreatorFullName"),
            ro("Modified"),
            ro("Modifier"),
            ro("ModifierFullName"),
        ],
        open: false,
        creatable: false,
        updatable: false,
        limitation: Some(READ_ONLY_DEPARTMENTS),
        assumption: None,
    },
    EntityDecl {
        system: SystemId::ExactOnline,
        entity_type: "Divisions",
        fields: &[
            ro("Code"),
            // The label: Exact divisions have no `Name`.
            ro("Description"),
            ro("HID"),
            ro("Main"),
            ro("Status"),
            ro("Country"),
            ro("Currency"),
            ro("Customer"),
            ro("CustomerCode"),
            ro("CustomerName"),
            ro("VATNumber"),
            ro("Website"),
            ro("StartDate"),
            ro("ArchiveDate"),
            ro("Created"),
            ro("Modified"),
        ],
        open: false,
        creatable: false,
        updatable: false,
        limitation: Some(READ_ONLY_DIVISIONS),
        assumption: None,
    },
    // PowerOffice Go v2: vendor-apis.md section 3 (DTOs; `RO` there is ReadOnly here).
    EntityDecl {
        system: SystemId::PowerOffice,
        entity_type: "Customers",
        fields: &[
            ro("Id"),
            rw("Number"),
            rw("Name"),
            rw("LegalName"),
            rw("FirstName"),
            rw("LastName"),
            rw("IsPerson"),
            rw("EmailAddress"),
            rw("PhoneNumber"),
            rw("WebsiteUrl"),
            rw("OrganizationNumber"),
            reference("DepartmentId", &["Departments"]),
            rw("MailAddress"),
            rw("ContactGroupIds"),
            rw("ExternalNumber"),
            rw("ExternalImportReference"),
            rw("IsArchived"),
            ro("IsActive"),
            ro("LastChangedDateTimeOffset"),
            ro("CustomerCreatedDateTimeOffset"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::PowerOffice,
        entity_type: "Suppliers",
        fields: &[
            // Not marked RO in the DTO list, but an id is assigned by the vendor.
            ro("Id"),
            rw("Number"),
            rw("Name"),
            rw("LegalName"),
            rw("FirstName"),
            rw("LastName"),
            rw("IsPerson"),
            rw("EmailAddress"),
            rw("PhoneNumber"),
            rw("WebsiteUrl"),
            rw("OrganizationNumber"),
            rw("MailAddress"),
            rw("IsArchived"),
            ro("IsActive"),
            ro("LastChangedDateTimeOffset"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::PowerOffice,
        entity_type: "Departments",
        fields: &[
            ro("Id"),
            rw("Code"),
            rw("Name"),
            rw("IsActive"),
            ro("CreatedDateTimeOffset"),
            ro("LastChangedDateTimeOffset"),
            ro("ManagerEmployeeId"),
            ro("ManagerEmployeeNo"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::PowerOffice,
        entity_type: "Employees",
        fields: &[
            ro("Id"),
            rw("Number"),
            rw("FirstName"),
            rw("LastName"),
            rw("EmailAddress"),
            rw("PhoneNumber"),
            rw("JobTitle"),
            reference("DepartmentId", &["Departments"]),
            ro("DepartmentCode"),
            rw("LocationId"),
            reference("ManagerEmployeeId", &["Employees"]),
            rw("StartDate"),
            rw("EndDate"),
            rw("HiredDate"),
            rw("IsArchived"),
            ro("EmployeeCreatedDateTimeOffset"),
            ro("LastChangedDateTimeOffset"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    EntityDecl {
        system: SystemId::PowerOffice,
        entity_type: "Contactperson",
        fields: &[
            ro("Id"),
            // The seed's (v1) name for v2's `ContactId`: the owning customer or supplier. It is
            // part of the create URL (`POST /ContactPersons/{contactId}`) and RO afterwards.
            with(
                reference("partyId", &["Customers", "Suppliers"]),
                Access::CreateOnly,
                true,
            ),
            rw("FirstName"),
            rw("LastName"),
            rw("EmailAddress"),
            rw("PhoneNumber"),
            rw("Title"),
            rw("ExternalCode"),
            rw("IsActive"),
            rw("IsDefault"),
            rw("MailAddress"),
            ro("CreatedDateTimeOffset"),
            ro("LastChangedDateTimeOffset"),
        ],
        open: false,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: None,
    },
    // CRMOffice: assumptions (product.md section 6).
    EntityDecl {
        system: SystemId::CrmOffice,
        entity_type: "Activities",
        fields: &[
            ro("id"),
            rw("subject"),
            // Assumed to hold a Contacts id: the only CRMOffice type a Zendesk user (the ticket's
            // requester) is linked to by a dataflow.
            reference("ownerId", &["Contacts"]),
        ],
        open: true,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: Some(CRMOFFICE_ASSUMPTION),
    },
    EntityDecl {
        system: SystemId::CrmOffice,
        entity_type: "Contacts",
        fields: &[ro("id"), reference("company.id", &["Companies"])],
        open: true,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: Some(CRMOFFICE_ASSUMPTION),
    },
    EntityDecl {
        system: SystemId::CrmOffice,
        entity_type: "Companies",
        // `GET companies` lists items with an `id` (vendor-apis.md section 4).
        fields: &[ro("id")],
        open: true,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: Some(CRMOFFICE_ASSUMPTION),
    },
    // Custom systems: the contract of product.md section 5.
    custom(SystemId::CustomErp, "Customer"),
    custom(SystemId::CustomErp, "Project"),
    custom(SystemId::CustomErp, "Contact"),
    custom(SystemId::CustomPms, "Customer"),
    custom(SystemId::CustomPms, "Project"),
];

const CUSTOM_FIELDS: &[FieldDecl] = &[ro("id"), ro("updated_at")];

const fn custom(system: SystemId, entity_type: &'static str) -> EntityDecl {
    EntityDecl {
        system,
        entity_type,
        fields: CUSTOM_FIELDS,
        open: true,
        creatable: true,
        updatable: true,
        limitation: None,
        assumption: Some(CUSTOM_SYSTEM),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_system_has_its_entity_types() {
        let names = |s| entities(s).map(|e| e.entity_type).collect::<Vec<_>>();
        assert_eq!(
            names(SystemId::Zendesk),
            ["Organizations", "Users", "Tickets", "Ticketcomments"]
        );
        assert_eq!(
            names(SystemId::ExactOnline),
            ["Accounts", "Departments", "Divisions"]
        );
        assert_eq!(
            names(SystemId::PowerOffice),
            [
                "Customers",
                "Suppliers",
                "Departments",
                "Employees",
                "Contactperson"
            ]
        );
        assert_eq!(
            names(SystemId::CrmOffice),
            ["Activities", "Contacts", "Companies"]
        );
        assert_eq!(
            names(SystemId::CustomErp),
            ["Customer", "Project", "Contact"]
        );
        assert_eq!(names(SystemId::CustomPms), ["Customer", "Project"]);
    }

    #[test]
    fn references_point_at_declared_types() {
        for e in ENTITIES {
            for f in e.fields {
                for t in f.refers_to {
                    assert!(
                        entity(e.system, t).is_some(),
                        "{}.{}.{} refers to undeclared {t}",
                        e.system,
                        e.entity_type,
                        f.path
                    );
                }
            }
        }
    }

    #[test]
    fn vendor_facts_are_declared() {
        let org = entity(SystemId::Zendesk, "Organizations").unwrap();
        assert!(org.field("name").unwrap().required);
        assert_eq!(org.field("url").unwrap().access, Access::ReadOnly);
        assert!(org.field("website").is_none());
        assert!(org
            .field("organization_fields.website")
            .unwrap()
            .updatable());
        assert!(org.field("organization_fields.").is_none());
        let dept = entity(SystemId::ExactOnline, "Departments").unwrap();
        assert!(dept.field("Name").is_none() && dept.field("Description").is_some());
        assert!(
            !entity(SystemId::Zendesk, "Ticketcomments")
                .unwrap()
                .updatable
        );
        let custom = entity(SystemId::CustomErp, "Customer").unwrap();
        assert!(custom.field("anything").unwrap().updatable());
        assert!(!custom.field("id").unwrap().creatable());
    }
}
