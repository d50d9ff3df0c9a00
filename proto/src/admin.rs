//! Admin command data structures (NVMe Base Specification 2.0, §5): the
//! Identify data structures, the log pages a target serves, the Features a
//! host sets, and the dword layouts of the commands that carry them.
//!
//! Every structure is a plain struct with `pub` fields named as the
//! specification abbreviates them, an `encode` into a caller-provided
//! buffer (all bytes the struct does not model, reserved or vendor specific,
//! are written as zero) and a `decode` that checks the length first and never
//! panics on peer data. Byte offsets follow the specification figures and
//! agree with Linux `include/linux/nvme.h`.
//!
//! This module does not execute commands, pick queue sizes or keep state;
//! the target and the initiator do that.

use crate::{le, need, Error, Result};

/// Admin command opcodes (NVMe Base 2.0, §5, Opcodes for Admin Commands;
/// Fabrics 7Fh from NVMe over Fabrics 1.1).
pub mod opc {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Namespace Management.
    pub const NS_MGMT: u8 = 0x0D;
    /// Firmware Commit.
    pub const FW_COMMIT: u8 = 0x10;
    /// Firmware Image Download.
    pub const FW_IMAGE_DOWNLOAD: u8 = 0x11;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x14;
    /// Namespace Attachment.
    pub const NS_ATTACHMENT: u8 = 0x15;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Directive Send.
    pub const DIRECTIVE_SEND: u8 = 0x19;
    /// Directive Receive.
    pub const DIRECTIVE_RECV: u8 = 0x1A;
    /// Virtualization Management.
    pub const VIRTUALIZATION_MGMT: u8 = 0x1C;
    /// NVMe-MI Send.
    pub const NVME_MI_SEND: u8 = 0x1D;
    /// NVMe-MI Receive.
    pub const NVME_MI_RECV: u8 = 0x1E;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7C;
    /// Fabrics command (the command type is in FCTYPE).
    pub const FABRICS: u8 = 0x7F;
    /// Format NVM.
    pub const FORMAT_NVM: u8 = 0x80;
    /// Security Send.
    pub const SECURITY_SEND: u8 = 0x81;
    /// Security Receive.
    pub const SECURITY_RECV: u8 = 0x82;
    /// Sanitize.
    pub const SANITIZE: u8 = 0x84;
    /// Get LBA Status.
    pub const GET_LBA_STATUS: u8 = 0x86;
}

/// Identify Controller or Namespace Structure (CNS) values
/// (NVMe Base 2.0, §5.17, Identify command).
pub mod cns {
    /// Identify Namespace data structure for the NSID.
    pub const NS: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CTRL: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list.
    pub const NS_DESC_LIST: u8 = 0x03;
    /// NVM Set list.
    pub const NVM_SET_LIST: u8 = 0x04;
    /// I/O Command Set specific Identify Namespace data structure.
    pub const CS_NS: u8 = 0x05;
    /// I/O Command Set specific Identify Controller data structure.
    pub const CS_CTRL: u8 = 0x06;
    /// Active Namespace ID list for an I/O Command Set.
    pub const CS_ACTIVE_NS_LIST: u8 = 0x07;
    /// I/O Command Set Independent Identify Namespace data structure.
    pub const CS_INDEP_NS: u8 = 0x08;
    /// Allocated Namespace ID list.
    pub const ALLOCATED_NS_LIST: u8 = 0x10;
    /// Identify Namespace data structure for an allocated NSID.
    pub const ALLOCATED_NS: u8 = 0x11;
    /// Controller list of controllers attached to the NSID.
    pub const NS_CTRL_LIST: u8 = 0x12;
    /// Controller list of controllers in the NVM subsystem.
    pub const CTRL_LIST: u8 = 0x13;
    /// Primary Controller Capabilities data structure.
    pub const PRIMARY_CTRL_CAPS: u8 = 0x14;
    /// Secondary Controller list.
    pub const SECONDARY_CTRL_LIST: u8 = 0x15;
    /// Namespace Granularity list.
    pub const NS_GRANULARITY_LIST: u8 = 0x16;
    /// UUID list.
    pub const UUID_LIST: u8 = 0x17;
    /// Endurance Group list.
    pub const ENDGRP_LIST: u8 = 0x19;
    /// Identify I/O Command Set data structure.
    pub const IO_CMD_SET: u8 = 0x1C;
}

/// Log Page Identifiers (NVMe Base 2.0, §5.16, Figure 202).
pub mod lid {
    /// Supported Log Pages.
    pub const SUPPORTED: u8 = 0x00;
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const CMD_EFFECTS: u8 = 0x05;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    /// Telemetry Host-Initiated.
    pub const TELEMETRY_HOST: u8 = 0x07;
    /// Telemetry Controller-Initiated.
    pub const TELEMETRY_CTRL: u8 = 0x08;
    /// Endurance Group Information.
    pub const ENDURANCE_GROUP: u8 = 0x09;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0C;
    /// Persistent Event Log.
    pub const PERSISTENT_EVENT: u8 = 0x0D;
    /// Discovery (NVMe over Fabrics 1.1, §5.3); see [`crate::discovery`].
    pub const DISCOVERY: u8 = 0x70;
    /// Reservation Notification.
    pub const RESERVATION: u8 = 0x80;
    /// Sanitize Status.
    pub const SANITIZE: u8 = 0x81;
}

/// Feature Identifiers (NVMe Base 2.0, §5.27, Set Features command).
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// LBA Range Type.
    pub const LBA_RANGE: u8 = 0x03;
    /// Temperature Threshold.
    pub const TEMP_THRESH: u8 = 0x04;
    /// Error Recovery.
    pub const ERR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache; see [`super::VolatileWriteCache`].
    pub const VOLATILE_WC: u8 = 0x06;
    /// Number of Queues; see [`super::NumberOfQueues`].
    pub const NUM_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const IRQ_COALESCE: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const IRQ_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMIC: u8 = 0x0A;
    /// Asynchronous Event Configuration; see [`super::aec`].
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    /// Autonomous Power State Transition.
    pub const AUTO_PST: u8 = 0x0C;
    /// Host Memory Buffer.
    pub const HOST_MEM_BUF: u8 = 0x0D;
    /// Timestamp.
    pub const TIMESTAMP: u8 = 0x0E;
    /// Keep Alive Timer; see [`super::KeepAliveTimer`].
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    /// Host Controlled Thermal Management.
    pub const HCTM: u8 = 0x10;
    /// Non-Operational Power State Config.
    pub const NOPSC: u8 = 0x11;
    /// Read Recovery Level Config.
    pub const RRL: u8 = 0x12;
    /// Predictable Latency Mode Config.
    pub const PLM_CONFIG: u8 = 0x13;
    /// Predictable Latency Mode Window.
    pub const PLM_WINDOW: u8 = 0x14;
    /// Host Behavior Support.
    pub const HOST_BEHAVIOR: u8 = 0x16;
    /// Sanitize Config.
    pub const SANITIZE_CONFIG: u8 = 0x17;
    /// Software Progress Marker.
    pub const SW_PROGRESS: u8 = 0x80;
    /// Host Identifier.
    pub const HOST_ID: u8 = 0x81;
    /// Reservation Notification Mask.
    pub const RESV_MASK: u8 = 0x82;
    /// Reservation Persistence.
    pub const RESV_PERSIST: u8 = 0x83;
    /// Namespace Write Protection Config.
    pub const WRITE_PROTECT: u8 = 0x84;
}

/// Get Features Select (SEL) values, CDW10 bits 10:08 (NVMe Base 2.0, Get
/// Features command).
pub mod sel {
    /// Current value.
    pub const CURRENT: u8 = 0;
    /// Default value.
    pub const DEFAULT: u8 = 1;
    /// Saved value.
    pub const SAVED: u8 = 2;
    /// Supported capabilities.
    pub const SUPPORTED_CAPS: u8 = 3;
}

/// Asynchronous Event Configuration bits, Set Features FID 0Bh CDW11
/// (NVMe Base 2.0, §5.27, Asynchronous Event Configuration).
pub mod aec {
    /// Bits 07:00: SMART / Health Critical Warnings that raise an event.
    pub const SMART_MASK: u32 = 0xFF;
    /// Bit 08: Namespace Attribute Notices (NAN).
    pub const NAN: u32 = 1 << 8;
    /// Bit 09: Firmware Activation Notices (FAN).
    pub const FAN: u32 = 1 << 9;
    /// Bit 11: Asymmetric Namespace Access Change Notices (ANACN).
    pub const ANACN: u32 = 1 << 11;
    /// Bit 31: Discovery Log Page Change Notification (DLPCN).
    pub const DLPCN: u32 = 1 << 31;
}

/// Asynchronous Event Type (AET) values (NVMe Base 2.0, §5.2, Asynchronous
/// Event Request command).
pub mod aet {
    /// Error status.
    pub const ERROR: u8 = 0;
    /// SMART / Health status.
    pub const SMART: u8 = 1;
    /// Notice.
    pub const NOTICE: u8 = 2;
    /// I/O Command specific status.
    pub const IO_CMD_SPECIFIC: u8 = 6;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Asynchronous Event Information (AEI) values for AET Notice
/// (NVMe Base 2.0, §5.2, Asynchronous Event Request command).
pub mod aei_notice {
    /// Namespace Attribute Changed (log page 04h).
    pub const NS_ATTR_CHANGED: u8 = 0x00;
    /// Firmware Activation Starting.
    pub const FW_ACTIVATION_STARTING: u8 = 0x01;
    /// Asymmetric Namespace Access Change.
    pub const ANA_CHANGE: u8 = 0x03;
    /// Discovery Log Page Change (log page 70h).
    pub const DISCOVERY_LOG_CHANGED: u8 = 0xF0;
}

/// Namespace Identifier Type (NIDT) values (NVMe Base 2.0, §5.17,
/// Namespace Identification Descriptor).
pub mod nidt {
    /// IEEE Extended Unique Identifier, 8 bytes.
    pub const EUI64: u8 = 0x01;
    /// Namespace Globally Unique Identifier, 16 bytes.
    pub const NGUID: u8 = 0x02;
    /// Namespace UUID, 16 bytes.
    pub const UUID: u8 = 0x03;
    /// Command Set Identifier, 1 byte.
    pub const CSI: u8 = 0x04;
}

/// Controller Type (CNTRLTYPE) values, Identify Controller byte 111
/// (NVMe Base 2.0, §5.17, Identify Controller data structure).
pub mod cntrltype {
    /// Not reported (controllers older than NVMe 1.4).
    pub const NOT_REPORTED: u8 = 0;
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMIN: u8 = 3;
}

/// Optional NVM Command Support (ONCS) bits, Identify Controller bytes
/// 521:520 (NVMe Base 2.0, §5.17, Identify Controller data structure).
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set/Get Features.
    pub const SAVE_FEATURES: u16 = 1 << 4;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
    /// Verify.
    pub const VERIFY: u16 = 1 << 7;
    /// Copy.
    pub const COPY: u16 = 1 << 8;
}

/// Size of every Identify data structure and of the Changed Namespace List.
pub const IDENTIFY_DATA_SIZE: usize = 4096;
/// Most NSIDs a namespace list (Identify CNS 02h, log page 04h) holds.
pub const NS_LIST_MAX: usize = 1024;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Returns the first `n` bytes of an encode buffer, zeroed.
///
/// Encoders are given a buffer by local code, not by a peer; a short one is
/// a programming error.
fn out<'a>(what: &'static str, buf: &'a mut [u8], n: usize) -> &'a mut [u8] {
    assert!(
        buf.len() >= n,
        "{what}: encode buffer is {} bytes, need {n}",
        buf.len()
    );
    let b = &mut buf[..n];
    b.fill(0);
    b
}

fn u128_at(b: &[u8], o: usize) -> u128 {
    u128::from_le_bytes(arr(b, o))
}

fn put_u128(b: &mut [u8], o: usize, v: u128) {
    b[o..o + 16].copy_from_slice(&v.to_le_bytes());
}

fn arr<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[o..o + N]);
    a
}

/// Reads a NUL-terminated (UTF-8) string field such as an NQN: stops at the
/// first NUL, then trims trailing spaces.
pub(crate) fn nul_str(b: &[u8], o: usize, len: usize) -> String {
    let f = &b[o..o + len];
    let f = f.iter().position(|&c| c == 0).map_or(f, |p| &f[..p]);
    let end = f.iter().rposition(|&c| c != b' ').map_or(0, |p| p + 1);
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// Writes a NUL-terminated string field: at most `len - 1` bytes, so the
/// field always ends in a NUL; the rest is NUL.
pub(crate) fn put_nul_str(b: &mut [u8], o: usize, len: usize, s: &str) {
    b[o..o + len].fill(0);
    le::put_str_pad(b, o, len - 1, s, 0);
}

// ---------------------------------------------------------------------------
// Identify Controller
// ---------------------------------------------------------------------------

/// Power State Descriptor (NVMe Base 2.0, §5.17, Identify Controller data
/// structure, Power State Descriptor): 32 bytes,
/// at byte 2048 + 32 * n of the Identify Controller data structure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerStateDescriptor {
    /// Maximum Power (bytes 1:0), in units given by `mxps`.
    pub mp: u16,
    /// Max Power Scale (byte 3 bit 0): 0 = 0.01 W, 1 = 0.0001 W.
    pub mxps: bool,
    /// Non-Operational State (byte 3 bit 1).
    pub nops: bool,
    /// Entry Latency in microseconds (bytes 7:4).
    pub enlat: u32,
    /// Exit Latency in microseconds (bytes 11:8).
    pub exlat: u32,
    /// Relative Read Throughput (byte 12 bits 4:0).
    pub rrt: u8,
    /// Relative Read Latency (byte 13 bits 4:0).
    pub rrl: u8,
    /// Relative Write Throughput (byte 14 bits 4:0).
    pub rwt: u8,
    /// Relative Write Latency (byte 15 bits 4:0).
    pub rwl: u8,
    /// Idle Power (bytes 17:16).
    pub idlp: u16,
    /// Idle Power Scale (byte 18 bits 7:6).
    pub ips: u8,
    /// Active Power (bytes 21:20).
    pub actp: u16,
    /// Active Power Workload (byte 22 bits 2:0).
    pub apw: u8,
    /// Active Power Scale (byte 22 bits 7:6).
    pub aps: u8,
}

impl PowerStateDescriptor {
    /// Encoded size in bytes.
    pub const SIZE: usize = 32;

    fn put(&self, b: &mut [u8], o: usize) {
        le::put_u16(b, o, self.mp);
        b[o + 3] = u8::from(self.mxps) | (u8::from(self.nops) << 1);
        le::put_u32(b, o + 4, self.enlat);
        le::put_u32(b, o + 8, self.exlat);
        b[o + 12] = self.rrt & 0x1F;
        b[o + 13] = self.rrl & 0x1F;
        b[o + 14] = self.rwt & 0x1F;
        b[o + 15] = self.rwl & 0x1F;
        le::put_u16(b, o + 16, self.idlp);
        b[o + 18] = (self.ips & 0x3) << 6;
        le::put_u16(b, o + 20, self.actp);
        b[o + 22] = (self.apw & 0x7) | ((self.aps & 0x3) << 6);
    }

    fn get(b: &[u8], o: usize) -> Self {
        Self {
            mp: le::u16(b, o),
            mxps: b[o + 3] & 1 != 0,
            nops: b[o + 3] & 2 != 0,
            enlat: le::u32(b, o + 4),
            exlat: le::u32(b, o + 8),
            rrt: b[o + 12] & 0x1F,
            rrl: b[o + 13] & 0x1F,
            rwt: b[o + 14] & 0x1F,
            rwl: b[o + 15] & 0x1F,
            idlp: le::u16(b, o + 16),
            ips: b[o + 18] >> 6,
            actp: le::u16(b, o + 20),
            apw: b[o + 22] & 0x7,
            aps: b[o + 22] >> 6,
        }
    }
}

/// Identify Controller data structure, CNS 01h (NVMe Base 2.0, §5.17;
/// fabrics fields bytes 2047:1792 from NVMe over Fabrics 1.1).
///
/// `sn`, `mn` and `fr` are ASCII, space padded; `subnqn` is NUL terminated
/// (at most 255 bytes are encoded). Longer strings are cut to the field.
/// The vendor specific area (bytes 4095:3072) is encoded as zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI Vendor ID (bytes 1:0).
    pub vid: u16,
    /// PCI Subsystem Vendor ID (bytes 3:2).
    pub ssvid: u16,
    /// Serial Number (bytes 23:4), 20 ASCII characters.
    pub sn: String,
    /// Model Number (bytes 63:24), 40 ASCII characters.
    pub mn: String,
    /// Firmware Revision (bytes 71:64), 8 ASCII characters.
    pub fr: String,
    /// Recommended Arbitration Burst (byte 72).
    pub rab: u8,
    /// IEEE OUI Identifier (bytes 75:73).
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities (byte 76).
    pub cmic: u8,
    /// Maximum Data Transfer Size (byte 77), a power of two in units of
    /// CAP.MPSMIN; 0 means no limit.
    pub mdts: u8,
    /// Controller ID (bytes 79:78).
    pub cntlid: u16,
    /// Version (bytes 83:80), as the VS property.
    pub ver: u32,
    /// RTD3 Resume Latency in microseconds (bytes 87:84).
    pub rtd3r: u32,
    /// RTD3 Entry Latency in microseconds (bytes 91:88).
    pub rtd3e: u32,
    /// Optional Asynchronous Events Supported (bytes 95:92); bits as [`aec`].
    pub oaes: u32,
    /// Controller Attributes (bytes 99:96).
    pub ctratt: u32,
    /// Controller Type (byte 111): 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier (bytes 127:112).
    pub fguid: [u8; 16],
    /// Command Retry Delay Time 1 in 100 ms units (bytes 129:128).
    pub crdt1: u16,
    /// Command Retry Delay Time 2 (bytes 131:130).
    pub crdt2: u16,
    /// Command Retry Delay Time 3 (bytes 133:132).
    pub crdt3: u16,
    /// Optional Admin Command Support (bytes 257:256).
    pub oacs: u16,
    /// Abort Command Limit, 0's based (byte 258).
    pub acl: u8,
    /// Asynchronous Event Request Limit, 0's based (byte 259).
    pub aerl: u8,
    /// Firmware Updates (byte 260).
    pub frmw: u8,
    /// Log Page Attributes (byte 261).
    pub lpa: u8,
    /// Error Log Page Entries, 0's based (byte 262).
    pub elpe: u8,
    /// Number of Power States Support, 0's based (byte 263).
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration (byte 264).
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes (byte 265).
    pub apsta: u8,
    /// Warning Composite Temperature Threshold in Kelvin (bytes 267:266).
    pub wctemp: u16,
    /// Critical Composite Temperature Threshold in Kelvin (bytes 269:268).
    pub cctemp: u16,
    /// Maximum Time for Firmware Activation (bytes 271:270).
    pub mtfa: u16,
    /// Host Memory Buffer Preferred Size (bytes 275:272).
    pub hmpre: u32,
    /// Host Memory Buffer Minimum Size (bytes 279:276).
    pub hmmin: u32,
    /// Total NVM Capacity in bytes (bytes 295:280).
    pub tnvmcap: u128,
    /// Unallocated NVM Capacity in bytes (bytes 311:296).
    pub unvmcap: u128,
    /// Replay Protected Memory Block Support (bytes 315:312).
    pub rpmbs: u32,
    /// Extended Device Self-test Time (bytes 317:316).
    pub edstt: u16,
    /// Device Self-test Options (byte 318).
    pub dsto: u8,
    /// Firmware Update Granularity (byte 319).
    pub fwug: u8,
    /// Keep Alive Support, granularity in 100 ms units (bytes 321:320).
    pub kas: u16,
    /// Host Controlled Thermal Management Attributes (bytes 323:322).
    pub hctma: u16,
    /// Minimum Thermal Management Temperature (bytes 325:324).
    pub mntmt: u16,
    /// Maximum Thermal Management Temperature (bytes 327:326).
    pub mxtmt: u16,
    /// Sanitize Capabilities (bytes 331:328).
    pub sanicap: u32,
    /// Host Memory Buffer Minimum Descriptor Entry Size (bytes 335:332).
    pub hmminds: u32,
    /// Host Memory Maximum Descriptors Entries (bytes 337:336).
    pub hmmaxd: u16,
    /// NVM Set Identifier Maximum (bytes 339:338).
    pub nvmsetidmax: u16,
    /// Endurance Group Identifier Maximum (bytes 341:340).
    pub endgidmax: u16,
    /// ANA Transition Time in seconds (byte 342).
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities (byte 343).
    pub anacap: u8,
    /// ANA Group Identifier Maximum (bytes 347:344).
    pub anagrpmax: u32,
    /// Number of ANA Group Identifiers (bytes 351:348).
    pub nanagrpid: u32,
    /// Submission Queue Entry Size (byte 512): bits 3:0 required, 7:4
    /// maximum, each log2 of bytes (6 = 64 bytes).
    pub sqes: u8,
    /// Completion Queue Entry Size (byte 513), as `sqes` (4 = 16 bytes).
    pub cqes: u8,
    /// Maximum Outstanding Commands (bytes 515:514); fabrics only.
    pub maxcmd: u16,
    /// Number of Namespaces: the largest valid NSID (bytes 519:516).
    pub nn: u32,
    /// Optional NVM Command Support (bytes 521:520).
    pub oncs: u16,
    /// Fused Operation Support (bytes 523:522).
    pub fuses: u16,
    /// Format NVM Attributes (byte 524).
    pub fna: u8,
    /// Volatile Write Cache (byte 525): bit 0 present.
    pub vwc: u8,
    /// Atomic Write Unit Normal, 0's based LBAs (bytes 527:526).
    pub awun: u16,
    /// Atomic Write Unit Power Fail, 0's based LBAs (bytes 529:528).
    pub awupf: u16,
    /// I/O Command Set Vendor Specific Command Configuration (byte 530).
    pub nvscc: u8,
    /// Namespace Write Protection Capabilities (byte 531).
    pub nwpc: u8,
    /// Atomic Compare & Write Unit, 0's based LBAs (bytes 533:532).
    pub acwu: u16,
    /// Optional Copy Formats Supported (bytes 535:534).
    pub ocfs: u16,
    /// SGL Support (bytes 539:536).
    pub sgls: u32,
    /// Maximum Number of Allowed Namespaces (bytes 543:540).
    pub mnan: u32,
    /// Maximum Domain Namespace Attachments (bytes 559:544).
    pub maxdna: u128,
    /// Maximum I/O Controller Namespace Attachments (bytes 563:560).
    pub maxcna: u32,
    /// NVM Subsystem NVMe Qualified Name (bytes 1023:768).
    pub subnqn: String,
    /// I/O Queue Command Capsule Supported Size in 16-byte units
    /// (bytes 1795:1792); fabrics only.
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size in 16-byte units
    /// (bytes 1799:1796); fabrics only.
    pub iorcsz: u32,
    /// In Capsule Data Offset in 16-byte units (bytes 1801:1800).
    pub icdoff: u16,
    /// Fabrics Controller Attributes (byte 1802): bit 0 static model.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors (byte 1803).
    pub msdbd: u8,
    /// Optional Fabric Commands Support (bytes 1805:1804).
    pub ofcs: u16,
    /// Discovery Controller Type (byte 1806, TP 8010): 0 not reported,
    /// 1 direct, 2 central.
    pub dctype: u8,
    /// Power State Descriptors 0..31 (bytes 3071:2048); `npss` says how
    /// many are valid.
    pub psd: [PowerStateDescriptor; 32],
}

impl IdentifyController {
    /// Encoded size in bytes.
    pub const SIZE: usize = IDENTIFY_DATA_SIZE;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("identify controller", buf, Self::SIZE);
        le::put_u16(b, 0, self.vid);
        le::put_u16(b, 2, self.ssvid);
        le::put_str_pad(b, 4, 20, &self.sn, b' ');
        le::put_str_pad(b, 24, 40, &self.mn, b' ');
        le::put_str_pad(b, 64, 8, &self.fr, b' ');
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        le::put_u16(b, 78, self.cntlid);
        le::put_u32(b, 80, self.ver);
        le::put_u32(b, 84, self.rtd3r);
        le::put_u32(b, 88, self.rtd3e);
        le::put_u32(b, 92, self.oaes);
        le::put_u32(b, 96, self.ctratt);
        b[111] = self.cntrltype;
        b[112..128].copy_from_slice(&self.fguid);
        le::put_u16(b, 128, self.crdt1);
        le::put_u16(b, 130, self.crdt2);
        le::put_u16(b, 132, self.crdt3);
        le::put_u16(b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        b[264] = self.avscc;
        b[265] = self.apsta;
        le::put_u16(b, 266, self.wctemp);
        le::put_u16(b, 268, self.cctemp);
        le::put_u16(b, 270, self.mtfa);
        le::put_u32(b, 272, self.hmpre);
        le::put_u32(b, 276, self.hmmin);
        put_u128(b, 280, self.tnvmcap);
        put_u128(b, 296, self.unvmcap);
        le::put_u32(b, 312, self.rpmbs);
        le::put_u16(b, 316, self.edstt);
        b[318] = self.dsto;
        b[319] = self.fwug;
        le::put_u16(b, 320, self.kas);
        le::put_u16(b, 322, self.hctma);
        le::put_u16(b, 324, self.mntmt);
        le::put_u16(b, 326, self.mxtmt);
        le::put_u32(b, 328, self.sanicap);
        le::put_u32(b, 332, self.hmminds);
        le::put_u16(b, 336, self.hmmaxd);
        le::put_u16(b, 338, self.nvmsetidmax);
        le::put_u16(b, 340, self.endgidmax);
        b[342] = self.anatt;
        b[343] = self.anacap;
        le::put_u32(b, 344, self.anagrpmax);
        le::put_u32(b, 348, self.nanagrpid);
        b[512] = self.sqes;
        b[513] = self.cqes;
        le::put_u16(b, 514, self.maxcmd);
        le::put_u32(b, 516, self.nn);
        le::put_u16(b, 520, self.oncs);
        le::put_u16(b, 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        le::put_u16(b, 526, self.awun);
        le::put_u16(b, 528, self.awupf);
        b[530] = self.nvscc;
        b[531] = self.nwpc;
        le::put_u16(b, 532, self.acwu);
        le::put_u16(b, 534, self.ocfs);
        le::put_u32(b, 536, self.sgls);
        le::put_u32(b, 540, self.mnan);
        put_u128(b, 544, self.maxdna);
        le::put_u32(b, 560, self.maxcna);
        put_nul_str(b, 768, 256, &self.subnqn);
        le::put_u32(b, 1792, self.ioccsz);
        le::put_u32(b, 1796, self.iorcsz);
        le::put_u16(b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        le::put_u16(b, 1804, self.ofcs);
        b[1806] = self.dctype;
        for (i, ps) in self.psd.iter().enumerate() {
            ps.put(b, 2048 + i * PowerStateDescriptor::SIZE);
        }
    }

    /// Encodes into a new 4096-byte buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.encode(&mut v);
        v
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("identify controller", buf, Self::SIZE)?;
        let b = buf;
        let mut psd = [PowerStateDescriptor::default(); 32];
        for (i, ps) in psd.iter_mut().enumerate() {
            *ps = PowerStateDescriptor::get(b, 2048 + i * PowerStateDescriptor::SIZE);
        }
        Ok(Self {
            vid: le::u16(b, 0),
            ssvid: le::u16(b, 2),
            sn: le::str_field(b, 4, 20),
            mn: le::str_field(b, 24, 40),
            fr: le::str_field(b, 64, 8),
            rab: b[72],
            ieee: arr(b, 73),
            cmic: b[76],
            mdts: b[77],
            cntlid: le::u16(b, 78),
            ver: le::u32(b, 80),
            rtd3r: le::u32(b, 84),
            rtd3e: le::u32(b, 88),
            oaes: le::u32(b, 92),
            ctratt: le::u32(b, 96),
            cntrltype: b[111],
            fguid: arr(b, 112),
            crdt1: le::u16(b, 128),
            crdt2: le::u16(b, 130),
            crdt3: le::u16(b, 132),
            oacs: le::u16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            avscc: b[264],
            apsta: b[265],
            wctemp: le::u16(b, 266),
            cctemp: le::u16(b, 268),
            mtfa: le::u16(b, 270),
            hmpre: le::u32(b, 272),
            hmmin: le::u32(b, 276),
            tnvmcap: u128_at(b, 280),
            unvmcap: u128_at(b, 296),
            rpmbs: le::u32(b, 312),
            edstt: le::u16(b, 316),
            dsto: b[318],
            fwug: b[319],
            kas: le::u16(b, 320),
            hctma: le::u16(b, 322),
            mntmt: le::u16(b, 324),
            mxtmt: le::u16(b, 326),
            sanicap: le::u32(b, 328),
            hmminds: le::u32(b, 332),
            hmmaxd: le::u16(b, 336),
            nvmsetidmax: le::u16(b, 338),
            endgidmax: le::u16(b, 340),
            anatt: b[342],
            anacap: b[343],
            anagrpmax: le::u32(b, 344),
            nanagrpid: le::u32(b, 348),
            sqes: b[512],
            cqes: b[513],
            maxcmd: le::u16(b, 514),
            nn: le::u32(b, 516),
            oncs: le::u16(b, 520),
            fuses: le::u16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le::u16(b, 526),
            awupf: le::u16(b, 528),
            nvscc: b[530],
            nwpc: b[531],
            acwu: le::u16(b, 532),
            ocfs: le::u16(b, 534),
            sgls: le::u32(b, 536),
            mnan: le::u32(b, 540),
            maxdna: u128_at(b, 544),
            maxcna: le::u32(b, 560),
            subnqn: nul_str(b, 768, 256),
            ioccsz: le::u32(b, 1792),
            iorcsz: le::u32(b, 1796),
            icdoff: le::u16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
            ofcs: le::u16(b, 1804),
            dctype: b[1806],
            psd,
        })
    }

    /// Largest data transfer of one command in bytes: 2^MDTS units of the
    /// minimum memory page size, which is 2^(12 + CAP.MPSMIN) (NVMe Base 2.0,
    /// §5.17 MDTS; CAP.MPSMIN is CAP bits 51:48). 0 when MDTS is 0 (no limit);
    /// capped at 2 GiB so that it fits a `u32` transfer length.
    pub fn max_transfer(&self, cap_mpsmin: u8) -> u32 {
        const CAP: u64 = 1 << 31;
        if self.mdts == 0 {
            return 0;
        }
        let shift = 12 + u32::from(cap_mpsmin & 0xF) + u32::from(self.mdts);
        // At most CAP, so the cast is lossless.
        1u64.checked_shl(shift).map_or(CAP, |b| b.min(CAP)) as u32
    }

    /// Most bytes of in-capsule data an I/O command capsule may carry: the
    /// capsule size IOCCSZ (16-byte units) less the 64-byte SQE (NVMe over
    /// Fabrics 1.1, §4.1 and Identify Controller IOCCSZ); 0 when the
    /// controller accepts none.
    pub fn incapsule_data_size(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }

    /// ONCS bit 2: Dataset Management is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & oncs::DSM != 0
    }

    /// ONCS bit 3: Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & oncs::WRITE_ZEROES != 0
    }

    /// VWC bit 0: a volatile write cache is present.
    pub fn volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }
}

// ---------------------------------------------------------------------------
// Identify Namespace
// ---------------------------------------------------------------------------

/// LBA Format data structure (NVM Command Set Specification 1.0, Identify
/// Namespace data structure):
/// 4 bytes, at byte 128 + 4 * n of Identify Namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata Size in bytes per LBA (bits 15:00).
    pub ms: u16,
    /// LBA Data Size as log2 of bytes (bits 23:16); below 9 means the
    /// format is not supported.
    pub lbads: u8,
    /// Relative Performance (bits 25:24): 0 best .. 3 degraded.
    pub rp: u8,
}

impl LbaFormat {
    /// Encoded size in bytes.
    pub const SIZE: usize = 4;

    /// A format with `lbads` = log2(`size`) and no metadata.
    pub fn with_lbads(lbads: u8) -> Self {
        Self {
            ms: 0,
            lbads,
            rp: 0,
        }
    }

    fn put(&self, b: &mut [u8], o: usize) {
        le::put_u16(b, o, self.ms);
        b[o + 2] = self.lbads;
        b[o + 3] = self.rp & 0x3;
    }

    fn get(b: &[u8], o: usize) -> Self {
        Self {
            ms: le::u16(b, o),
            lbads: b[o + 2],
            rp: b[o + 3] & 0x3,
        }
    }
}

/// Identify Namespace data structure for the NVM Command Set, CNS 00h
/// (NVMe Base 2.0, §5.17; NVM Command Set Specification 1.0).
///
/// `nlbaf` is kept as on the wire, a 0's based count: formats
/// `lbaf[0..=nlbaf]` are valid. Encode writes `nlbaf` and all 64 `lbaf`
/// entries as they are; decode reads them back the same way, so a round
/// trip is exact. Use [`Self::set_lba_formats`] and [`Self::lba_formats`]
/// to work with 1's based lists. The vendor specific area (bytes
/// 4095:384) is encoded as zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks (bytes 7:0).
    pub nsze: u64,
    /// Namespace Capacity in logical blocks (bytes 15:8).
    pub ncap: u64,
    /// Namespace Utilization in logical blocks (bytes 23:16).
    pub nuse: u64,
    /// Namespace Features (byte 24).
    pub nsfeat: u8,
    /// Number of LBA Formats, 0's based (byte 25).
    pub nlbaf: u8,
    /// Formatted LBA Size (byte 26): bits 3:0 low bits of the format index,
    /// bit 4 metadata at the end of the LBA, bits 6:5 high bits of the index.
    pub flbas: u8,
    /// Metadata Capabilities (byte 27).
    pub mc: u8,
    /// End-to-end Data Protection Capabilities (byte 28).
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings (byte 29).
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (byte 30).
    pub nmic: u8,
    /// Reservation Capabilities (byte 31).
    pub rescap: u8,
    /// Format Progress Indicator (byte 32).
    pub fpi: u8,
    /// Deallocate Logical Block Features (byte 33).
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal, 0's based (bytes 35:34).
    pub nawun: u16,
    /// Namespace Atomic Write Unit Power Fail, 0's based (bytes 37:36).
    pub nawupf: u16,
    /// Namespace Atomic Compare & Write Unit, 0's based (bytes 39:38).
    pub nacwu: u16,
    /// Namespace Atomic Boundary Size Normal (bytes 41:40).
    pub nabsn: u16,
    /// Namespace Atomic Boundary Offset (bytes 43:42).
    pub nabo: u16,
    /// Namespace Atomic Boundary Size Power Fail (bytes 45:44).
    pub nabspf: u16,
    /// Namespace Optimal I/O Boundary in logical blocks (bytes 47:46).
    pub noiob: u16,
    /// NVM Capacity in bytes (bytes 63:48).
    pub nvmcap: u128,
    /// Namespace Preferred Write Granularity, 0's based (bytes 65:64).
    pub npwg: u16,
    /// Namespace Preferred Write Alignment, 0's based (bytes 67:66).
    pub npwa: u16,
    /// Namespace Preferred Deallocate Granularity, 0's based (bytes 69:68).
    pub npdg: u16,
    /// Namespace Preferred Deallocate Alignment, 0's based (bytes 71:70).
    pub npda: u16,
    /// Namespace Optimal Write Size, 0's based (bytes 73:72).
    pub nows: u16,
    /// ANA Group Identifier (bytes 95:92).
    pub anagrpid: u32,
    /// Namespace Attributes (byte 99): bit 0 write protected.
    pub nsattr: u8,
    /// NVM Set Identifier (bytes 101:100).
    pub nvmsetid: u16,
    /// Endurance Group Identifier (bytes 103:102).
    pub endgid: u16,
    /// Namespace Globally Unique Identifier (bytes 119:104).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (bytes 127:120).
    pub eui64: [u8; 8],
    /// LBA Format 0..63 Support (bytes 383:128).
    pub lbaf: [LbaFormat; 64],
}

impl Default for IdentifyNamespace {
    fn default() -> Self {
        Self {
            nsze: 0,
            ncap: 0,
            nuse: 0,
            nsfeat: 0,
            nlbaf: 0,
            flbas: 0,
            mc: 0,
            dpc: 0,
            dps: 0,
            nmic: 0,
            rescap: 0,
            fpi: 0,
            dlfeat: 0,
            nawun: 0,
            nawupf: 0,
            nacwu: 0,
            nabsn: 0,
            nabo: 0,
            nabspf: 0,
            noiob: 0,
            nvmcap: 0,
            npwg: 0,
            npwa: 0,
            npdg: 0,
            npda: 0,
            nows: 0,
            anagrpid: 0,
            nsattr: 0,
            nvmsetid: 0,
            endgid: 0,
            nguid: [0; 16],
            eui64: [0; 8],
            lbaf: [LbaFormat::default(); 64],
        }
    }
}

impl IdentifyNamespace {
    /// Encoded size in bytes.
    pub const SIZE: usize = IDENTIFY_DATA_SIZE;
    /// Most LBA formats a namespace reports.
    pub const MAX_LBAF: usize = 64;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("identify namespace", buf, Self::SIZE);
        le::put_u64(b, 0, self.nsze);
        le::put_u64(b, 8, self.ncap);
        le::put_u64(b, 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[32] = self.fpi;
        b[33] = self.dlfeat;
        le::put_u16(b, 34, self.nawun);
        le::put_u16(b, 36, self.nawupf);
        le::put_u16(b, 38, self.nacwu);
        le::put_u16(b, 40, self.nabsn);
        le::put_u16(b, 42, self.nabo);
        le::put_u16(b, 44, self.nabspf);
        le::put_u16(b, 46, self.noiob);
        put_u128(b, 48, self.nvmcap);
        le::put_u16(b, 64, self.npwg);
        le::put_u16(b, 66, self.npwa);
        le::put_u16(b, 68, self.npdg);
        le::put_u16(b, 70, self.npda);
        le::put_u16(b, 72, self.nows);
        le::put_u32(b, 92, self.anagrpid);
        b[99] = self.nsattr;
        le::put_u16(b, 100, self.nvmsetid);
        le::put_u16(b, 102, self.endgid);
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, f) in self.lbaf.iter().enumerate() {
            f.put(b, 128 + i * LbaFormat::SIZE);
        }
    }

    /// Encodes into a new 4096-byte buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.encode(&mut v);
        v
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("identify namespace", buf, Self::SIZE)?;
        let b = buf;
        let mut lbaf = [LbaFormat::default(); 64];
        for (i, f) in lbaf.iter_mut().enumerate() {
            *f = LbaFormat::get(b, 128 + i * LbaFormat::SIZE);
        }
        Ok(Self {
            nsze: le::u64(b, 0),
            ncap: le::u64(b, 8),
            nuse: le::u64(b, 16),
            nsfeat: b[24],
            nlbaf: b[25],
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            rescap: b[31],
            fpi: b[32],
            dlfeat: b[33],
            nawun: le::u16(b, 34),
            nawupf: le::u16(b, 36),
            nacwu: le::u16(b, 38),
            nabsn: le::u16(b, 40),
            nabo: le::u16(b, 42),
            nabspf: le::u16(b, 44),
            noiob: le::u16(b, 46),
            nvmcap: u128_at(b, 48),
            npwg: le::u16(b, 64),
            npwa: le::u16(b, 66),
            npdg: le::u16(b, 68),
            npda: le::u16(b, 70),
            nows: le::u16(b, 72),
            anagrpid: le::u32(b, 92),
            nsattr: b[99],
            nvmsetid: le::u16(b, 100),
            endgid: le::u16(b, 102),
            nguid: arr(b, 104),
            eui64: arr(b, 120),
            lbaf,
        })
    }

    /// The valid LBA formats, `lbaf[0..=nlbaf]` (at most 64).
    pub fn lba_formats(&self) -> &[LbaFormat] {
        let n = (usize::from(self.nlbaf) + 1).min(Self::MAX_LBAF);
        &self.lbaf[..n]
    }

    /// Sets `lbaf` from a 1's based list and `nlbaf` to its 0's based
    /// length; entries past 64 are ignored and an empty list leaves one
    /// zeroed format (`nlbaf` 0). Unused entries are zeroed.
    pub fn set_lba_formats(&mut self, formats: &[LbaFormat]) {
        let n = formats.len().min(Self::MAX_LBAF);
        self.lbaf = [LbaFormat::default(); 64];
        self.lbaf[..n].copy_from_slice(&formats[..n]);
        // n <= 64, so n - 1 fits in u8.
        self.nlbaf = n.saturating_sub(1) as u8;
    }

    /// Index of the formatted LBA format from `flbas`: bits 3:0 are the low
    /// four bits, bits 6:5 the high two.
    pub fn flbas_index(&self) -> usize {
        usize::from((self.flbas & 0x0F) | ((self.flbas & 0x60) >> 1))
    }

    /// The LBA format in use, if `flbas` selects one of the valid formats.
    pub fn current_lba_format(&self) -> Option<LbaFormat> {
        self.lba_formats().get(self.flbas_index()).copied()
    }

    /// LBA data size in bytes of the format in use, or `None` if `flbas`
    /// selects no valid format or its `lbads` is unsupported (below 9) or
    /// too large for a `u32`.
    pub fn lba_size(&self) -> Option<u32> {
        let f = self.current_lba_format()?;
        if (9..32).contains(&f.lbads) {
            Some(1u32 << f.lbads)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Namespace lists
// ---------------------------------------------------------------------------

/// Encodes a namespace list (Identify CNS 02h, NVMe Base 2.0, §5.17,
/// Namespace List): NSIDs as little-endian dwords, the rest zero.
///
/// Writes at most 1024 NSIDs and at most `buf.len() / 4`; returns how many
/// were written. An NSID of 0 ends the list for a reader, so callers pass
/// only non-zero NSIDs.
pub fn encode_ns_list(nsids: &[u32], buf: &mut [u8]) -> usize {
    buf.fill(0);
    let n = nsids.len().min(NS_LIST_MAX).min(buf.len() / 4);
    for (i, &id) in nsids[..n].iter().enumerate() {
        le::put_u32(buf, i * 4, id);
    }
    n
}

/// Encodes the Active Namespace ID list for Identify CNS 02h: the active
/// NSIDs greater than `nsid` (the command's NSID), in increasing order.
/// `active` may be in any order; returns how many were written.
pub fn encode_active_ns_list(active: &[u32], nsid: u32, buf: &mut [u8]) -> usize {
    let mut ids: Vec<u32> = active.iter().copied().filter(|&id| id > nsid).collect();
    ids.sort_unstable();
    ids.dedup();
    encode_ns_list(&ids, buf)
}

/// Decodes a namespace list: dwords up to the first zero, at most 1024 or
/// as many whole dwords as `buf` holds.
pub fn decode_ns_list(buf: &[u8]) -> Vec<u32> {
    buf.chunks_exact(4)
        .take(NS_LIST_MAX)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
        .collect()
}

// ---------------------------------------------------------------------------
// Namespace Identification Descriptors
// ---------------------------------------------------------------------------

/// Namespace Identification Descriptor (Identify CNS 03h, NVMe Base 2.0,
/// §5.17): a 4-byte header (NIDT, NIDL, 2 reserved) and
/// NIDL bytes of identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsIdDescriptor {
    /// NIDT 1h: IEEE Extended Unique Identifier.
    Eui64([u8; 8]),
    /// NIDT 2h: Namespace Globally Unique Identifier.
    Nguid([u8; 16]),
    /// NIDT 3h: Namespace UUID.
    Uuid([u8; 16]),
    /// NIDT 4h: Command Set Identifier.
    Csi(u8),
}

impl NsIdDescriptor {
    /// Header size in bytes.
    pub const HEADER_SIZE: usize = 4;

    /// Namespace Identifier Type.
    pub fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => nidt::EUI64,
            Self::Nguid(_) => nidt::NGUID,
            Self::Uuid(_) => nidt::UUID,
            Self::Csi(_) => nidt::CSI,
        }
    }

    /// Namespace Identifier Length in bytes.
    pub fn nidl(&self) -> u8 {
        match self {
            Self::Eui64(_) => 8,
            Self::Nguid(_) | Self::Uuid(_) => 16,
            Self::Csi(_) => 1,
        }
    }

    fn expected_nidl(nidt: u8) -> Option<u8> {
        match nidt {
            nidt::EUI64 => Some(8),
            nidt::NGUID | nidt::UUID => Some(16),
            nidt::CSI => Some(1),
            _ => None,
        }
    }
}

/// Encodes a Namespace Identification Descriptor list into `buf` (normally
/// 4096 bytes), zero filling the rest; the zero NIDT after the last
/// descriptor ends the list. Returns the bytes used, or
/// [`Error::Truncated`] if the list does not fit.
pub fn encode_ns_id_descs(descs: &[NsIdDescriptor], buf: &mut [u8]) -> Result<usize> {
    let total: usize = descs
        .iter()
        .map(|d| NsIdDescriptor::HEADER_SIZE + usize::from(d.nidl()))
        .sum();
    need("namespace identification descriptor list", buf, total)?;
    buf.fill(0);
    let mut o = 0;
    for d in descs {
        buf[o] = d.nidt();
        buf[o + 1] = d.nidl();
        let id = o + NsIdDescriptor::HEADER_SIZE;
        match d {
            NsIdDescriptor::Eui64(v) => buf[id..id + 8].copy_from_slice(v),
            NsIdDescriptor::Nguid(v) | NsIdDescriptor::Uuid(v) => {
                buf[id..id + 16].copy_from_slice(v)
            }
            NsIdDescriptor::Csi(v) => buf[id] = *v,
        }
        o = id + usize::from(d.nidl());
    }
    Ok(o)
}

/// Decodes a Namespace Identification Descriptor list, stopping at a NIDT
/// of 0 or the end of `buf`.
///
/// An unknown NIDT, or a NIDL that does not match its NIDT, is
/// [`Error::Invalid`]; a descriptor running past `buf` is
/// [`Error::Truncated`].
pub fn decode_ns_id_descs(buf: &[u8]) -> Result<Vec<NsIdDescriptor>> {
    let mut v = Vec::new();
    let mut o = 0;
    while o < buf.len() && buf[o] != 0 {
        let rest = &buf[o..];
        need(
            "namespace identification descriptor",
            rest,
            NsIdDescriptor::HEADER_SIZE,
        )?;
        let (t, l) = (rest[0], rest[1]);
        let want = NsIdDescriptor::expected_nidl(t).ok_or(Error::Invalid {
            field: "nidt",
            value: u64::from(t),
        })?;
        if l != want {
            return Err(Error::Invalid {
                field: "nidl",
                value: u64::from(l),
            });
        }
        let len = NsIdDescriptor::HEADER_SIZE + usize::from(l);
        need("namespace identification descriptor", rest, len)?;
        let id = NsIdDescriptor::HEADER_SIZE;
        v.push(match t {
            nidt::EUI64 => NsIdDescriptor::Eui64(arr(rest, id)),
            nidt::NGUID => NsIdDescriptor::Nguid(arr(rest, id)),
            nidt::UUID => NsIdDescriptor::Uuid(arr(rest, id)),
            _ => NsIdDescriptor::Csi(rest[id]),
        });
        o += len;
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// Log pages
// ---------------------------------------------------------------------------

/// Error Information Log Entry, log page 01h (NVMe Base 2.0, §5.16):
/// 64 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Error Count, unique and increasing; 0 means the entry is invalid
    /// (bytes 7:0).
    pub error_count: u64,
    /// Submission Queue ID (bytes 9:8).
    pub sqid: u16,
    /// Command ID (bytes 11:10).
    pub cid: u16,
    /// Status Field (bytes 13:12): bits 15:1 the status, bit 0 the Phase Tag.
    pub status: u16,
    /// Parameter Error Location (bytes 15:14): bits 7:0 byte, 10:8 bit.
    pub parm_err_loc: u16,
    /// LBA of the first failing block (bytes 23:16).
    pub lba: u64,
    /// Namespace (bytes 27:24).
    pub nsid: u32,
    /// Vendor Specific Information Available (byte 28).
    pub vs: u8,
    /// Transport Type, if the error is transport related (byte 29).
    pub trtype: u8,
    /// Command Specific Information (bytes 39:32).
    pub cs: u64,
    /// Transport Type Specific Information (bytes 41:40).
    pub trtype_spec_info: u16,
}

impl ErrorLogEntry {
    /// Encoded size in bytes.
    pub const SIZE: usize = 64;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("error log entry", buf, Self::SIZE);
        le::put_u64(b, 0, self.error_count);
        le::put_u16(b, 8, self.sqid);
        le::put_u16(b, 10, self.cid);
        le::put_u16(b, 12, self.status);
        le::put_u16(b, 14, self.parm_err_loc);
        le::put_u64(b, 16, self.lba);
        le::put_u32(b, 24, self.nsid);
        b[28] = self.vs;
        b[29] = self.trtype;
        le::put_u64(b, 32, self.cs);
        le::put_u16(b, 40, self.trtype_spec_info);
    }

    /// Encodes into a new array.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut a = [0u8; Self::SIZE];
        self.encode(&mut a);
        a
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("error log entry", buf, Self::SIZE)?;
        let b = buf;
        Ok(Self {
            error_count: le::u64(b, 0),
            sqid: le::u16(b, 8),
            cid: le::u16(b, 10),
            status: le::u16(b, 12),
            parm_err_loc: le::u16(b, 14),
            lba: le::u64(b, 16),
            nsid: le::u32(b, 24),
            vs: b[28],
            trtype: b[29],
            cs: le::u64(b, 32),
            trtype_spec_info: le::u16(b, 40),
        })
    }
}

/// SMART / Health Information log page 02h (NVMe Base 2.0, §5.16):
/// 512 bytes. The 16-byte counters are 128-bit integers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical Warning bits (byte 0).
    pub critical_warning: u8,
    /// Composite Temperature in Kelvin (bytes 2:1).
    pub temperature: u16,
    /// Available Spare, percent (byte 3).
    pub avail_spare: u8,
    /// Available Spare Threshold, percent (byte 4).
    pub spare_thresh: u8,
    /// Percentage Used (byte 5).
    pub percent_used: u8,
    /// Endurance Group Critical Warning Summary (byte 6).
    pub endu_grp_crit_warn: u8,
    /// Data Units Read, in thousands of 512-byte units (bytes 47:32).
    pub data_units_read: u128,
    /// Data Units Written, in thousands of 512-byte units (bytes 63:48).
    pub data_units_written: u128,
    /// Host Read Commands (bytes 79:64).
    pub host_reads: u128,
    /// Host Write Commands (bytes 95:80).
    pub host_writes: u128,
    /// Controller Busy Time in minutes (bytes 111:96).
    pub ctrl_busy_time: u128,
    /// Power Cycles (bytes 127:112).
    pub power_cycles: u128,
    /// Power On Hours (bytes 143:128).
    pub power_on_hours: u128,
    /// Unsafe Shutdowns (bytes 159:144).
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors (bytes 175:160).
    pub media_errors: u128,
    /// Number of Error Information Log Entries (bytes 191:176).
    pub num_err_log_entries: u128,
    /// Warning Composite Temperature Time in minutes (bytes 195:192).
    pub warning_temp_time: u32,
    /// Critical Composite Temperature Time in minutes (bytes 199:196).
    pub critical_comp_time: u32,
    /// Temperature Sensors 1..8 in Kelvin, 0 if absent (bytes 215:200).
    pub temp_sensor: [u16; 8],
    /// Thermal Management Temperature 1 Transition Count (bytes 219:216).
    pub thm_temp1_trans_count: u32,
    /// Thermal Management Temperature 2 Transition Count (bytes 223:220).
    pub thm_temp2_trans_count: u32,
    /// Total Time For Thermal Management Temperature 1 (bytes 227:224).
    pub thm_temp1_total_time: u32,
    /// Total Time For Thermal Management Temperature 2 (bytes 231:228).
    pub thm_temp2_total_time: u32,
}

impl SmartLog {
    /// Encoded size in bytes.
    pub const SIZE: usize = 512;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("smart log", buf, Self::SIZE);
        b[0] = self.critical_warning;
        le::put_u16(b, 1, self.temperature);
        b[3] = self.avail_spare;
        b[4] = self.spare_thresh;
        b[5] = self.percent_used;
        b[6] = self.endu_grp_crit_warn;
        put_u128(b, 32, self.data_units_read);
        put_u128(b, 48, self.data_units_written);
        put_u128(b, 64, self.host_reads);
        put_u128(b, 80, self.host_writes);
        put_u128(b, 96, self.ctrl_busy_time);
        put_u128(b, 112, self.power_cycles);
        put_u128(b, 128, self.power_on_hours);
        put_u128(b, 144, self.unsafe_shutdowns);
        put_u128(b, 160, self.media_errors);
        put_u128(b, 176, self.num_err_log_entries);
        le::put_u32(b, 192, self.warning_temp_time);
        le::put_u32(b, 196, self.critical_comp_time);
        for (i, &t) in self.temp_sensor.iter().enumerate() {
            le::put_u16(b, 200 + 2 * i, t);
        }
        le::put_u32(b, 216, self.thm_temp1_trans_count);
        le::put_u32(b, 220, self.thm_temp2_trans_count);
        le::put_u32(b, 224, self.thm_temp1_total_time);
        le::put_u32(b, 228, self.thm_temp2_total_time);
    }

    /// Encodes into a new array.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut a = [0u8; Self::SIZE];
        self.encode(&mut a);
        a
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("smart log", buf, Self::SIZE)?;
        let b = buf;
        let mut temp_sensor = [0u16; 8];
        for (i, t) in temp_sensor.iter_mut().enumerate() {
            *t = le::u16(b, 200 + 2 * i);
        }
        Ok(Self {
            critical_warning: b[0],
            temperature: le::u16(b, 1),
            avail_spare: b[3],
            spare_thresh: b[4],
            percent_used: b[5],
            endu_grp_crit_warn: b[6],
            data_units_read: u128_at(b, 32),
            data_units_written: u128_at(b, 48),
            host_reads: u128_at(b, 64),
            host_writes: u128_at(b, 80),
            ctrl_busy_time: u128_at(b, 96),
            power_cycles: u128_at(b, 112),
            power_on_hours: u128_at(b, 128),
            unsafe_shutdowns: u128_at(b, 144),
            media_errors: u128_at(b, 160),
            num_err_log_entries: u128_at(b, 176),
            warning_temp_time: le::u32(b, 192),
            critical_comp_time: le::u32(b, 196),
            temp_sensor,
            thm_temp1_trans_count: le::u32(b, 216),
            thm_temp2_trans_count: le::u32(b, 220),
            thm_temp1_total_time: le::u32(b, 224),
            thm_temp2_total_time: le::u32(b, 228),
        })
    }
}

/// Firmware Slot Information log page 03h (NVMe Base 2.0, §5.16): 512 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirmwareSlotLog {
    /// Active Firmware Info (byte 0): bits 2:0 the slot of the running
    /// firmware, bits 6:4 the slot activated at the next reset (0: none).
    pub afi: u8,
    /// Firmware Revision of slots 1 to 7 (bytes 8*n..8*n+7, ASCII, space
    /// padded; empty: no firmware in the slot).
    pub frs: [String; 7],
}

impl FirmwareSlotLog {
    /// Encoded size in bytes.
    pub const SIZE: usize = 512;

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("firmware slot log", buf, Self::SIZE);
        b[0] = self.afi;
        for (i, r) in self.frs.iter().enumerate() {
            if !r.is_empty() {
                le::put_str_pad(b, 8 + 8 * i, 8, r, b' ');
            }
        }
    }

    /// Encodes into a new 512-byte buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.encode(&mut v);
        v
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("firmware slot log", buf, Self::SIZE)?;
        Ok(Self {
            afi: buf[0],
            frs: std::array::from_fn(|i| le::str_field(buf, 8 + 8 * i, 8)),
        })
    }
}

/// Changed Namespace List log page 04h (NVMe Base 2.0, §5.16): 4096 bytes, up to 1024 NSIDs whose attributes changed.
/// When more than 1024 changed, the page holds FFFFFFFFh followed by zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedNsList {
    /// The changed NSIDs, at most 1024 (more encode as [`Self::Overflow`]).
    Nsids(Vec<u32>),
    /// More than 1024 namespaces changed.
    Overflow,
}

impl Default for ChangedNsList {
    fn default() -> Self {
        Self::Nsids(Vec::new())
    }
}

impl ChangedNsList {
    /// Encoded size in bytes.
    pub const SIZE: usize = IDENTIFY_DATA_SIZE;
    /// First entry marking more than 1024 changed namespaces.
    pub const OVERFLOW_MARKER: u32 = 0xFFFF_FFFF;

    /// Builds the list, choosing [`Self::Overflow`] above 1024 NSIDs.
    pub fn from_nsids(nsids: Vec<u32>) -> Self {
        if nsids.len() > NS_LIST_MAX {
            Self::Overflow
        } else {
            Self::Nsids(nsids)
        }
    }

    /// Encodes into the first [`Self::SIZE`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::SIZE`].
    pub fn encode(&self, buf: &mut [u8]) {
        let b = out("changed namespace list", buf, Self::SIZE);
        match self {
            Self::Nsids(v) if v.len() <= NS_LIST_MAX => {
                encode_ns_list(v, b);
            }
            _ => le::put_u32(b, 0, Self::OVERFLOW_MARKER),
        }
    }

    /// Encodes into a new 4096-byte buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.encode(&mut v);
        v
    }

    /// Decodes the first [`Self::SIZE`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        need("changed namespace list", buf, Self::SIZE)?;
        if le::u32(buf, 0) == Self::OVERFLOW_MARKER {
            return Ok(Self::Overflow);
        }
        Ok(Self::Nsids(decode_ns_list(&buf[..Self::SIZE])))
    }
}

/// Log Specific Parameter bits of the ANA log page (NVMe Base 2.0,
/// §5.16.1.13; the page itself is [`crate::ana::AnaLog`]).
pub mod ana_lsp {
    /// Bit 0: Return Groups Only (RGO): the descriptors carry no NSID list.
    pub const RGO: u8 = 1 << 0;
}

// ---------------------------------------------------------------------------
// Command dwords
// ---------------------------------------------------------------------------

/// Number of dwords a Get Log Page command asks for: NUMDU (CDW11 bits
/// 15:00) and NUMDL (CDW10 bits 31:16) form a 0's based 32-bit count; this
/// returns the 1's based count (up to 2^32, hence `u64`).
pub fn get_log_page_numd(cdw10: u32, cdw11: u32) -> u64 {
    let numd = ((cdw11 & 0xFFFF) << 16) | (cdw10 >> 16);
    u64::from(numd) + 1
}

/// Get Log Page command fields, CDW10..CDW13 (NVMe Base 2.0, §5.16). CDW14 (UUID index, OT, CSI) is not modeled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetLogPage {
    /// Log Page Identifier (CDW10 bits 07:00); see [`lid`].
    pub lid: u8,
    /// Log Specific Parameter (CDW10 bits 14:08).
    pub lsp: u8,
    /// Retain Asynchronous Event (CDW10 bit 15).
    pub rae: bool,
    /// Number of Dwords, 0's based: NUMDU (CDW11 bits 15:00) and NUMDL
    /// (CDW10 bits 31:16).
    pub numd: u32,
    /// Log Specific Identifier (CDW11 bits 31:16).
    pub lsi: u16,
    /// Log Page Offset in bytes: LPOU (CDW13) and LPOL (CDW12).
    pub lpo: u64,
}

impl GetLogPage {
    /// Decodes the command dwords.
    pub fn from_cdws(cdw10: u32, cdw11: u32, cdw12: u32, cdw13: u32) -> Self {
        Self {
            lid: cdw10 as u8,
            lsp: ((cdw10 >> 8) & 0x7F) as u8,
            rae: cdw10 & (1 << 15) != 0,
            numd: ((cdw11 & 0xFFFF) << 16) | (cdw10 >> 16),
            lsi: (cdw11 >> 16) as u16,
            lpo: (u64::from(cdw13) << 32) | u64::from(cdw12),
        }
    }

    /// Encodes the command dwords as `[cdw10, cdw11, cdw12, cdw13]`.
    pub fn to_cdws(&self) -> [u32; 4] {
        [
            u32::from(self.lid)
                | (u32::from(self.lsp & 0x7F) << 8)
                | (u32::from(self.rae) << 15)
                | (self.numd << 16),
            (self.numd >> 16) | (u32::from(self.lsi) << 16),
            self.lpo as u32,
            (self.lpo >> 32) as u32,
        ]
    }

    /// Number of dwords requested, 1's based.
    pub fn dword_count(&self) -> u64 {
        u64::from(self.numd) + 1
    }

    /// Number of bytes requested.
    pub fn len_bytes(&self) -> u64 {
        self.dword_count() * 4
    }
}

/// Identify command fields, CDW10..CDW11 (NVMe Base 2.0, §5.17).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identify {
    /// Controller or Namespace Structure (CDW10 bits 07:00); see [`cns`].
    pub cns: u8,
    /// Controller Identifier (CDW10 bits 31:16).
    pub cntid: u16,
    /// CNS Specific Identifier (CDW11 bits 15:00).
    pub cnssid: u16,
    /// Command Set Identifier (CDW11 bits 31:24).
    pub csi: u8,
}

impl Identify {
    /// Decodes the command dwords.
    pub fn from_cdws(cdw10: u32, cdw11: u32) -> Self {
        Self {
            cns: cdw10 as u8,
            cntid: (cdw10 >> 16) as u16,
            cnssid: cdw11 as u16,
            csi: (cdw11 >> 24) as u8,
        }
    }

    /// Encodes the command dwords as `[cdw10, cdw11]`.
    pub fn to_cdws(&self) -> [u32; 2] {
        [
            u32::from(self.cns) | (u32::from(self.cntid) << 16),
            u32::from(self.cnssid) | (u32::from(self.csi) << 24),
        ]
    }
}

/// Set Features CDW10 (NVMe Base 2.0, §5.27).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetFeatures {
    /// Feature Identifier (bits 07:00); see [`fid`].
    pub fid: u8,
    /// Save (bit 31).
    pub sv: bool,
}

impl SetFeatures {
    /// Decodes CDW10.
    pub fn from_cdw10(cdw10: u32) -> Self {
        Self {
            fid: cdw10 as u8,
            sv: cdw10 & (1 << 31) != 0,
        }
    }

    /// Encodes CDW10.
    pub fn to_cdw10(&self) -> u32 {
        u32::from(self.fid) | (u32::from(self.sv) << 31)
    }
}

/// Get Features CDW10 (NVMe Base 2.0, Get Features command).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetFeatures {
    /// Feature Identifier (bits 07:00); see [`fid`].
    pub fid: u8,
    /// Select (bits 10:08); see [`sel`].
    pub sel: u8,
}

impl GetFeatures {
    /// Decodes CDW10.
    pub fn from_cdw10(cdw10: u32) -> Self {
        Self {
            fid: cdw10 as u8,
            sel: ((cdw10 >> 8) & 0x7) as u8,
        }
    }

    /// Encodes CDW10.
    pub fn to_cdw10(&self) -> u32 {
        u32::from(self.fid) | (u32::from(self.sel & 0x7) << 8)
    }
}

/// Number of Queues feature, FID 07h (NVMe Base 2.0, §5.27): Set
/// Features CDW11 carries the requested counts, completion dword 0 the
/// allocated ones, in the same layout. Both counts are 0's based; 65535
/// is not a valid request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NumberOfQueues {
    /// Number of I/O Submission Queues Requested/Allocated, 0's based
    /// (bits 15:00).
    pub nsqr: u16,
    /// Number of I/O Completion Queues Requested/Allocated, 0's based
    /// (bits 31:16).
    pub ncqr: u16,
}

impl NumberOfQueues {
    /// Decodes CDW11 or completion dword 0.
    pub fn from_dword(dw: u32) -> Self {
        Self {
            nsqr: dw as u16,
            ncqr: (dw >> 16) as u16,
        }
    }

    /// Encodes CDW11 or completion dword 0.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.nsqr) | (u32::from(self.ncqr) << 16)
    }

    /// Builds from 1's based counts, clamping each to 1..=65535.
    pub fn from_counts(sq: u32, cq: u32) -> Self {
        let z = |n: u32| (n.clamp(1, 0xFFFF) - 1) as u16;
        Self {
            nsqr: z(sq),
            ncqr: z(cq),
        }
    }

    /// Number of I/O submission queues, 1's based.
    pub fn sq_count(&self) -> u32 {
        u32::from(self.nsqr) + 1
    }

    /// Number of I/O completion queues, 1's based.
    pub fn cq_count(&self) -> u32 {
        u32::from(self.ncqr) + 1
    }
}

/// Keep Alive Timer feature, FID 0Fh (NVMe Base 2.0, §5.27): CDW11
/// is the Keep Alive Timeout (KATO) in milliseconds; 0 disables it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAliveTimer {
    /// Keep Alive Timeout in milliseconds (bits 31:00).
    pub kato: u32,
}

impl KeepAliveTimer {
    /// Decodes CDW11 or completion dword 0.
    pub fn from_dword(dw: u32) -> Self {
        Self { kato: dw }
    }

    /// Encodes CDW11 or completion dword 0.
    pub fn to_dword(&self) -> u32 {
        self.kato
    }
}

/// Volatile Write Cache feature, FID 06h (NVMe Base 2.0, §5.27).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolatileWriteCache {
    /// Volatile Write Cache Enable (bit 0).
    pub wce: bool,
}

impl VolatileWriteCache {
    /// Decodes CDW11 or completion dword 0.
    pub fn from_dword(dw: u32) -> Self {
        Self { wce: dw & 1 != 0 }
    }

    /// Encodes CDW11 or completion dword 0.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.wce)
    }
}

/// Asynchronous Event Request completion dword 0 (NVMe Base 2.0, §5.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Asynchronous Event Type (bits 02:00); see [`aet`].
    pub aet: u8,
    /// Asynchronous Event Information (bits 15:08); see [`aei_notice`].
    pub aei: u8,
    /// Log Page Identifier to read to clear the event (bits 23:16).
    pub lid: u8,
}

impl AsyncEvent {
    /// Notice: Namespace Attribute Changed; read the Changed Namespace List.
    pub const NS_ATTR_CHANGED: Self = Self {
        aet: aet::NOTICE,
        aei: aei_notice::NS_ATTR_CHANGED,
        lid: lid::CHANGED_NS,
    };

    /// Notice: Asymmetric Namespace Access Change; read the ANA log page.
    pub const ANA_CHANGE: Self = Self {
        aet: aet::NOTICE,
        aei: aei_notice::ANA_CHANGE,
        lid: lid::ANA,
    };

    /// Notice: Discovery Log Page Change; read the discovery log page.
    pub const DISCOVERY_LOG_CHANGED: Self = Self {
        aet: aet::NOTICE,
        aei: aei_notice::DISCOVERY_LOG_CHANGED,
        lid: lid::DISCOVERY,
    };

    /// Decodes completion dword 0.
    pub fn from_dword(dw: u32) -> Self {
        Self {
            aet: (dw & 0x7) as u8,
            aei: (dw >> 8) as u8,
            lid: (dw >> 16) as u8,
        }
    }

    /// Encodes completion dword 0.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.aet & 0x7) | (u32::from(self.aei) << 8) | (u32::from(self.lid) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// ASCII printable strings of at most `max` bytes without trailing
    /// spaces, as space- or NUL-padded fields hold them.
    fn ascii(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[ -~]{{0,{max}}}"))
            .expect("valid regex")
            .prop_map(|s| s.trim_end().to_string())
    }

    fn page() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), IDENTIFY_DATA_SIZE)
    }

    fn ns_id_desc() -> impl Strategy<Value = NsIdDescriptor> {
        prop_oneof![
            any::<[u8; 8]>().prop_map(NsIdDescriptor::Eui64),
            any::<[u8; 16]>().prop_map(NsIdDescriptor::Nguid),
            any::<[u8; 16]>().prop_map(NsIdDescriptor::Uuid),
            any::<u8>().prop_map(NsIdDescriptor::Csi),
        ]
    }

    fn error_log_entry() -> impl Strategy<Value = ErrorLogEntry> {
        (
            (any::<u64>(), any::<u16>(), any::<u16>(), any::<u16>()),
            (any::<u16>(), any::<u64>(), any::<u32>(), any::<u8>()),
            (any::<u8>(), any::<u64>(), any::<u16>()),
        )
            .prop_map(
                |((ec, sqid, cid, st), (pel, lba, nsid, vs), (tt, cs, tsi))| ErrorLogEntry {
                    error_count: ec,
                    sqid,
                    cid,
                    status: st,
                    parm_err_loc: pel,
                    lba,
                    nsid,
                    vs,
                    trtype: tt,
                    cs,
                    trtype_spec_info: tsi,
                },
            )
    }

    proptest! {
        /// Every modeled field survives encode/decode: numeric fields come
        /// from decoding random bytes (reaching every value), strings from
        /// the ASCII strategy.
        #[test]
        fn identify_controller_round_trips(
            raw in page(),
            sn in ascii(20),
            mn in ascii(40),
            fr in ascii(8),
            subnqn in ascii(223),
        ) {
            let mut c = IdentifyController::decode(&raw).unwrap();
            c.sn = sn;
            c.mn = mn;
            c.fr = fr;
            c.subnqn = subnqn;
            let bytes = c.to_bytes();
            prop_assert_eq!(bytes.len(), IdentifyController::SIZE);
            prop_assert_eq!(IdentifyController::decode(&bytes).unwrap(), c);
        }

        #[test]
        fn identify_namespace_round_trips(raw in page()) {
            let ns = IdentifyNamespace::decode(&raw).unwrap();
            let bytes = ns.to_bytes();
            prop_assert_eq!(IdentifyNamespace::decode(&bytes).unwrap(), ns);
        }

        #[test]
        fn lba_formats_set_and_read_back(
            fmts in proptest::collection::vec(
                (any::<u16>(), any::<u8>(), 0u8..4)
                    .prop_map(|(ms, lbads, rp)| LbaFormat { ms, lbads, rp }),
                1..=64,
            )
        ) {
            let mut ns = IdentifyNamespace::default();
            ns.set_lba_formats(&fmts);
            prop_assert_eq!(usize::from(ns.nlbaf), fmts.len() - 1);
            let back = IdentifyNamespace::decode(&ns.to_bytes()).unwrap();
            prop_assert_eq!(back.lba_formats(), &fmts[..]);
        }

        #[test]
        fn smart_log_round_trips(raw in proptest::collection::vec(any::<u8>(), SmartLog::SIZE)) {
            let s = SmartLog::decode(&raw).unwrap();
            prop_assert_eq!(SmartLog::decode(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn error_log_entry_round_trips(e in error_log_entry()) {
            prop_assert_eq!(ErrorLogEntry::decode(&e.to_bytes()).unwrap(), e);
        }

        #[test]
        fn ns_list_round_trips(ids in proptest::collection::vec(1u32.., 0..=NS_LIST_MAX)) {
            let mut buf = vec![0xAAu8; IDENTIFY_DATA_SIZE];
            prop_assert_eq!(encode_ns_list(&ids, &mut buf), ids.len());
            prop_assert_eq!(decode_ns_list(&buf), ids);
        }

        #[test]
        fn changed_ns_list_round_trips(
            ids in proptest::collection::vec(1u32..0xFFFF_FFFF, 0..=NS_LIST_MAX)
        ) {
            let l = ChangedNsList::from_nsids(ids);
            prop_assert_eq!(ChangedNsList::decode(&l.to_bytes()).unwrap(), l);
        }

        #[test]
        fn ns_id_descs_round_trip(descs in proptest::collection::vec(ns_id_desc(), 0..16)) {
            let mut buf = vec![0xAAu8; IDENTIFY_DATA_SIZE];
            let used = encode_ns_id_descs(&descs, &mut buf).unwrap();
            prop_assert!(buf[used..].iter().all(|&b| b == 0));
            prop_assert_eq!(decode_ns_id_descs(&buf).unwrap(), descs);
        }

        #[test]
        fn get_log_page_round_trips(
            lid in any::<u8>(), lsp in 0u8..0x80, rae in any::<bool>(),
            numd in any::<u32>(), lsi in any::<u16>(), lpo in any::<u64>(),
        ) {
            let g = GetLogPage { lid, lsp, rae, numd, lsi, lpo };
            let [c10, c11, c12, c13] = g.to_cdws();
            prop_assert_eq!(GetLogPage::from_cdws(c10, c11, c12, c13), g);
            prop_assert_eq!(get_log_page_numd(c10, c11), u64::from(numd) + 1);
        }

        #[test]
        fn identify_cdws_round_trip(
            cns in any::<u8>(), cntid in any::<u16>(), cnssid in any::<u16>(), csi in any::<u8>(),
        ) {
            let i = Identify { cns, cntid, cnssid, csi };
            let [c10, c11] = i.to_cdws();
            prop_assert_eq!(Identify::from_cdws(c10, c11), i);
        }

        #[test]
        fn feature_dwords_round_trip(
            fid in any::<u8>(), sv in any::<bool>(), sel in 0u8..8,
            nsqr in any::<u16>(), ncqr in any::<u16>(), kato in any::<u32>(), wce in any::<bool>(),
        ) {
            let s = SetFeatures { fid, sv };
            prop_assert_eq!(SetFeatures::from_cdw10(s.to_cdw10()), s);
            let g = GetFeatures { fid, sel };
            prop_assert_eq!(GetFeatures::from_cdw10(g.to_cdw10()), g);
            let q = NumberOfQueues { nsqr, ncqr };
            prop_assert_eq!(NumberOfQueues::from_dword(q.to_dword()), q);
            let k = KeepAliveTimer { kato };
            prop_assert_eq!(KeepAliveTimer::from_dword(k.to_dword()), k);
            let w = VolatileWriteCache { wce };
            prop_assert_eq!(VolatileWriteCache::from_dword(w.to_dword()), w);
        }

        #[test]
        fn async_event_round_trips(aet in 0u8..8, aei in any::<u8>(), lid in any::<u8>()) {
            let e = AsyncEvent { aet, aei, lid };
            prop_assert_eq!(AsyncEvent::from_dword(e.to_dword()), e);
        }

        /// Decoders return errors, never panic, on arbitrary input.
        #[test]
        fn decoders_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = IdentifyController::decode(&raw);
            let _ = IdentifyNamespace::decode(&raw);
            let _ = ErrorLogEntry::decode(&raw);
            let _ = SmartLog::decode(&raw);
            let _ = ChangedNsList::decode(&raw);
            let _ = decode_ns_list(&raw);
            let _ = decode_ns_id_descs(&raw);
        }

        /// Structured garbage: plausible descriptor headers with random
        /// lengths and types.
        #[test]
        fn ns_id_descs_garbage_never_panics(
            hdrs in proptest::collection::vec((0u8..6, any::<u8>(), 0usize..20), 0..8),
            cut in 0usize..200,
        ) {
            let mut buf = Vec::new();
            for (t, l, pad) in hdrs {
                buf.extend_from_slice(&[t, l, 0, 0]);
                buf.resize(buf.len() + pad, 0x5A);
            }
            buf.truncate(cut);
            let _ = decode_ns_id_descs(&buf);
        }
    }

    #[test]
    fn identify_controller_fields_at_spec_offsets() {
        let c = IdentifyController {
            vid: 0x1B36,
            sn: "SN1".into(),
            mn: "unvme".into(),
            fr: "0.1".into(),
            mdts: 0x05,
            cntlid: 0x1234,
            ver: 0x0002_0000,
            cntrltype: 1,
            kas: 10,
            sqes: 0x66,
            cqes: 0x44,
            nn: 0xDEAD_BEEF,
            sgls: 0x0010_0005,
            subnqn: "nqn.2024-01.io.unvme:sub".into(),
            ioccsz: 0x0000_0104,
            iorcsz: 1,
            msdbd: 1,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..2], &[0x36, 0x1B]);
        assert_eq!(&b[4..24], b"SN1                 ");
        assert_eq!(&b[24..29], b"unvme");
        assert!(b[29..64].iter().all(|&x| x == b' '));
        assert_eq!(&b[64..72], b"0.1     ");
        assert_eq!(b[77], 0x05);
        assert_eq!(&b[78..80], &[0x34, 0x12]);
        assert_eq!(&b[80..84], &[0x00, 0x00, 0x02, 0x00]);
        assert_eq!(b[111], 1);
        assert_eq!(&b[320..322], &[10, 0]);
        assert_eq!(b[512], 0x66);
        assert_eq!(b[513], 0x44);
        assert_eq!(&b[516..520], &[0xEF, 0xBE, 0xAD, 0xDE]);
        assert_eq!(&b[536..540], &[0x05, 0x00, 0x10, 0x00]);
        assert_eq!(&b[768..792], b"nqn.2024-01.io.unvme:sub");
        assert!(b[792..1024].iter().all(|&x| x == 0));
        assert_eq!(&b[1792..1796], &[0x04, 0x01, 0, 0]);
        assert_eq!(&b[1796..1800], &[1, 0, 0, 0]);
        assert_eq!(b[1803], 1);
    }

    #[test]
    fn max_transfer_scales_mdts_by_the_minimum_page_size() {
        let mut c = IdentifyController::default();
        assert_eq!(c.max_transfer(0), 0, "MDTS 0 is no limit");
        c.mdts = 5;
        assert_eq!(c.max_transfer(0), 128 * 1024);
        assert_eq!(c.max_transfer(1), 256 * 1024, "MPSMIN 1 is 8 KiB pages");
        c.mdts = 19;
        assert_eq!(c.max_transfer(0), 1 << 31);
        c.mdts = 20;
        assert_eq!(c.max_transfer(0), 1 << 31, "capped at 2 GiB");
        c.mdts = 255;
        assert_eq!(c.max_transfer(15), 1 << 31, "no overflow");
    }

    #[test]
    fn incapsule_data_size_is_ioccsz_less_the_sqe() {
        let mut c = IdentifyController::default();
        assert_eq!(c.incapsule_data_size(), 0);
        c.ioccsz = 4;
        assert_eq!(c.incapsule_data_size(), 0, "a bare SQE carries no data");
        c.ioccsz = 260;
        assert_eq!(c.incapsule_data_size(), 4096);
        c.ioccsz = u32::MAX;
        assert_eq!(c.incapsule_data_size(), u32::MAX - 64);
    }

    #[test]
    fn oncs_and_vwc_bits_are_read_from_identify_controller() {
        let mut b = IdentifyController::default().to_bytes();
        b[520] = (oncs::DSM | oncs::WRITE_ZEROES) as u8;
        b[525] = 0x07;
        let c = IdentifyController::decode(&b).unwrap();
        assert!(c.supports_dsm() && c.supports_write_zeroes() && c.volatile_write_cache());
        let c = IdentifyController {
            oncs: oncs::COMPARE,
            vwc: 0x06,
            ..Default::default()
        };
        assert!(!c.supports_dsm() && !c.supports_write_zeroes() && !c.volatile_write_cache());
    }

    #[test]
    fn identify_controller_power_state_0_at_2048() {
        let mut c = IdentifyController::default();
        c.psd[0].mp = 2500;
        c.psd[1].nops = true;
        let b = c.to_bytes();
        assert_eq!(&b[2048..2050], &2500u16.to_le_bytes());
        assert_eq!(b[2080 + 3], 0x02);
    }

    #[test]
    fn long_subnqn_keeps_its_nul_terminator() {
        let c = IdentifyController {
            subnqn: "n".repeat(300),
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(b[1022], b'n');
        assert_eq!(b[1023], 0);
        let back = IdentifyController::decode(&b).unwrap();
        assert_eq!(back.subnqn.len(), 255);
    }

    #[test]
    fn identify_namespace_fields_at_spec_offsets() {
        let mut ns = IdentifyNamespace {
            nsze: 0x0102_0304_0506_0708,
            flbas: 0x01,
            nguid: [0x11; 16],
            eui64: [0x22; 8],
            anagrpid: 7,
            ..Default::default()
        };
        ns.set_lba_formats(&[
            LbaFormat::with_lbads(9),
            LbaFormat {
                ms: 8,
                lbads: 12,
                rp: 1,
            },
        ]);
        let b = ns.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[25], 1, "nlbaf is 0's based");
        assert_eq!(b[26], 0x01);
        assert_eq!(&b[92..96], &[7, 0, 0, 0]);
        assert_eq!(&b[104..120], &[0x11; 16]);
        assert_eq!(&b[120..128], &[0x22; 8]);
        assert_eq!(&b[128..132], &[0, 0, 9, 0]);
        assert_eq!(&b[132..136], &[8, 0, 12, 1]);
        assert_eq!(ns.lba_size(), Some(4096));
    }

    #[test]
    fn lba_size_uses_flbas_high_index_bits_and_rejects_bad_formats() {
        let mut ns = IdentifyNamespace::default();
        let mut fmts = vec![LbaFormat::with_lbads(9); 20];
        fmts[17] = LbaFormat::with_lbads(12);
        ns.set_lba_formats(&fmts);
        // Index 17 = 0b01_0001: low bits 0001 in 3:0, high bits 01 in 6:5.
        ns.flbas = 0x21;
        assert_eq!(ns.flbas_index(), 17);
        assert_eq!(ns.lba_size(), Some(4096));
        // Index beyond nlbaf.
        ns.flbas = 0x0F | 0x20;
        assert_eq!(ns.lba_size(), None);
        // lbads below 9 is unsupported.
        ns.set_lba_formats(&[LbaFormat::with_lbads(8)]);
        ns.flbas = 0;
        assert_eq!(ns.lba_size(), None);
        // Default: one zeroed format, unsupported.
        assert_eq!(IdentifyNamespace::default().lba_size(), None);
    }

    #[test]
    fn truncated_structures_are_errors() {
        let short = [0u8; 4095];
        assert!(matches!(
            IdentifyController::decode(&short),
            Err(Error::Truncated {
                need: 4096,
                have: 4095,
                ..
            })
        ));
        assert!(IdentifyNamespace::decode(&short).is_err());
        assert!(ChangedNsList::decode(&short).is_err());
        assert!(SmartLog::decode(&short[..511]).is_err());
        assert!(ErrorLogEntry::decode(&short[..63]).is_err());
        assert!(IdentifyController::decode(&[]).is_err());
    }

    #[test]
    fn ns_list_stops_at_zero_and_caps_at_1024() {
        let mut buf = vec![0u8; IDENTIFY_DATA_SIZE];
        let ids: Vec<u32> = (1..=2000).collect();
        assert_eq!(encode_ns_list(&ids, &mut buf), NS_LIST_MAX);
        assert_eq!(decode_ns_list(&buf).len(), NS_LIST_MAX);
        let raw = [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 9];
        assert_eq!(decode_ns_list(&raw), vec![1, 2]);
    }

    #[test]
    fn active_ns_list_returns_larger_nsids_in_order() {
        let mut buf = vec![0u8; IDENTIFY_DATA_SIZE];
        assert_eq!(encode_active_ns_list(&[5, 1, 3, 3, 9], 2, &mut buf), 3);
        assert_eq!(decode_ns_list(&buf), vec![3, 5, 9]);
    }

    #[test]
    fn changed_ns_list_over_1024_is_ffffffff_then_zeros() {
        let l = ChangedNsList::from_nsids((1..=1025).collect());
        assert_eq!(l, ChangedNsList::Overflow);
        let b = ChangedNsList::Nsids((1..=1025).collect()).to_bytes();
        assert_eq!(&b[0..4], &[0xFF; 4]);
        assert!(b[4..].iter().all(|&x| x == 0));
        assert_eq!(ChangedNsList::decode(&b).unwrap(), ChangedNsList::Overflow);
    }

    #[test]
    fn ns_id_desc_layout() {
        let mut buf = vec![0u8; IDENTIFY_DATA_SIZE];
        let n = encode_ns_id_descs(
            &[NsIdDescriptor::Nguid([7; 16]), NsIdDescriptor::Csi(0)],
            &mut buf,
        )
        .unwrap();
        assert_eq!(n, 20 + 5);
        assert_eq!(&buf[0..4], &[nidt::NGUID, 16, 0, 0]);
        assert_eq!(&buf[4..20], &[7; 16]);
        assert_eq!(&buf[20..25], &[nidt::CSI, 1, 0, 0, 0]);
    }

    #[test]
    fn ns_id_desc_bad_input_is_an_error() {
        assert_eq!(
            decode_ns_id_descs(&[9, 8, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            Err(Error::Invalid {
                field: "nidt",
                value: 9
            })
        );
        assert_eq!(
            decode_ns_id_descs(&[nidt::EUI64, 16, 0, 0]),
            Err(Error::Invalid {
                field: "nidl",
                value: 16
            })
        );
        assert!(matches!(
            decode_ns_id_descs(&[nidt::UUID, 16, 0, 0, 1, 2]),
            Err(Error::Truncated {
                need: 20,
                have: 6,
                ..
            })
        ));
        assert!(matches!(
            decode_ns_id_descs(&[nidt::CSI, 1]),
            Err(Error::Truncated { .. })
        ));
        assert_eq!(decode_ns_id_descs(&[]), Ok(vec![]));
        let mut small = [0u8; 10];
        assert!(encode_ns_id_descs(&[NsIdDescriptor::Uuid([1; 16])], &mut small).is_err());
    }

    #[test]
    fn get_log_page_dword_layout() {
        // 4096 bytes of the SMART log, RAE set, offset 512.
        let g = GetLogPage::from_cdws((1023 << 16) | (1 << 15) | 0x02, 0, 512, 0);
        assert_eq!(g.lid, lid::SMART);
        assert!(g.rae);
        assert_eq!(g.len_bytes(), 4096);
        assert_eq!(g.lpo, 512);
        assert_eq!(get_log_page_numd(0xFFFF_0000, 0xFFFF), 1 << 32);
        assert_eq!(get_log_page_numd(0, 1), 0x1_0001);
    }

    #[test]
    fn number_of_queues_layout() {
        let q = NumberOfQueues::from_counts(4, 2);
        assert_eq!(q.to_dword(), 0x0001_0003);
        assert_eq!((q.sq_count(), q.cq_count()), (4, 2));
        assert_eq!(
            NumberOfQueues::from_counts(0, 1 << 20).to_dword(),
            0xFFFE_0000
        );
    }

    #[test]
    fn ns_attr_changed_notice_dword() {
        assert_eq!(AsyncEvent::NS_ATTR_CHANGED.to_dword(), 0x0004_0002);
        assert_eq!(AsyncEvent::DISCOVERY_LOG_CHANGED.to_dword(), 0x0070_F002);
    }

    #[test]
    fn firmware_slot_log_round_trips_with_the_revision_in_slot_1() {
        let l = FirmwareSlotLog {
            afi: 1,
            frs: [
                "0.1.0".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                "z".into(),
            ],
        };
        let b = l.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(&b[8..16], b"0.1.0   ");
        assert_eq!(&b[16..24], &[0; 8]);
        assert_eq!(FirmwareSlotLog::decode(&b).unwrap(), l);
    }
}
