//! libvirt domain XML: what the libvirt backend writes and reads. Pure
//! functions, no libvirt connection, unit-tested on XML texts.
//!
//! * the `<interface type='ethernet'>` of a NIC ([`interface_xml`]) and the
//!   XML that names it for a detach ([`detach_xml`]): the agent's tap as an
//!   unmanaged target, virtio, the NIC's MAC and the user alias
//!   `ua-nl-<id>` ([`alias`]) by which reconcile finds it;
//! * the agent's NICs a domain holds, from its live XML ([`agent_nics`]);
//! * a domain's nestless metadata element ([`domain_spec`]): the VM it
//!   stands for, registered when the domain runs.
//!
//! The metadata element (namespace [`METADATA_NS`]) inside the domain's
//! `<metadata>`:
//!
//! ```xml
//! <metadata>
//!   <nestless:vm xmlns:nestless="https://nestless.dev/xmlns/domain/1">
//!     <nestless:name>web1</nestless:name>           <!-- optional: the domain's name -->
//!     <nestless:network>tenant-a</nestless:network> <!-- optional with one network -->
//!     <nestless:max-nics>8</nestless:max-nics>      <!-- optional, default 16 -->
//!     <nestless:warm-pool>1</nestless:warm-pool>    <!-- optional, default 0 -->
//!     <nestless:vsock-uds>/run/vms/web1.vsock</nestless:vsock-uds> <!-- or socket, or a <vsock> device -->
//!   </nestless:vm>
//! </metadata>
//! ```
//!
//! The guest reaches the agent by the CID of the domain's `<vsock>` device
//! (`<cid address='N'/>`; an `auto='yes'` CID is read from the live XML),
//! or, without the `vhost_vsock` module, through the unix socket of a
//! user-space vsock (`vsock-uds`: vhost-device-vsock's `uds-path`; or
//! `socket`: the path the agent listens on). Every value is then checked
//! as a `[[vm]]` entry's is.

use std::collections::BTreeMap;

use crate::{
    backend::NicPlan,
    config::VmSpec,
    names::{NicId, NicNames, QEMU_DEVICE_PREFIX},
};

/// The namespace of the nestless metadata element.
pub const METADATA_NS: &str = "https://nestless.dev/xmlns/domain/1";
/// The name of the metadata element (in [`METADATA_NS`]).
pub const METADATA_ELEMENT: &str = "vm";
/// libvirt's prefix of user-chosen device aliases.
pub const USER_ALIAS_PREFIX: &str = "ua-";
/// Largest domain XML the agent parses (libvirt's own limit on an XML
/// document read from a file is 10 MiB).
pub const MAX_XML: usize = 10 * 1024 * 1024;

/// The user alias of NIC `id`'s device: `ua-nl-<id>`.
pub fn alias(id: &NicId) -> String {
    format!("{USER_ALIAS_PREFIX}{}", id.names().device)
}

/// The NIC id of a user alias the agent gave, or `None`.
pub fn id_from_alias(alias: &str) -> Option<NicId> {
    let device = alias.strip_prefix(USER_ALIAS_PREFIX)?;
    if !device.starts_with(QEMU_DEVICE_PREFIX) {
        return None;
    }
    NicNames::id_from_name(device)
}

/// The device XML of NIC `nic`: an ethernet interface on the agent's tap
/// (`managed='no'`: libvirt opens the tap the agent made and neither
/// creates nor deletes it), virtio, with the NIC's MAC, MTU and alias.
pub fn interface_xml(nic: &NicPlan) -> String {
    let names = nic.id.names();
    format!(
        "<interface type='ethernet'>\
         <mac address='{mac}'/>\
         <target dev='{tap}' managed='no'/>\
         <model type='virtio'/>\
         <mtu size='{mtu}'/>\
         <alias name='{alias}'/>\
         </interface>",
        mac = nic.mac,
        tap = names.host_if,
        mtu = nic.mtu,
        alias = alias(&nic.id),
    )
}

/// The device XML naming NIC `id` for a detach: libvirt matches an
/// interface by its alias.
pub fn detach_xml(id: &NicId) -> String {
    format!(
        "<interface type='ethernet'><alias name='{}'/></interface>",
        alias(id)
    )
}

/// A domain XML that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed, or too large.
    #[error("the XML of domain {domain} cannot be parsed: {message}")]
    Parse {
        /// The domain.
        domain: String,
        /// The parser's account.
        message: String,
    },
    /// The nestless metadata element holds a wrong value.
    #[error("domain {domain}: nestless metadata <{field}>: {message}")]
    Metadata {
        /// The domain.
        domain: String,
        /// The element (`network`, `max-nics`, ... or `vm` for the whole).
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn parse<'a>(domain: &str, xml: &'a str) -> Result<roxmltree::Document<'a>, XmlError> {
    if xml.len() > MAX_XML {
        return Err(XmlError::Parse {
            domain: domain.to_string(),
            message: format!("{} bytes is more than {MAX_XML}", xml.len()),
        });
    }
    roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse {
        domain: domain.to_string(),
        message: e.to_string(),
    })
}

/// One `<interface>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `<alias name>`.
    pub alias: Option<String>,
    /// `<target dev>`.
    pub target: Option<String>,
    /// `<mac address>`.
    pub mac: Option<String>,
}

/// Every `<interface>` under the domain's `<devices>`.
pub fn interfaces(domain: &str, xml: &str) -> Result<Vec<Interface>, XmlError> {
    let doc = parse(domain, xml)?;
    let root = doc.root_element();
    let attr = |n: roxmltree::Node, child: &str, a: &str| {
        n.children()
            .find(|c| c.has_tag_name(child))
            .and_then(|c| c.attribute(a))
            .map(str::to_string)
    };
    Ok(root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("interface")))
        .map(|i| Interface {
            alias: attr(i, "alias", "name"),
            target: attr(i, "target", "dev"),
            mac: attr(i, "mac", "address"),
        })
        .collect())
}

/// The NICs of the agent a domain XML holds (by their user alias), in order.
pub fn agent_nics(domain: &str, xml: &str) -> Result<Vec<NicId>, XmlError> {
    let mut ids: Vec<NicId> = interfaces(domain, xml)?
        .iter()
        .filter_map(|i| i.alias.as_deref().and_then(id_from_alias))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// The vsock CID of the domain's `<vsock>` device, if it has one with an
/// address (`auto='yes'` domains have it in their live XML).
pub fn vsock_cid(domain: &str, xml: &str) -> Result<Option<u32>, XmlError> {
    let doc = parse(domain, xml)?;
    vsock_cid_of(domain, &doc)
}

fn vsock_cid_of(domain: &str, doc: &roxmltree::Document) -> Result<Option<u32>, XmlError> {
    let cid = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("vsock")))
        .flat_map(|v| v.children().filter(|n| n.has_tag_name("cid")))
        .find_map(|c| c.attribute("address"));
    match cid {
        None => Ok(None),
        Some(a) => a
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| XmlError::Metadata {
                domain: domain.to_string(),
                field: "vsock".into(),
                message: format!(
                    "the <vsock> device's CID {} is not a number",
                    crate::names::Quoted(a)
                ),
            }),
    }
}

/// The VM that domain `domain` (its live XML `xml`) stands for, when its
/// XML carries the nestless metadata element: a registered VM of backend
/// `libvirt` on connection `uri`, marked discovered. `None` without the
/// element. The values are only read here; the configuration's checks
/// (the same as a `[[vm]]` entry's) come when it is registered.
///
/// # Errors
/// [`XmlError`] naming the domain and the element.
pub fn domain_spec(domain: &str, xml: &str, uri: &str) -> Result<Option<VmSpec>, XmlError> {
    let doc = parse(domain, xml)?;
    let Some(meta) = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .find(|n| n.has_tag_name((METADATA_NS, METADATA_ELEMENT)))
    else {
        return Ok(None);
    };
    let err = |field: &str, message: String| XmlError::Metadata {
        domain: domain.to_string(),
        field: field.to_string(),
        message,
    };
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    for child in meta.children() {
        if child.is_text() {
            if child.text().is_some_and(|t| !t.trim().is_empty()) {
                return Err(err(
                    METADATA_ELEMENT,
                    "holds text outside its elements".into(),
                ));
            }
            continue;
        }
        if !child.is_element() {
            continue;
        }
        let tag = child.tag_name();
        if tag.namespace() != Some(METADATA_NS) {
            return Err(err(
                tag.name(),
                format!("is not in the namespace {METADATA_NS}"),
            ));
        }
        let name = match tag.name() {
            n @ ("name" | "network" | "max-nics" | "warm-pool" | "socket" | "vsock-uds") => n,
            other => {
                return Err(err(
                    other,
                    "is not one of name, network, max-nics, warm-pool, socket, vsock-uds".into(),
                ))
            }
        };
        if child.children().any(|c| c.is_element()) {
            return Err(err(name, "holds elements, not a value".into()));
        }
        let value = child.text().unwrap_or("").trim().to_string();
        if value.is_empty() {
            return Err(err(name, "is empty".into()));
        }
        if fields.insert(name, value).is_some() {
            return Err(err(name, "is given twice".into()));
        }
    }
    let number = |field: &str| -> Result<Option<u32>, XmlError> {
        fields
            .get(field)
            .map(|v| {
                v.parse::<u32>().map_err(|_| {
                    err(
                        field,
                        format!("{} is not a whole number", crate::names::Quoted(v)),
                    )
                })
            })
            .transpose()
    };
    let max_nics = number("max-nics")?;
    let warm_pool = number("warm-pool")?;
    let cid = vsock_cid_of(domain, &doc)?;
    let spec = VmSpec {
        name: fields
            .get("name")
            .cloned()
            .unwrap_or_else(|| domain.to_string()),
        backend: "libvirt".into(),
        network: fields.get("network").cloned(),
        cid,
        vsock_uds: fields.get("vsock-uds").map(Into::into),
        socket: fields.get("socket").map(Into::into),
        max_nics,
        warm_pool,
        domain: Some(domain.to_string()),
        libvirt_uri: Some(uri.to_string()),
        discovered: true,
        ..Default::default()
    };
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "qemu:///system";

    fn domain(metadata: &str, devices: &str) -> String {
        format!(
            "<domain type='qemu' id='7'><name>web1</name><uuid>0b6a2f0e-3d55-4a6e-9a47-8e2ef0e1f001</uuid>\
             <metadata>{metadata}</metadata><devices>{devices}</devices></domain>"
        )
    }

    fn meta(inner: &str) -> String {
        format!("<nestless:vm xmlns:nestless='{METADATA_NS}'>{inner}</nestless:vm>")
    }

    fn plan(id: &str) -> NicPlan {
        NicPlan {
            id: id.parse().unwrap(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            bridge: "br0".into(),
            mtu: 1450,
        }
    }

    #[test]
    fn aliases_round_trip() {
        let id: NicId = "00000000a1".parse().unwrap();
        assert_eq!(alias(&id), "ua-nl-00000000a1");
        assert_eq!(id_from_alias("ua-nl-00000000a1"), Some(id));
        for other in [
            "ua-nln-00000000a1",
            "nl-00000000a1",
            "ua-nl-0000",
            "ua-nl-00000000A1",
            "net0",
            "",
        ] {
            assert_eq!(id_from_alias(other), None, "{other}");
        }
    }

    #[test]
    fn interface_xml_parses_back() {
        let p = plan("00000000a1");
        let xml = domain("", &interface_xml(&p));
        let ifs = interfaces("web1", &xml).unwrap();
        assert_eq!(
            ifs,
            vec![Interface {
                alias: Some("ua-nl-00000000a1".into()),
                target: Some("nlh00000000a1".into()),
                mac: Some("52:54:00:00:00:01".into()),
            }]
        );
        assert!(interface_xml(&p).contains("managed='no'"));
        assert!(interface_xml(&p).contains("<model type='virtio'/>"));
        assert!(interface_xml(&p).contains("<mtu size='1450'/>"));
        assert!(roxmltree::Document::parse(&detach_xml(&p.id)).is_ok());
    }

    #[test]
    fn agent_nics_come_from_user_aliases_only() {
        let xml = domain(
            "",
            "<interface type='network'><mac address='52:54:00:aa:00:01'/><alias name='net0'/></interface>\
             <interface type='ethernet'><target dev='nlh00000000b2' managed='no'/><alias name='ua-nl-00000000b2'/></interface>\
             <interface type='ethernet'><alias name='ua-nl-00000000b1'/></interface>\
             <interface type='ethernet'><alias name='ua-other'/></interface>\
             <disk type='file'><alias name='ua-nl-00000000c1'/></disk>",
        );
        assert_eq!(
            agent_nics("web1", &xml).unwrap(),
            vec![
                "00000000b1".parse::<NicId>().unwrap(),
                "00000000b2".parse().unwrap()
            ]
        );
        assert!(agent_nics("web1", &domain("", "")).unwrap().is_empty());
    }

    #[test]
    fn metadata_becomes_a_discovered_vm() {
        let xml = domain(
            &meta(
                "<nestless:network>tenant-a</nestless:network>\
                 <nestless:max-nics> 8 </nestless:max-nics>\
                 <nestless:warm-pool>1</nestless:warm-pool>\
                 <nestless:vsock-uds>/run/vms/web1.vsock</nestless:vsock-uds>",
            ),
            "<vsock model='virtio'><cid auto='no' address='42'/></vsock>",
        );
        let spec = domain_spec("web1", &xml, URI).unwrap().unwrap();
        assert_eq!(
            spec,
            VmSpec {
                name: "web1".into(),
                backend: "libvirt".into(),
                network: Some("tenant-a".into()),
                cid: Some(42),
                vsock_uds: Some("/run/vms/web1.vsock".into()),
                max_nics: Some(8),
                warm_pool: Some(1),
                domain: Some("web1".into()),
                libvirt_uri: Some(URI.into()),
                discovered: true,
                ..Default::default()
            }
        );
        // The CID alone identifies it; a name of its own.
        let xml = domain(
            &meta("<nestless:name>vm-7</nestless:name>"),
            "<vsock model='virtio'><cid auto='yes' address='3'/></vsock>",
        );
        let spec = domain_spec("web1", &xml, URI).unwrap().unwrap();
        assert_eq!((spec.name.as_str(), spec.cid), ("vm-7", Some(3)));
        assert_eq!(spec.domain.as_deref(), Some("web1"));
        // No element (or one of another namespace): not nestless's.
        assert_eq!(domain_spec("web1", &domain("", ""), URI).unwrap(), None);
        let other = "<x:vm xmlns:x='https://example.com/1'><x:network>n</x:network></x:vm>";
        assert_eq!(domain_spec("web1", &domain(other, ""), URI).unwrap(), None);
    }

    #[test]
    fn vsock_cid_of_the_domain() {
        let with = domain(
            "",
            "<vsock model='virtio'><cid auto='no' address='77'/></vsock>",
        );
        assert_eq!(vsock_cid("web1", &with).unwrap(), Some(77));
        assert_eq!(vsock_cid("web1", &domain("", "")).unwrap(), None);
        let auto = domain("", "<vsock model='virtio'><cid auto='yes'/></vsock>");
        assert_eq!(vsock_cid("web1", &auto).unwrap(), None);
        let bad = domain("", "<vsock model='virtio'><cid address='x3'/></vsock>");
        let e = vsock_cid("web1", &bad).unwrap_err();
        assert!(e.to_string().contains("domain web1"), "{e}");
        assert!(e.to_string().contains("<vsock>"), "{e}");
    }

    #[test]
    fn bad_metadata_names_the_domain_and_the_field() {
        let cases: &[(&str, &str)] = &[
            ("<nestless:max-nics>many</nestless:max-nics>", "max-nics"),
            ("<nestless:max-nics>-1</nestless:max-nics>", "max-nics"),
            (
                "<nestless:warm-pool>99999999999</nestless:warm-pool>",
                "warm-pool",
            ),
            ("<nestless:network></nestless:network>", "network"),
            (
                "<nestless:network>a</nestless:network><nestless:network>b</nestless:network>",
                "network",
            ),
            ("<nestless:qmp>x</nestless:qmp>", "qmp"),
            ("<nestless:socket><x/></nestless:socket>", "socket"),
            (
                "<other:network xmlns:other='urn:x'>a</other:network>",
                "network",
            ),
            ("stray text", "vm"),
        ];
        for (inner, field) in cases {
            let e = domain_spec("web1", &domain(&meta(inner), ""), URI).unwrap_err();
            match &e {
                XmlError::Metadata {
                    domain, field: f, ..
                } => {
                    assert_eq!(domain, "web1", "{inner}");
                    assert_eq!(f, field, "{inner}: {e}");
                }
                other => panic!("{inner}: {other}"),
            }
            assert!(e.to_string().contains("domain web1"), "{e}");
        }
    }

    #[test]
    fn no_panic_from_any_domain_xml() {
        let m = meta("<nestless:network>n</nestless:network>");
        let good = domain(
            &m,
            "<interface type='ethernet'><alias name='ua-nl-00000000a1'/></interface>",
        );
        // Every prefix of a good document, and some broken ones: errors, never panics.
        for end in 0..good.len() {
            if !good.is_char_boundary(end) {
                continue;
            }
            let xml = &good[..end];
            let _ = domain_spec("d", xml, URI);
            let _ = agent_nics("d", xml);
            let _ = vsock_cid("d", xml);
        }
        for xml in [
            "",
            "<",
            "<domain>",
            "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><domain>&a;</domain>",
            "<domain><metadata><nestless:vm xmlns:nestless='https://nestless.dev/xmlns/domain/1'>\u{0}</nestless:vm></metadata></domain>",
            "<domain><devices><vsock><cid address='99999999999999999999'/></vsock></devices></domain>",
            "<domain><devices><interface><alias/></interface></devices></domain>",
        ] {
            let _ = domain_spec("d", xml, URI);
            let _ = agent_nics("d", xml);
            let _ = vsock_cid("d", xml);
        }
        let e = domain_spec("d", "<domain", URI).unwrap_err();
        assert!(matches!(e, XmlError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("domain d"), "{e}");
        let huge = "x".repeat(MAX_XML + 1);
        assert!(domain_spec("d", &huge, URI).is_err());
    }
}
