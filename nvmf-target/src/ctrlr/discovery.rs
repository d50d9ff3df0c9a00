//! The discovery service's log page (NVMe over Fabrics 1.1 §5.3, log page
//! 70h): what a discovery controller tells a host about the subsystems it
//! may connect to.

use unvme_proto::discovery::{self, DiscoveryLogEntry};

use crate::subsystem::Subsystems;

/// The discovery log page: one entry per NVM subsystem per listener,
/// plus the discovery subsystem itself, visible to `hostnqn`.
pub(crate) fn discovery_log(subsystems: &Subsystems, hostnqn: &str) -> Vec<u8> {
    let listen = subsystems.listen_addrs();
    let mut entries = Vec::new();
    for (portid, addr) in listen.iter().enumerate() {
        for s in &subsystems.list {
            if !s.is_discovery && !s.host_allowed(hostnqn) {
                continue;
            }
            entries.push(DiscoveryLogEntry {
                trtype: discovery::TRTYPE_TCP,
                adrfam: if addr.is_ipv4() {
                    discovery::ADRFAM_IPV4
                } else {
                    discovery::ADRFAM_IPV6
                },
                subtype: if s.is_discovery {
                    discovery::SUBTYPE_CURRENT_DISCOVERY
                } else {
                    discovery::SUBTYPE_NVME
                },
                treq: discovery::TREQ_NOT_REQUIRED,
                portid: portid as u16 + 1,
                cntlid: 0xFFFF,
                asqsz: 32,
                trsvcid: addr.port().to_string(),
                subnqn: s.nqn.clone(),
                traddr: addr.ip().to_string(),
                ..Default::default()
            });
        }
    }
    discovery::encode_log(1, &entries)
}
