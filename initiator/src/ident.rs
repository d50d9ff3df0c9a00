//! Decoders for the admin data structures the host reads: Identify
//! Controller (NVMe Base 2.0 Figure 275), Identify Namespace (NVM Command
//! Set 1.0 Figure 97), the Namespace Identification Descriptor list (Base
//! 2.0 Figure 279), and the discovery log page (NVMe over Fabrics 1.1
//! Figures 37-38).
//!
//! These are the host's own readers of the fields it uses; they accept any
//! input length (missing bytes read as zero) and never panic.

/// Little-endian reads that treat bytes beyond the input as zero.
fn byte(b: &[u8], o: usize) -> u8 {
    b.get(o).copied().unwrap_or(0)
}
fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([byte(b, o), byte(b, o + 1)])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([byte(b, o), byte(b, o + 1), byte(b, o + 2), byte(b, o + 3)])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | (u64::from(le32(b, o + 4)) << 32)
}
fn bytes<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    for (i, x) in a.iter_mut().enumerate() {
        *x = byte(b, o + i);
    }
    a
}
/// An ASCII field, trailing spaces and NULs removed.
fn text(b: &[u8], o: usize, len: usize) -> String {
    let f: Vec<u8> = (0..len).map(|i| byte(b, o + i)).collect();
    let end = f.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&f[..end]).trim_end().to_string()
}

/// Controller type (CNTRLTYPE, Identify Controller byte 111).
pub mod cntrltype {
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMIN: u8 = 3;
}

/// The Identify Controller fields the host uses and the tools print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial Number.
    pub sn: String,
    /// Model Number.
    pub mn: String,
    /// Firmware Revision.
    pub fr: String,
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI.
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities.
    pub cmic: u8,
    /// Maximum Data Transfer Size (power of two, in CAP.MPSMIN units; 0 = none).
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version.
    pub ver: u32,
    /// Optional Asynchronous Events Supported.
    pub oaes: u32,
    /// Controller Attributes.
    pub ctratt: u32,
    /// Controller Type.
    pub cntrltype: u8,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Abort Command Limit.
    pub acl: u8,
    /// Asynchronous Event Request Limit.
    pub aerl: u8,
    /// Log Page Attributes.
    pub lpa: u8,
    /// Error Log Page Entries.
    pub elpe: u8,
    /// Keep Alive Support (100 ms units).
    pub kas: u16,
    /// SQ entry sizes.
    pub sqes: u8,
    /// CQ entry sizes.
    pub cqes: u8,
    /// Maximum Outstanding Commands.
    pub maxcmd: u16,
    /// Number of Namespaces.
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Fused Operation Support.
    pub fuses: u16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache.
    pub vwc: u8,
    /// Atomic Write Unit Normal.
    pub awun: u16,
    /// Atomic Write Unit Power Fail.
    pub awupf: u16,
    /// SGL Support.
    pub sgls: u32,
    /// NVM Subsystem NQN.
    pub subnqn: String,
    /// I/O Queue Command Capsule Supported Size (16-byte units).
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size (16-byte units).
    pub iorcsz: u32,
    /// In Capsule Data Offset (16-byte units).
    pub icdoff: u16,
    /// Fabrics Controller Attributes.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors.
    pub msdbd: u8,
}

impl IdentifyController {
    /// Decodes the 4096-byte Identify Controller data structure.
    pub fn decode(b: &[u8]) -> Self {
        IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            sn: text(b, 4, 20),
            mn: text(b, 24, 40),
            fr: text(b, 64, 8),
            rab: byte(b, 72),
            ieee: bytes(b, 73),
            cmic: byte(b, 76),
            mdts: byte(b, 77),
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            oaes: le32(b, 92),
            ctratt: le32(b, 96),
            cntrltype: byte(b, 111),
            oacs: le16(b, 256),
            acl: byte(b, 258),
            aerl: byte(b, 259),
            lpa: byte(b, 261),
            elpe: byte(b, 262),
            kas: le16(b, 320),
            sqes: byte(b, 512),
            cqes: byte(b, 513),
            maxcmd: le16(b, 514),
            nn: le32(b, 516),
            oncs: le16(b, 520),
            fuses: le16(b, 522),
            fna: byte(b, 524),
            vwc: byte(b, 525),
            awun: le16(b, 526),
            awupf: le16(b, 528),
            sgls: le32(b, 536),
            subnqn: text(b, 768, 256),
            ioccsz: le32(b, 1792),
            iorcsz: le32(b, 1796),
            icdoff: le16(b, 1800),
            fcatt: byte(b, 1802),
            msdbd: byte(b, 1803),
        }
    }

    /// Largest transfer in bytes (MDTS with a 4 KiB minimum page size), 0
    /// when the controller sets no limit.
    pub fn max_transfer(&self) -> u32 {
        match self.mdts {
            0 => 0,
            m if m >= 20 => 1 << 31,
            m => 4096u32 << m,
        }
    }

    /// Most in-capsule data bytes an I/O command may carry
    /// (IOCCSZ * 16 - 64; 0 when the controller supports none).
    pub fn incapsule_data_size(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }

    /// ONCS bit 2: Dataset Management supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// ONCS bit 3: Write Zeroes supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// VWC bit 0: a volatile write cache is present.
    pub fn volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }

    /// The version as `major.minor.tertiary`.
    pub fn version_string(&self) -> String {
        version_string(self.ver)
    }
}

/// Formats an NVMe version value (VS register or Identify VER).
pub fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

/// One LBA Format (Identify Namespace LBAF entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata Size in bytes.
    pub ms: u16,
    /// LBA Data Size as a power of two.
    pub lbads: u8,
    /// Relative Performance.
    pub rp: u8,
}

impl LbaFormat {
    /// The logical block size in bytes (0 if LBADS is out of range).
    pub fn block_size(&self) -> u32 {
        if (9..32).contains(&self.lbads) {
            1 << self.lbads
        } else {
            0
        }
    }
}

/// The Identify Namespace fields the host uses and the tools print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace Size (blocks).
    pub nsze: u64,
    /// Namespace Capacity (blocks).
    pub ncap: u64,
    /// Namespace Utilization (blocks).
    pub nuse: u64,
    /// Namespace Features.
    pub nsfeat: u8,
    /// Number of LBA Formats (0's based).
    pub nlbaf: u8,
    /// Formatted LBA Size.
    pub flbas: u8,
    /// Metadata Capabilities.
    pub mc: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities.
    pub nmic: u8,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// The LBA formats (`nlbaf + 1` of them, at most 64).
    pub lbaf: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Decodes the 4096-byte Identify Namespace data structure.
    pub fn decode(b: &[u8]) -> Self {
        let nlbaf = byte(b, 25);
        let lbaf = (0..=usize::from(nlbaf).min(63))
            .map(|i| {
                let o = 128 + 4 * i;
                LbaFormat {
                    ms: le16(b, o),
                    lbads: byte(b, o + 2),
                    rp: byte(b, o + 3) & 0x3,
                }
            })
            .collect();
        IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: byte(b, 24),
            nlbaf,
            flbas: byte(b, 26),
            mc: byte(b, 27),
            nmic: byte(b, 30),
            nguid: bytes(b, 104),
            eui64: bytes(b, 120),
            lbaf,
        }
    }

    /// Index of the LBA format in use (FLBAS bits 3:0, and 6:5 as the upper
    /// bits when more than 16 formats exist).
    pub fn lbaf_index(&self) -> usize {
        let lo = usize::from(self.flbas & 0xf);
        if self.nlbaf >= 16 {
            lo | (usize::from((self.flbas >> 5) & 0x3) << 4)
        } else {
            lo
        }
    }

    /// The logical block size in use (0 if FLBAS names no valid format).
    pub fn block_size(&self) -> u32 {
        self.lbaf
            .get(self.lbaf_index())
            .map_or(0, LbaFormat::block_size)
    }

    /// NSFEAT bit 0: THINP; reads of deallocated blocks are defined.
    pub fn thin_provisioned(&self) -> bool {
        self.nsfeat & 1 != 0
    }
}

/// Namespace Identifier Type values (NIDT).
pub mod nidt {
    /// IEEE Extended Unique Identifier (8 bytes).
    pub const EUI64: u8 = 1;
    /// Namespace Globally Unique Identifier (16 bytes).
    pub const NGUID: u8 = 2;
    /// Namespace UUID (16 bytes).
    pub const UUID: u8 = 3;
    /// Command Set Identifier (1 byte).
    pub const CSI: u8 = 4;
}

/// One Namespace Identification Descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsDescriptor {
    /// Namespace Identifier Type.
    pub nidt: u8,
    /// Namespace Identifier.
    pub nid: Vec<u8>,
}

/// Decodes a Namespace Identification Descriptor list (CNS 03h): entries
/// until a zero NIDT or the end of the data.
pub fn decode_ns_descriptors(b: &[u8]) -> Vec<NsDescriptor> {
    let mut out = Vec::new();
    let mut o = 0;
    while o + 4 <= b.len() {
        let (t, l) = (b[o], usize::from(b[o + 1]));
        if t == 0 || l == 0 || o + 4 + l > b.len() {
            break;
        }
        out.push(NsDescriptor {
            nidt: t,
            nid: b[o + 4..o + 4 + l].to_vec(),
        });
        o += 4 + l;
    }
    out
}

/// Decodes an Active Namespace ID list (CNS 02h): NSIDs until the first zero.
pub fn decode_ns_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

/// Size of the discovery log page header and of each entry.
pub const DISCOVERY_RECORD: usize = 1024;

/// The discovery log page header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryLogHeader {
    /// Generation Counter.
    pub genctr: u64,
    /// Number of Records.
    pub numrec: u64,
    /// Record Format.
    pub recfmt: u16,
}

impl DiscoveryLogHeader {
    /// Decodes the first 1024 bytes of the discovery log page.
    pub fn decode(b: &[u8]) -> Self {
        DiscoveryLogHeader {
            genctr: le64(b, 0),
            numrec: le64(b, 8),
            recfmt: le16(b, 16),
        }
    }
}

/// One Discovery Log Page Entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    /// Transport Type (3 = TCP).
    pub trtype: u8,
    /// Address Family (1 = IPv4, 2 = IPv6).
    pub adrfam: u8,
    /// Subsystem Type (1 = referral, 2 = NVM, 3 = current discovery).
    pub subtype: u8,
    /// Transport Requirements.
    pub treq: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID.
    pub cntlid: u16,
    /// Admin Max SQ Size.
    pub asqsz: u16,
    /// Entry Flags.
    pub eflags: u16,
    /// Transport Service Identifier (the TCP port).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport Address.
    pub traddr: String,
    /// Transport Specific Address Subtype (TCP: SECTYPE in byte 0).
    pub tsas: [u8; 4],
}

impl DiscoveryLogEntry {
    /// Decodes one 1024-byte entry.
    pub fn decode(b: &[u8]) -> Self {
        DiscoveryLogEntry {
            trtype: byte(b, 0),
            adrfam: byte(b, 1),
            subtype: byte(b, 2),
            treq: byte(b, 3),
            portid: le16(b, 4),
            cntlid: le16(b, 6),
            asqsz: le16(b, 8),
            eflags: le16(b, 10),
            trsvcid: text(b, 32, 32),
            subnqn: text(b, 256, 256),
            traddr: text(b, 512, 256),
            tsas: bytes(b, 768),
        }
    }

    /// TRTYPE as nvme-cli prints it.
    pub fn trtype_str(&self) -> &'static str {
        match self.trtype {
            1 => "rdma",
            2 => "fc",
            3 => "tcp",
            254 => "loop",
            _ => "unrecognized",
        }
    }

    /// ADRFAM as nvme-cli prints it.
    pub fn adrfam_str(&self) -> &'static str {
        match self.adrfam {
            1 => "ipv4",
            2 => "ipv6",
            3 => "infiniband",
            4 => "fibre-channel",
            254 => "loop",
            _ => "unrecognized",
        }
    }

    /// SUBTYPE as nvme-cli prints it.
    pub fn subtype_str(&self) -> &'static str {
        match self.subtype {
            1 => "discovery subsystem referral",
            2 => "nvme subsystem",
            3 => "current discovery subsystem",
            _ => "unrecognized",
        }
    }

    /// TREQ as nvme-cli prints it.
    pub fn treq_str(&self) -> &'static str {
        match self.treq & 0x3 {
            0 => "not specified",
            1 => "required",
            2 => "not required",
            _ => "reserved",
        }
    }
}

/// A whole discovery log page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryLog {
    /// Generation Counter.
    pub genctr: u64,
    /// Record Format.
    pub recfmt: u16,
    /// The entries.
    pub entries: Vec<DiscoveryLogEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_controller_fields_are_read_at_spec_offsets() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"SERIAL01            ");
        b[77] = 5;
        b[78..80].copy_from_slice(&7u16.to_le_bytes());
        b[111] = cntrltype::IO;
        b[516..520].copy_from_slice(&3u32.to_le_bytes());
        b[768..775].copy_from_slice(b"nqn.sub");
        b[1792..1796].copy_from_slice(&260u32.to_le_bytes());
        let id = IdentifyController::decode(&b);
        assert_eq!(id.vid, 0x1b36);
        assert_eq!(id.sn, "SERIAL01");
        assert_eq!(id.max_transfer(), 128 * 1024);
        assert_eq!(id.cntlid, 7);
        assert_eq!(id.nn, 3);
        assert_eq!(id.subnqn, "nqn.sub");
        assert_eq!(id.incapsule_data_size(), 4096);
    }

    #[test]
    fn identify_namespace_block_size_follows_flbas() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1;
        b[128 + 2] = 9;
        b[132 + 2] = 12;
        let id = IdentifyNamespace::decode(&b);
        assert_eq!(id.nsze, 1000);
        assert_eq!(id.lbaf.len(), 2);
        assert_eq!(id.block_size(), 4096);
    }

    #[test]
    fn short_or_garbage_input_never_panics() {
        let _ = IdentifyController::decode(&[0xff; 10]);
        let id = IdentifyNamespace::decode(&[0xff; 30]);
        assert_eq!(id.block_size(), 0);
        assert!(decode_ns_descriptors(&[1, 200, 0, 0, 1]).is_empty());
        assert_eq!(
            decode_ns_list(&[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9]),
            [1, 2]
        );
    }

    #[test]
    fn ns_descriptors_are_split_by_length() {
        let mut b = vec![0u8; 64];
        b[0] = nidt::NGUID;
        b[1] = 16;
        b[4..20].fill(0xab);
        b[20] = nidt::CSI;
        b[21] = 1;
        let d = decode_ns_descriptors(&b);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].nid, vec![0xab; 16]);
        assert_eq!(d[1].nid, vec![0]);
    }
}
