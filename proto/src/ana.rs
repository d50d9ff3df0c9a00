//! Asymmetric Namespace Access: the ANA states and the ANA log page
//! (NVMe Base Specification 2.0, §8.1.1 and §5.16.1.12).

use crate::{le, need, Error, Result};

/// The ANA state of a group as one controller reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnaState {
    /// 01h: ANA Optimized.
    Optimized,
    /// 02h: ANA Non-Optimized.
    NonOptimized,
    /// 03h: ANA Inaccessible.
    Inaccessible,
    /// 04h: ANA Persistent Loss.
    PersistentLoss,
    /// 0Fh: ANA Change (transitioning).
    Change,
}

impl AnaState {
    /// The state's code in the log page (bits 3:0 of byte 16 of a group
    /// descriptor).
    pub fn code(self) -> u8 {
        match self {
            AnaState::Optimized => 0x01,
            AnaState::NonOptimized => 0x02,
            AnaState::Inaccessible => 0x03,
            AnaState::PersistentLoss => 0x04,
            AnaState::Change => 0x0F,
        }
    }

    /// The state for `code` (bits 3:0), if the specification defines it.
    pub fn from_code(code: u8) -> Option<AnaState> {
        Some(match code & 0x0F {
            0x01 => AnaState::Optimized,
            0x02 => AnaState::NonOptimized,
            0x03 => AnaState::Inaccessible,
            0x04 => AnaState::PersistentLoss,
            0x0F => AnaState::Change,
            _ => return None,
        })
    }

    /// Whether I/O may be sent to a namespace in this state.
    pub fn usable(self) -> bool {
        matches!(self, AnaState::Optimized | AnaState::NonOptimized)
    }

    /// The name nvme-cli and Linux sysfs (`ana_state`) use.
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
        }
    }
}

impl std::fmt::Display for AnaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One ANA Group Descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroup {
    /// ANA Group ID.
    pub grpid: u32,
    /// The group's Change Count.
    pub change_count: u64,
    /// The group's state on the controller that returned the log.
    pub state: AnaState,
    /// The group's namespaces (empty when the log was read with Return
    /// Groups Only).
    pub nsids: Vec<u32>,
}

/// The ANA log page (log identifier 0Ch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnaLog {
    /// Change Count.
    pub change_count: u64,
    /// The group descriptors.
    pub groups: Vec<AnaGroup>,
}

/// Size of the log page header.
pub const ANA_LOG_HEADER: usize = 16;
/// Size of a group descriptor before its NSID list.
pub const ANA_GROUP_HEADER: usize = 32;

impl AnaLog {
    /// Decodes a log page. At most `max_groups` descriptors and
    /// `max_nsids` NSIDs in all are accepted, so a controller's counts
    /// cannot make the host allocate without bound; a page shorter than its
    /// counts say, or a state code the specification does not define, is
    /// an error.
    pub fn decode(b: &[u8], max_groups: usize, max_nsids: usize) -> Result<AnaLog> {
        need("ANA log page", b, ANA_LOG_HEADER)?;
        let change_count = le::u64(b, 0);
        let ngroups = usize::from(le::u16(b, 8));
        if ngroups > max_groups {
            return Err(Error::Invalid {
                field: "Number of ANA Group Descriptors",
                value: ngroups as u64,
            });
        }
        let mut groups = Vec::with_capacity(ngroups);
        let mut off = ANA_LOG_HEADER;
        let mut total = 0usize;
        for _ in 0..ngroups {
            let d = b.get(off..).unwrap_or_default();
            need("ANA group descriptor", d, ANA_GROUP_HEADER)?;
            let nnsid = le::u32(d, 4) as usize;
            total = total.saturating_add(nnsid);
            if total > max_nsids {
                return Err(Error::Invalid {
                    field: "Number of NSID Values",
                    value: nnsid as u64,
                });
            }
            let len = ANA_GROUP_HEADER + nnsid * 4;
            need("ANA group descriptor NSID list", d, len)?;
            let state = AnaState::from_code(d[16]).ok_or(Error::Invalid {
                field: "ANA State",
                value: u64::from(d[16]),
            })?;
            groups.push(AnaGroup {
                grpid: le::u32(d, 0),
                change_count: le::u64(d, 8),
                state,
                nsids: (0..nnsid)
                    .map(|i| le::u32(d, ANA_GROUP_HEADER + i * 4))
                    .collect(),
            });
            off += len;
        }
        Ok(AnaLog {
            change_count,
            groups,
        })
    }

    /// The page's size in bytes when encoded.
    pub fn encoded_len(&self) -> usize {
        ANA_LOG_HEADER
            + self
                .groups
                .iter()
                .map(|g| ANA_GROUP_HEADER + 4 * g.nsids.len())
                .sum::<usize>()
    }

    /// Encodes the page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.encoded_len()];
        le::put_u64(&mut b, 0, self.change_count);
        le::put_u16(&mut b, 8, self.groups.len() as u16);
        let mut off = ANA_LOG_HEADER;
        for g in &self.groups {
            let d = &mut b[off..];
            le::put_u32(d, 0, g.grpid);
            le::put_u32(d, 4, g.nsids.len() as u32);
            le::put_u64(d, 8, g.change_count);
            d[16] = g.state.code();
            for (i, n) in g.nsids.iter().enumerate() {
                le::put_u32(d, ANA_GROUP_HEADER + 4 * i, *n);
            }
            off += ANA_GROUP_HEADER + 4 * g.nsids.len();
        }
        b
    }

    /// The state of group `grpid`, if the page lists it.
    pub fn state_of(&self, grpid: u32) -> Option<AnaState> {
        self.groups
            .iter()
            .find(|g| g.grpid == grpid)
            .map(|g| g.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state() -> impl Strategy<Value = AnaState> {
        prop_oneof![
            Just(AnaState::Optimized),
            Just(AnaState::NonOptimized),
            Just(AnaState::Inaccessible),
            Just(AnaState::PersistentLoss),
            Just(AnaState::Change),
        ]
    }

    proptest! {
        #[test]
        fn log_round_trips(
            cc in any::<u64>(),
            groups in proptest::collection::vec(
                (any::<u32>(), any::<u64>(), state(), proptest::collection::vec(any::<u32>(), 0..8)),
                0..6,
            ),
        ) {
            let log = AnaLog {
                change_count: cc,
                groups: groups
                    .into_iter()
                    .map(|(grpid, change_count, state, nsids)| AnaGroup { grpid, change_count, state, nsids })
                    .collect(),
            };
            let b = log.encode();
            prop_assert_eq!(AnaLog::decode(&b, 64, 1024).unwrap(), log);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AnaLog::decode(&b, 16, 64);
        }
    }

    #[test]
    fn counts_beyond_the_page_or_the_limits_are_errors() {
        let log = AnaLog {
            change_count: 1,
            groups: vec![AnaGroup {
                grpid: 1,
                change_count: 1,
                state: AnaState::Optimized,
                nsids: vec![1, 2, 3],
            }],
        };
        let b = log.encode();
        assert!(matches!(
            AnaLog::decode(&b[..b.len() - 1], 8, 8),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            AnaLog::decode(&b, 0, 8),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            AnaLog::decode(&b, 8, 2),
            Err(Error::Invalid { .. })
        ));
        let mut bad = b.clone();
        bad[ANA_LOG_HEADER + 16] = 0x07;
        assert!(matches!(
            AnaLog::decode(&bad, 8, 8),
            Err(Error::Invalid {
                field: "ANA State",
                ..
            })
        ));
        assert_eq!(log.state_of(1), Some(AnaState::Optimized));
        assert_eq!(log.state_of(2), None);
    }
}
