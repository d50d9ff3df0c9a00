//! NVMe over Fabrics commands: Connect, Property Get/Set, Disconnect, and the
//! controller properties they reach (NVMe over Fabrics 1.1 §3.3; NVMe Base
//! 2.0 §3.1.3 controller registers).

use crate::le;
use crate::nvme::Sqe;
use crate::{Error, Result};

/// Opcode shared by all Fabrics commands.
pub const OPC_FABRICS: u8 = 0x7F;

/// Fabrics command types (FCTYPE, SQE byte 4).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTH_RECV: u8 = 0x06;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// Size of the Connect command's data.
pub const CONNECT_DATA_SIZE: usize = 1024;

/// Connect Attributes bit: the host disables SQ flow control (CATTR bit 2).
pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

/// CNTLID value requesting a dynamic controller.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

/// The Connect command's fields from its SQE (NVMe-oF 1.1 Figure 20).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectCmd {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue ID: 0 for the admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes.
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only).
    pub kato: u32,
}

impl ConnectCmd {
    /// Reads the Connect fields from an SQE.
    pub fn from_sqe(s: &Sqe) -> Self {
        ConnectCmd {
            recfmt: s.cdw10 as u16,
            qid: (s.cdw10 >> 16) as u16,
            sqsize: s.cdw11 as u16,
            cattr: (s.cdw11 >> 16) as u8,
            kato: s.cdw12,
        }
    }

    /// Writes the Connect fields (opcode, fctype, cdws) into an SQE.
    pub fn to_sqe(&self, s: &mut Sqe) {
        s.opc = OPC_FABRICS;
        s.nsid = u32::from(fctype::CONNECT);
        s.cdw10 = u32::from(self.recfmt) | (u32::from(self.qid) << 16);
        s.cdw11 = u32::from(self.sqsize) | (u32::from(self.cattr) << 16);
        s.cdw12 = self.kato;
    }

    /// True if the host disabled SQ flow control.
    pub fn sqflow_disabled(&self) -> bool {
        self.cattr & CATTR_DISABLE_SQFLOW != 0
    }
}

/// Connect command data (NVMe-oF 1.1 Figure 21).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectData {
    /// Host Identifier.
    pub hostid: [u8; 16],
    /// Controller ID (0xFFFF: dynamic).
    pub cntlid: u16,
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: String,
    /// Host NVMe Qualified Name.
    pub hostnqn: String,
}

impl ConnectData {
    /// Decodes the 1024-byte Connect data.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < CONNECT_DATA_SIZE {
            return Err(Error::Truncated {
                what: "Connect data",
                need: CONNECT_DATA_SIZE,
                have: b.len(),
            });
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le::u16(b, 16),
            subnqn: nqn_field(b, 256),
            hostnqn: nqn_field(b, 512),
        })
    }

    /// Encodes into 1024 bytes.
    pub fn encode(&self) -> [u8; CONNECT_DATA_SIZE] {
        let mut b = [0u8; CONNECT_DATA_SIZE];
        b[0..16].copy_from_slice(&self.hostid);
        le::put_u16(&mut b, 16, self.cntlid);
        le::put_str_pad(&mut b, 256, 255, &self.subnqn, 0);
        le::put_str_pad(&mut b, 512, 255, &self.hostnqn, 0);
        b
    }
}

/// Reads a NUL-terminated NQN field of 256 bytes.
fn nqn_field(b: &[u8], o: usize) -> String {
    let f = &b[o..o + 256];
    let end = f.iter().position(|&c| c == 0).unwrap_or(256);
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// Property Get / Property Set fields (NVMe-oF 1.1 Figures 26, 28).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PropertyCmd {
    /// Property size: false = 4 bytes, true = 8 bytes (ATTRIB bits 2:0).
    pub size8: bool,
    /// Property offset.
    pub ofst: u32,
    /// Value to set (Property Set only).
    pub value: u64,
}

impl PropertyCmd {
    /// Reads a Property Get/Set from an SQE.
    pub fn from_sqe(s: &Sqe) -> Self {
        PropertyCmd {
            size8: s.cdw10 & 0x7 == 1,
            ofst: s.cdw11,
            value: u64::from(s.cdw12) | (u64::from(s.cdw13) << 32),
        }
    }

    /// Writes a Property Get (`set == false`) or Set into an SQE.
    pub fn to_sqe(&self, set: bool, s: &mut Sqe) {
        s.opc = OPC_FABRICS;
        s.nsid = u32::from(if set {
            fctype::PROPERTY_SET
        } else {
            fctype::PROPERTY_GET
        });
        s.cdw10 = u32::from(self.size8);
        s.cdw11 = self.ofst;
        if set {
            s.cdw12 = self.value as u32;
            s.cdw13 = (self.value >> 32) as u32;
        }
    }
}

// The properties a Property Get/Set names (CAP, VS, CC, CSTS) and their
// fields are the controller registers of `crate::regs`.

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn connect_cmd_round_trips(recfmt: u16, qid: u16, sqsize: u16, cattr: u8, kato: u32) {
            let c = ConnectCmd { recfmt, qid, sqsize, cattr, kato };
            let mut s = Sqe::default();
            c.to_sqe(&mut s);
            prop_assert_eq!(s.fctype(), fctype::CONNECT);
            prop_assert_eq!(ConnectCmd::from_sqe(&s), c);
        }

        #[test]
        fn connect_data_round_trips(hostid: [u8; 16], cntlid: u16, sub in "[a-z0-9.:-]{0,223}", host in "[a-z0-9.:-]{0,223}") {
            let d = ConnectData { hostid, cntlid, subnqn: sub, hostnqn: host };
            prop_assert_eq!(ConnectData::decode(&d.encode()).unwrap(), d);
        }

        #[test]
        fn property_set_round_trips(size8: bool, ofst: u32, value: u64) {
            let p = PropertyCmd { size8, ofst, value };
            let mut s = Sqe::default();
            p.to_sqe(true, &mut s);
            prop_assert_eq!(PropertyCmd::from_sqe(&s), p);
        }
    }

    #[test]
    fn connect_data_offsets_match_spec() {
        let d = ConnectData {
            hostid: [1; 16],
            cntlid: 0xFFFF,
            subnqn: "sub".into(),
            hostnqn: "host".into(),
        };
        let b = d.encode();
        assert_eq!(&b[16..18], &[0xff, 0xff]);
        assert_eq!(&b[256..259], b"sub");
        assert_eq!(&b[512..516], b"host");
        assert!(ConnectData::decode(&b[..1000]).is_err());
    }
}
