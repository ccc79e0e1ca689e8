use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{validate_id, validate_text, DomainError, ServiceClass, SiteRole};

/// A declared topology (`invokerctl apply topology.toml`): sites, services with their class,
/// and each service's *initial* routing and writer.
///
/// Applying is idempotent and never destructive: missing sites and services are created;
/// existing ones keep their live routing and writer (the controller and operators own those
/// once a service exists), and differences are reported as notes. Nothing is pruned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub sites: Vec<SiteSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub id: String,
    pub role: SiteRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub class: ServiceClass,
    /// Initial routing weights per site, e.g. `{ a = 50, b = 50 }`.
    pub routing: BTreeMap<String, u32>,
    /// Initial writer; required for `strong` services, refused for `stateless` ones.
    #[serde(default)]
    pub writer: Option<WriterSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriterSpec {
    pub site: String,
    pub dsn: String,
    /// The service's database in each other site (a streaming replica): where a failover
    /// can move the writer, e.g. `{ b = "postgres://..." }`.
    #[serde(default)]
    pub replicas: BTreeMap<String, String>,
}

impl Topology {
    /// Parses and validates a topology TOML document.
    pub fn from_toml(text: &str) -> Result<Topology, DomainError> {
        let topology: Topology =
            toml::from_str(text).map_err(|e| DomainError::TopologyParse(e.to_string()))?;
        topology.validate()?;
        Ok(topology)
    }

    /// Checks the document on its own (ids, duplicates, references to declared sites). The
    /// state machine checks it again against the live state when it is applied.
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut roles = BTreeMap::new();
        for site in &self.sites {
            validate_id("site id", &site.id)?;
            if roles.insert(site.id.as_str(), site.role).is_some() {
                return Err(DomainError::Duplicate {
                    kind: "site".into(),
                    id: site.id.clone(),
                });
            }
        }
        let mut names = BTreeSet::new();
        for service in &self.services {
            validate_id("service name", &service.name)?;
            if !names.insert(service.name.as_str()) {
                return Err(DomainError::Duplicate {
                    kind: "service".into(),
                    id: service.name.clone(),
                });
            }
            for site in service.routing.keys() {
                validate_id("site id", site)?;
            }
            match (&service.class, &service.writer) {
                (ServiceClass::Strong, None) => {
                    return Err(DomainError::StrongWithoutWriter(service.name.clone()))
                }
                (ServiceClass::Stateless, Some(_)) => {
                    return Err(DomainError::StatelessWithWriter(service.name.clone()))
                }
                (_, Some(writer)) => {
                    validate_id("site id", &writer.site)?;
                    validate_text("writer dsn", &writer.dsn, true)?;
                    for (site, dsn) in &writer.replicas {
                        validate_id("site id", site)?;
                        validate_text("replica dsn", dsn, true)?;
                        if site == &writer.site {
                            return Err(DomainError::Duplicate {
                                kind: "database of site".into(),
                                id: site.clone(),
                            });
                        }
                        if !roles.contains_key(site.as_str()) {
                            return Err(DomainError::UnknownSite(site.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
        [[sites]]
        id = "a"
        role = "site"
        [[sites]]
        id = "b"
        role = "site"
        [[sites]]
        id = "witness"
        role = "witness"

        [[services]]
        name = "gift-api"
        class = "stateless"
        routing = { a = 50, b = 50 }

        [[services]]
        name = "wallet"
        class = "strong"
        routing = { a = 50, b = 50 }
        writer = { site = "a", dsn = "postgres://127.0.1.3:5432/gift" }
    "#;

    #[test]
    fn parses_the_lab_topology() {
        let t = Topology::from_toml(LAB).unwrap();
        assert_eq!(t.sites.len(), 3);
        assert_eq!(t.services[1].class, ServiceClass::Strong);
    }

    #[test]
    fn refuses_bad_documents_with_clear_errors() {
        let unknown_field = "[[sites]]\nid = \"a\"\nrole = \"site\"\ncolour = \"red\"\n";
        let err = Topology::from_toml(unknown_field).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");

        let strong_no_writer =
            "[[services]]\nname = \"wallet\"\nclass = \"strong\"\nrouting = { a = 1 }\n";
        assert_eq!(
            Topology::from_toml(strong_no_writer).unwrap_err(),
            DomainError::StrongWithoutWriter("wallet".into())
        );

        let dup =
            "[[sites]]\nid = \"a\"\nrole = \"site\"\n[[sites]]\nid = \"a\"\nrole = \"witness\"\n";
        assert!(matches!(
            Topology::from_toml(dup).unwrap_err(),
            DomainError::Duplicate { .. }
        ));

        let bad_id = "[[sites]]\nid = \"Site A\"\nrole = \"site\"\n";
        assert!(matches!(
            Topology::from_toml(bad_id).unwrap_err(),
            DomainError::InvalidId { .. }
        ));
    }
}
