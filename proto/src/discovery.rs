//! The Discovery Log Page, log page 70h (NVMe over Fabrics 1.1, §5.3; NVMe
//! Base 2.0, §5.16, Discovery log page): a 1024-byte header followed by
//! 1024-byte entries, one per subsystem port a host may connect to.
//!
//! [`encode_log`] builds a whole page; the discovery controller slices it
//! for the offset and length a Get Log Page asks for. [`decode_log`] reads a
//! page, or the leading part of one, without trusting `numrec` for
//! allocation. This module knows nothing about which subsystems exist or
//! which host may see them.

use crate::admin::{nul_str, put_nul_str};
use crate::{le, need, Result};

/// Well-known NQN of a discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Transport Type (TRTYPE): RDMA.
pub const TRTYPE_RDMA: u8 = 1;
/// Transport Type (TRTYPE): Fibre Channel.
pub const TRTYPE_FC: u8 = 2;
/// Transport Type (TRTYPE): TCP.
pub const TRTYPE_TCP: u8 = 3;
/// Transport Type (TRTYPE): intra-host transport (loopback).
pub const TRTYPE_INTRA_HOST: u8 = 0xFE;

/// Address Family (ADRFAM): IPv4.
pub const ADRFAM_IPV4: u8 = 1;
/// Address Family (ADRFAM): IPv6.
pub const ADRFAM_IPV6: u8 = 2;
/// Address Family (ADRFAM): InfiniBand.
pub const ADRFAM_IB: u8 = 3;
/// Address Family (ADRFAM): Fibre Channel.
pub const ADRFAM_FC: u8 = 4;
/// Address Family (ADRFAM): intra-host transport (loopback).
pub const ADRFAM_INTRA_HOST: u8 = 0xFE;

/// Subsystem Type (SUBTYPE): a referral to another discovery subsystem.
pub const SUBTYPE_REFERRAL: u8 = 1;
/// Subsystem Type (SUBTYPE): an NVM subsystem with I/O controllers.
pub const SUBTYPE_NVME: u8 = 2;
/// Subsystem Type (SUBTYPE): the discovery subsystem being queried.
pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;

/// Transport Requirements (TREQ) bits 1:0, secure channel: not specified.
pub const TREQ_NOT_SPECIFIED: u8 = 0;
/// TREQ bits 1:0: a secure channel is required.
pub const TREQ_REQUIRED: u8 = 1;
/// TREQ bits 1:0: a secure channel is not required.
pub const TREQ_NOT_REQUIRED: u8 = 2;
/// TREQ bits 1:0: the secure channel requirement field.
pub const TREQ_SECURE_CHANNEL_MASK: u8 = 0x3;
/// TREQ bit 2: the controller supports disabling SQ flow control.
pub const TREQ_DISABLE_SQFLOW: u8 = 1 << 2;

/// Entry Flags (EFLAGS) bit 0: Duplicate Returned Information (DUPRETINFO).
pub const EFLAGS_DUPRETINFO: u16 = 1 << 0;
/// EFLAGS bit 1: Explicit Persistent Connection Support for Discovery
/// (EPCSD).
pub const EFLAGS_EPCSD: u16 = 1 << 1;

/// TCP Security Type (TSAS SECTYPE): no security.
pub const SECTYPE_NONE: u8 = 0;
/// TCP Security Type (TSAS SECTYPE): TLS 1.2.
pub const SECTYPE_TLS12: u8 = 1;
/// TCP Security Type (TSAS SECTYPE): TLS 1.3.
pub const SECTYPE_TLS13: u8 = 2;

/// CNTLID of an entry for the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

/// Discovery Log Page header (NVMe over Fabrics 1.1, §5.3): 1024 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscoveryLogHeader {
    /// Generation Counter (bytes 07:00); changes whenever the log changes.
    pub genctr: u64,
    /// Number of Records (bytes 15:08).
    pub numrec: u64,
    /// Record Format (bytes 17:16); 0 is the only format defined.
    pub recfmt: u16,
}

impl DiscoveryLogHeader {
    /// Encoded size in bytes.
    pub const SIZE: usize = 1024;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`, zeroing the
    /// reserved bytes.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::SIZE];
        b.fill(0);
        le::put_u64(b, 0, self.genctr);
        le::put_u64(b, 8, self.numrec);
        le::put_u16(b, 16, self.recfmt);
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("discovery log header", buf, Self::SIZE)?;
        Ok(Self {
            genctr: le::u64(buf, 0),
            numrec: le::u64(buf, 8),
            recfmt: le::u16(buf, 16),
        })
    }
}

/// Discovery Log Page Entry (NVMe over Fabrics 1.1, §5.3): 1024 bytes.
///
/// `trsvcid` and `traddr` are ASCII, space padded; `subnqn` is NUL
/// terminated (at most 255 bytes are encoded). Longer strings are cut to
/// the field. Of the Transport Specific Address Subtype (TSAS, bytes
/// 1023:768) only the TCP SECTYPE byte is modeled; the rest is zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    /// Transport Type (byte 0), e.g. [`TRTYPE_TCP`].
    pub trtype: u8,
    /// Address Family (byte 1), e.g. [`ADRFAM_IPV4`].
    pub adrfam: u8,
    /// Subsystem Type (byte 2), e.g. [`SUBTYPE_NVME`].
    pub subtype: u8,
    /// Transport Requirements (byte 3), e.g. [`TREQ_NOT_REQUIRED`].
    pub treq: u8,
    /// Port ID (bytes 05:04).
    pub portid: u16,
    /// Controller ID (bytes 07:06); [`CNTLID_DYNAMIC`] for the dynamic
    /// controller model.
    pub cntlid: u16,
    /// Admin Max SQ Size (bytes 09:08).
    pub asqsz: u16,
    /// Entry Flags (bytes 11:10), e.g. [`EFLAGS_EPCSD`].
    pub eflags: u16,
    /// Transport Service Identifier (bytes 63:32), for TCP the port number.
    pub trsvcid: String,
    /// NVM Subsystem Qualified Name (bytes 511:256).
    pub subnqn: String,
    /// Transport Address (bytes 767:512), for TCP an IP address.
    pub traddr: String,
    /// TSAS for TCP: Security Type (byte 768), e.g. [`SECTYPE_NONE`].
    pub sectype: u8,
}

impl DiscoveryLogEntry {
    /// Encoded size in bytes.
    pub const SIZE: usize = 1024;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`, zeroing the
    /// reserved bytes.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::SIZE];
        b.fill(0);
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        le::put_u16(b, 4, self.portid);
        le::put_u16(b, 6, self.cntlid);
        le::put_u16(b, 8, self.asqsz);
        le::put_u16(b, 10, self.eflags);
        le::put_str_pad(b, 32, 32, &self.trsvcid, b' ');
        put_nul_str(b, 256, 256, &self.subnqn);
        le::put_str_pad(b, 512, 256, &self.traddr, b' ');
        b[768] = self.sectype;
    }

    /// Encodes into a new array.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut a = [0u8; Self::SIZE];
        self.encode(&mut a);
        a
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("discovery log entry", buf, Self::SIZE)?;
        let b = buf;
        Ok(Self {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: le::u16(b, 4),
            cntlid: le::u16(b, 6),
            asqsz: le::u16(b, 8),
            eflags: le::u16(b, 10),
            trsvcid: nul_str(b, 32, 32),
            subnqn: nul_str(b, 256, 256),
            traddr: nul_str(b, 512, 256),
            sectype: b[768],
        })
    }
}

/// Encodes a whole Discovery Log Page: the header (`numrec` =
/// `entries.len()`, `recfmt` 0) followed by every entry.
///
/// The caller slices the result for the Get Log Page offset and length,
/// zero filling whatever lies past its end.
pub fn encode_log(genctr: u64, entries: &[DiscoveryLogEntry]) -> Vec<u8> {
    let mut v = vec![0u8; DiscoveryLogHeader::SIZE + entries.len() * DiscoveryLogEntry::SIZE];
    DiscoveryLogHeader {
        genctr,
        numrec: entries.len() as u64,
        recfmt: 0,
    }
    .encode(&mut v);
    for (e, chunk) in entries
        .iter()
        .zip(v[DiscoveryLogHeader::SIZE..].chunks_exact_mut(DiscoveryLogEntry::SIZE))
    {
        e.encode(chunk);
    }
    v
}

/// Decodes a Discovery Log Page, or its leading part: the header and the
/// `min(numrec, whole entries present in buf)` entries that follow.
///
/// A host reading the page in pieces compares the entry count with
/// `numrec` to see whether it has all of it. Allocation is bounded by
/// `buf.len()`, never by `numrec`. A `buf` shorter than the header is
/// [`Error::Truncated`].
pub fn decode_log(buf: &[u8]) -> Result<(DiscoveryLogHeader, Vec<DiscoveryLogEntry>)> {
    let hdr = DiscoveryLogHeader::decode(buf)?;
    let body = &buf[DiscoveryLogHeader::SIZE..];
    let present = body.len() / DiscoveryLogEntry::SIZE;
    let n = usize::try_from(hdr.numrec).map_or(present, |r| r.min(present));
    let entries = body
        .chunks_exact(DiscoveryLogEntry::SIZE)
        .take(n)
        .map(DiscoveryLogEntry::decode)
        .collect::<Result<Vec<_>>>()?;
    Ok((hdr, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ascii(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[ -~]{{0,{max}}}"))
            .expect("valid regex")
            .prop_map(|s| s.trim_end().to_string())
    }

    fn entry() -> impl Strategy<Value = DiscoveryLogEntry> {
        (
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()),
            (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
            (ascii(32), ascii(223), ascii(256), any::<u8>()),
        )
            .prop_map(
                |(
                    (trtype, adrfam, subtype, treq),
                    (portid, cntlid, asqsz, eflags),
                    (trsvcid, subnqn, traddr, sectype),
                )| DiscoveryLogEntry {
                    trtype,
                    adrfam,
                    subtype,
                    treq,
                    portid,
                    cntlid,
                    asqsz,
                    eflags,
                    trsvcid,
                    subnqn,
                    traddr,
                    sectype,
                },
            )
    }

    fn tcp_entry(nqn: &str, port: &str) -> DiscoveryLogEntry {
        DiscoveryLogEntry {
            trtype: TRTYPE_TCP,
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            treq: TREQ_NOT_REQUIRED,
            portid: 1,
            cntlid: CNTLID_DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid: port.into(),
            subnqn: nqn.into(),
            traddr: "192.168.1.10".into(),
            sectype: SECTYPE_NONE,
        }
    }

    proptest! {
        #[test]
        fn entry_round_trips(e in entry()) {
            prop_assert_eq!(DiscoveryLogEntry::decode(&e.to_bytes()).unwrap(), e);
        }

        #[test]
        fn header_round_trips(genctr in any::<u64>(), numrec in any::<u64>(), recfmt in any::<u16>()) {
            let h = DiscoveryLogHeader { genctr, numrec, recfmt };
            let mut b = [0xAAu8; DiscoveryLogHeader::SIZE];
            h.encode(&mut b);
            prop_assert!(b[18..].iter().all(|&x| x == 0));
            prop_assert_eq!(DiscoveryLogHeader::decode(&b).unwrap(), h);
        }

        #[test]
        fn log_round_trips(
            genctr in any::<u64>(),
            entries in proptest::collection::vec(entry(), 0..6),
        ) {
            let page = encode_log(genctr, &entries);
            prop_assert_eq!(page.len(), 1024 * (1 + entries.len()));
            let (h, back) = decode_log(&page).unwrap();
            prop_assert_eq!(h.genctr, genctr);
            prop_assert_eq!(h.numrec, entries.len() as u64);
            prop_assert_eq!(h.recfmt, 0);
            prop_assert_eq!(back, entries);
        }

        /// A page read in pieces decodes the whole entries it holds.
        #[test]
        fn log_prefix_decodes_present_entries(
            entries in proptest::collection::vec(entry(), 0..5),
            cut in 1024usize..6 * 1024,
        ) {
            let page = encode_log(1, &entries);
            let cut = cut.min(page.len());
            let (h, back) = decode_log(&page[..cut]).unwrap();
            prop_assert_eq!(h.numrec, entries.len() as u64);
            let n = (cut - 1024) / 1024;
            prop_assert_eq!(&back[..], &entries[..n]);
        }

        #[test]
        fn decoders_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = DiscoveryLogHeader::decode(&raw);
            let _ = DiscoveryLogEntry::decode(&raw);
            let _ = decode_log(&raw);
        }
    }

    #[test]
    fn entry_fields_at_spec_offsets() {
        let e = tcp_entry("nqn.2024-01.io.unvme:disk0", "4420");
        let b = e.to_bytes();
        assert_eq!(&b[0..4], &[3, 1, 2, 2]);
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(&b[6..8], &[0xFF, 0xFF]);
        assert_eq!(&b[8..10], &[32, 0]);
        assert!(b[12..32].iter().all(|&x| x == 0));
        assert_eq!(&b[32..36], b"4420");
        assert!(
            b[36..64].iter().all(|&x| x == b' '),
            "trsvcid is space padded"
        );
        assert!(b[64..256].iter().all(|&x| x == 0));
        assert_eq!(&b[256..282], b"nqn.2024-01.io.unvme:disk0");
        assert!(b[282..512].iter().all(|&x| x == 0), "subnqn is NUL padded");
        assert_eq!(&b[512..524], b"192.168.1.10");
        assert!(
            b[524..768].iter().all(|&x| x == b' '),
            "traddr is space padded"
        );
        assert_eq!(b[768], SECTYPE_NONE);
    }

    #[test]
    fn nul_padded_fields_from_other_targets_decode() {
        // Linux nvmet copies NUL-padded configfs strings into trsvcid/traddr.
        let mut b = tcp_entry("nqn.a", "x").to_bytes();
        b[32..64].fill(0);
        b[32..36].copy_from_slice(b"8009");
        b[512..768].fill(0);
        b[512..520].copy_from_slice(b"10.0.0.1");
        let e = DiscoveryLogEntry::decode(&b).unwrap();
        assert_eq!(e.trsvcid, "8009");
        assert_eq!(e.traddr, "10.0.0.1");
    }

    #[test]
    fn encode_log_layout() {
        let page = encode_log(
            7,
            &[
                tcp_entry("nqn.a", "4420"),
                DiscoveryLogEntry {
                    subtype: SUBTYPE_CURRENT_DISCOVERY,
                    subnqn: DISCOVERY_NQN.into(),
                    ..tcp_entry("", "8009")
                },
            ],
        );
        assert_eq!(page.len(), 3 * 1024);
        assert_eq!(&page[0..8], &7u64.to_le_bytes());
        assert_eq!(&page[8..16], &2u64.to_le_bytes());
        assert_eq!(&page[16..18], &[0, 0]);
        assert_eq!(&page[1024 + 256..1024 + 261], b"nqn.a");
        assert_eq!(page[2048 + 2], SUBTYPE_CURRENT_DISCOVERY);
        assert_eq!(&page[2048 + 256..2048 + 256 + 36], DISCOVERY_NQN.as_bytes());
    }

    #[test]
    fn huge_numrec_is_bounded_by_the_buffer() {
        let mut page = encode_log(1, &[tcp_entry("nqn.a", "4420")]);
        page[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let (h, entries) = decode_log(&page).unwrap();
        assert_eq!(h.numrec, u64::MAX);
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn numrec_smaller_than_buffer_limits_entries() {
        let mut page = encode_log(1, &[tcp_entry("nqn.a", "1"), tcp_entry("nqn.b", "2")]);
        page[8..16].copy_from_slice(&1u64.to_le_bytes());
        let (_, entries) = decode_log(&page).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].subnqn, "nqn.a");
    }

    #[test]
    fn truncated_input_is_an_error() {
        assert!(matches!(
            decode_log(&[0u8; 1023]),
            Err(crate::Error::Truncated {
                need: 1024,
                have: 1023,
                ..
            })
        ));
        assert!(DiscoveryLogEntry::decode(&[0u8; 1023]).is_err());
        assert!(decode_log(&[]).is_err());
        // A header alone is a valid (empty) prefix.
        let (h, e) = decode_log(&encode_log(3, &[tcp_entry("n", "1")])[..1024]).unwrap();
        assert_eq!((h.numrec, e.len()), (1, 0));
    }
}
