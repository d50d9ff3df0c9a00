//! NVMe and NVMe/TCP wire formats: pure encoders and decoders, no I/O.
//!
//! - [`pdu`]: the NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0, §3.6),
//!   header and data digests, and a streaming decoder ([`pdu::PduDecoder`])
//!   that never panics and never allocates more than the negotiated limits.
//! - [`nvme`]: submission/completion queue entries, SGL descriptors, opcodes
//!   and status codes (NVMe Base Specification 2.0, §4 and §3.3).
//! - [`nvm`]: the NVM command layer: block-device operations ([`nvm::IoOp`])
//!   to and from SQEs, Dataset Management range lists, admin command builders.
//! - [`admin`]: admin command data structures (Identify, log pages, features).
//! - [`ana`]: ANA states and the ANA log page.
//! - [`discovery`]: the discovery log page (NVMe over Fabrics 1.1, §5.3).
//! - [`fabrics`]: Connect and property get/set (NVMe over Fabrics, §3).
//! - [`regs`]: the controller registers (offsets, CAP, CC, CSTS; NVMe Base
//!   2.0 §3.1.4), the same for PCIe MMIO and Fabrics properties.
//! - [`bringup`]: controller bring-up (enable, Identify, number of queues,
//!   disable, shutdown) written once over a small trait that a PCIe and a
//!   Fabrics host each implement.
//!
//! This crate knows nothing about sockets, threads or backends; the target
//! and the initiator drive it.

#![deny(missing_docs)]

pub mod admin;
pub mod ana;
pub mod bringup;
pub mod discovery;
pub mod fabrics;
pub mod nvm;
pub mod nvme;
pub mod pdu;
pub mod regs;

/// Errors from decoding wire data.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input is shorter than the structure.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Structure being decoded.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A field holds a value the specification does not allow.
    #[error("invalid {field}: {value:#x}")]
    Invalid {
        /// Field name as in the specification.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Fails with [`Error::Truncated`] unless `buf` holds `n` bytes of `what`.
pub(crate) fn need(what: &'static str, buf: &[u8], n: usize) -> Result<()> {
    if buf.len() < n {
        Err(Error::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Little-endian field helpers shared by the encoders/decoders.
pub(crate) mod le {
    #[inline]
    pub fn u16(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    #[inline]
    pub fn u32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    #[inline]
    pub fn u64(b: &[u8], o: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    }
    #[inline]
    pub fn put_u16(b: &mut [u8], o: usize, v: u16) {
        b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn put_u32(b: &mut [u8], o: usize, v: u32) {
        b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn put_u64(b: &mut [u8], o: usize, v: u64) {
        b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Copies an ASCII string into a space-padded fixed field (Identify strings).
    pub fn put_str_pad(b: &mut [u8], o: usize, len: usize, s: &str, pad: u8) {
        let f = &mut b[o..o + len];
        f.fill(pad);
        let n = s.len().min(len);
        f[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Reads a fixed string field, trimming trailing spaces and NULs.
    pub fn str_field(b: &[u8], o: usize, len: usize) -> String {
        let f = &b[o..o + len];
        let end = f
            .iter()
            .rposition(|&c| c != b' ' && c != 0)
            .map_or(0, |p| p + 1);
        String::from_utf8_lossy(&f[..end]).into_owned()
    }
}

/// Subsystem NQN that `unvme target` serves when given no subsystem of its
/// own, and that the tools connect to by default.
pub const DEFAULT_SUBNQN: &str = "nqn.2024-11.io.unvme:default";

/// Default NVMe/TCP port for I/O subsystems (and, on unvme, discovery too).
pub const DEFAULT_PORT: u16 = 4420;
