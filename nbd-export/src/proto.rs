//! NBD wire formats: constants, the handshake and option messages, the
//! transmission request and the simple and structured replies, as the NBD
//! protocol document (`doc/proto.md` of NetworkBlockDevice/nbd) names them.
//!
//! Pure code: no I/O, no allocation except where a message carries a
//! variable-length string. Decoders never panic on peer input. The request
//! validator, [`check_request`], maps every bad request to the errno the
//! protocol document names; it is the one place NBD errors are chosen.

use unvme_bdev::IoError;

/// `NBDMAGIC`, the first 8 bytes the server sends ("Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub mod hflag {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, sent after the server greeting).
pub mod cflag {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every client flag this server knows.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_PEEK_EXPORT` (withdrawn).
    pub const PEEK_EXPORT: u32 = 4;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmdflag {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and the flag.
pub mod reply {
    /// `NBD_REPLY_FLAG_DONE`.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Error values of the transmission phase ("Error values").
pub mod errno {
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` states (`NBD_STATE_*`).
pub mod state {
    /// `NBD_STATE_HOLE`.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The context ID this server gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string the protocol allows (export names, messages).
pub const MAX_STRING: usize = 4096;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES).to_be_bytes());
    g
}

/// The header of a client option ("Option haggling").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Why an option header cannot be accepted (the connection ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("option header magic {0:#x} is not IHAVEOPT")]
pub struct BadOptionMagic(pub u64);

impl OptionHeader {
    /// Decodes the 16-byte header.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, BadOptionMagic> {
        let magic = be64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be32(&b[8..12]),
            length: be32(&b[12..16]),
        })
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends an option reply (magic, option, type, length, data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, rtype: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An option reply as a client sees it (tests and the Rust client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option replied to.
    pub option: u32,
    /// `NBD_REP_*`.
    pub rtype: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Decodes one option reply from the front of `b`; returns it and the
    /// bytes consumed, or `None` if `b` is too short or the magic is wrong.
    pub fn decode(b: &[u8]) -> Option<(OptionReply, usize)> {
        if b.len() < 20 || be64(&b[0..8]) != REPLY_MAGIC {
            return None;
        }
        let len = be32(&b[16..20]) as usize;
        let data = b.get(20..20 + len)?.to_vec();
        Some((
            OptionReply {
                option: be32(&b[8..12]),
                rtype: be32(&b[12..16]),
                data,
            },
            20 + len,
        ))
    }
}

/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub fn info_block_size(sizes: BlockSizes) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&sizes.min.to_be_bytes());
    b[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
    b[10..].copy_from_slice(&sizes.max.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload: type, string.
pub fn info_string(itype: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&itype.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// The block size constraints of an export ("Block size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum: requests must be aligned to it (the LBA size).
    pub min: u32,
    /// Preferred: 4096, or the LBA size if larger.
    pub preferred: u32,
    /// Maximum payload of one READ/WRITE.
    pub max: u32,
}

impl BlockSizes {
    /// Largest payload this server ever accepts: 32 MiB, as qemu-nbd.
    pub const MAX_PAYLOAD: u32 = 32 << 20;

    /// Constraints for a device of `block_size`-byte blocks. The server
    /// splits requests larger than the device's own transfer limit, so the
    /// maximum is [`Self::MAX_PAYLOAD`] whatever the device's MDTS.
    pub fn for_block_size(block_size: u32) -> BlockSizes {
        let min = block_size.max(1);
        BlockSizes {
            min,
            preferred: min.max(4096),
            max: Self::MAX_PAYLOAD.max(min),
        }
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and requested
/// information types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested `NBD_INFO_*` types.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data; `None` when it is malformed (lengths that
    /// do not add up, a name that is not UTF-8 or too long).
    pub fn decode(d: &[u8]) -> Option<InfoRequest> {
        let nlen = be32(d.get(0..4)?) as usize;
        if nlen > MAX_STRING {
            return None;
        }
        let name = std::str::from_utf8(d.get(4..4 + nlen)?).ok()?.to_owned();
        let rest = &d[4 + nlen..];
        let n = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let reqs = &rest[2..];
        if reqs.len() != 2 * n {
            return None;
        }
        let requests = reqs
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some(InfoRequest { name, requests })
    }

    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Decodes the option data; `None` when it is malformed.
    pub fn decode(d: &[u8]) -> Option<MetaContextRequest> {
        let nlen = be32(d.get(0..4)?) as usize;
        if nlen > MAX_STRING {
            return None;
        }
        let name = std::str::from_utf8(d.get(4..4 + nlen)?).ok()?.to_owned();
        let mut p = 4 + nlen;
        let n = be32(d.get(p..p + 4)?) as usize;
        p += 4;
        let mut queries = Vec::new();
        for _ in 0..n {
            let qlen = be32(d.get(p..p + 4)?) as usize;
            p += 4;
            if qlen > MAX_STRING {
                return None;
            }
            let q = std::str::from_utf8(d.get(p..p + qlen)?).ok()?;
            queries.push(q.to_owned());
            p += qlen;
        }
        (p == d.len()).then_some(MetaContextRequest { name, queries })
    }

    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }
}

/// Whether a context query selects `base:allocation` (for LIST, `base:`
/// lists every context of the namespace).
pub fn query_selects_base_allocation(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// A transmission request ("Transmission phase", "Request message").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdRequest {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub typ: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload for WRITE).
    pub length: u32,
}

/// Why a request header cannot be accepted (the connection ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request magic {0:#x} is not NBD_REQUEST_MAGIC")]
pub struct BadRequestMagic(pub u32);

impl NbdRequest {
    /// Decodes a 28-byte request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, BadRequestMagic> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(NbdRequest {
            flags: u16::from_be_bytes([b[4], b[5]]),
            typ: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.typ == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header.
pub fn chunk_header(flags: u16, rtype: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&rtype.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&length.to_be_bytes());
    b
}

/// A reply header as a client sees it (tests and the Rust client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: error and cookie (READ data follows on success).
    Simple {
        /// NBD errno, 0 on success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; `length` bytes of payload follow.
    Chunk {
        /// `NBD_REPLY_FLAG_*`.
        flags: u16,
        /// `NBD_REPLY_TYPE_*`.
        rtype: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Bytes of header for a reply starting with `magic`, or `None` for an
    /// unknown magic.
    pub fn header_len(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(CHUNK_HEADER_LEN),
            _ => None,
        }
    }

    /// Decodes a reply header from the front of `b`.
    pub fn decode(b: &[u8]) -> Option<ReplyHeader> {
        let magic = be32(b.get(0..4)?);
        match magic {
            SIMPLE_REPLY_MAGIC => Some(ReplyHeader::Simple {
                error: be32(b.get(4..8)?),
                cookie: be64(b.get(8..16)?),
            }),
            STRUCTURED_REPLY_MAGIC => Some(ReplyHeader::Chunk {
                flags: u16::from_be_bytes([*b.get(4)?, *b.get(5)?]),
                rtype: u16::from_be_bytes([*b.get(6)?, *b.get(7)?]),
                cookie: be64(b.get(8..16)?),
                length: be32(b.get(16..20)?),
            }),
            _ => None,
        }
    }
}

/// What the transmission phase knows about the export and the session, for
/// validating requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportView {
    /// Export size in bytes.
    pub size: u64,
    /// The transmission flags sent to the client.
    pub tflags: u16,
    /// Block size constraints sent (or implied).
    pub sizes: BlockSizes,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT.
    pub base_allocation: bool,
    /// WRITE_ZEROES is cheap on the device (FAST_ZERO may succeed).
    pub fast_zero: bool,
}

/// A request the server refuses, with the errno and a message for the
/// structured ERROR chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// NBD errno.
    pub errno: u32,
    /// Human-readable reason.
    pub message: &'static str,
}

const fn refuse(errno: u32, message: &'static str) -> Refusal {
    Refusal { errno, message }
}

/// Command flags each request type accepts.
fn allowed_flags(typ: u16) -> u16 {
    match typ {
        cmd::READ => cmdflag::DF,
        cmd::WRITE => cmdflag::FUA,
        cmd::TRIM => cmdflag::FUA,
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmdflag::REQ_ONE,
        _ => 0,
    }
}

/// Checks a request against the export, as the protocol document asks:
/// unknown commands and flags, and flags the server did not advertise, get
/// EINVAL; writes on a read-only export EPERM; READ/WRITE larger than the
/// maximum block size EOVERFLOW; misaligned requests EINVAL; ranges past the
/// end ENOSPC for WRITE/WRITE_ZEROES and EINVAL otherwise; FAST_ZERO on a
/// device where zeroing is not cheap ENOTSUP. DISC is never refused.
pub fn check_request(r: &NbdRequest, x: &ExportView) -> Result<(), Refusal> {
    let t = x.tflags;
    let advertised = |f: u16| t & f != 0;
    match r.typ {
        cmd::DISC => return Ok(()),
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => {}
        cmd::WRITE_ZEROES | cmd::BLOCK_STATUS => {}
        _ => return Err(refuse(errno::EINVAL, "unknown command")),
    }
    if r.flags & !allowed_flags(r.typ) != 0 {
        return Err(refuse(
            errno::EINVAL,
            "command flag unknown or not valid for this command",
        ));
    }
    let writes = matches!(r.typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && advertised(tflag::READ_ONLY) {
        return Err(refuse(errno::EPERM, "the export is read-only"));
    }
    if r.flags & cmdflag::FUA != 0 && !advertised(tflag::SEND_FUA) {
        return Err(refuse(errno::EINVAL, "FUA was not advertised"));
    }
    if r.flags & cmdflag::DF != 0 && !(x.structured && advertised(tflag::SEND_DF)) {
        return Err(refuse(errno::EINVAL, "DF needs structured replies"));
    }
    let needs = match r.typ {
        cmd::FLUSH => tflag::SEND_FLUSH,
        cmd::TRIM => tflag::SEND_TRIM,
        cmd::CACHE => tflag::SEND_CACHE,
        cmd::WRITE_ZEROES => tflag::SEND_WRITE_ZEROES,
        _ => 0,
    };
    if needs != 0 && !advertised(needs) {
        return Err(refuse(
            errno::EINVAL,
            "command not advertised for this export",
        ));
    }
    if r.typ == cmd::BLOCK_STATUS && !(x.structured && x.base_allocation) {
        return Err(refuse(
            errno::EINVAL,
            "BLOCK_STATUS needs structured replies and a metadata context",
        ));
    }
    if r.flags & cmdflag::FAST_ZERO != 0 && !advertised(tflag::SEND_FAST_ZERO) {
        return Err(refuse(errno::EINVAL, "FAST_ZERO was not advertised"));
    }
    if r.typ == cmd::FLUSH {
        return Ok(());
    }
    if matches!(r.typ, cmd::READ | cmd::WRITE) && r.length > x.sizes.max {
        return Err(refuse(
            errno::EOVERFLOW,
            "request larger than the maximum block size",
        ));
    }
    let min = u64::from(x.sizes.min.max(1));
    if !r.offset.is_multiple_of(min) || !u64::from(r.length).is_multiple_of(min) {
        return Err(refuse(
            errno::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= x.size);
    if !in_range || (r.typ == cmd::BLOCK_STATUS && r.offset >= x.size) {
        let e = if matches!(r.typ, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(e, "request beyond the end of the export"));
    }
    if r.typ == cmd::BLOCK_STATUS && r.length == 0 {
        return Err(refuse(errno::EINVAL, "BLOCK_STATUS of length 0"));
    }
    if r.flags & cmdflag::FAST_ZERO != 0 && !x.fast_zero {
        return Err(refuse(errno::ENOTSUP, "zeroing is not fast on this device"));
    }
    Ok(())
}

/// The NBD errno for a failed block-device request of type `typ`.
pub fn errno_for(e: &IoError, typ: u16) -> u32 {
    match e {
        IoError::OutOfRange if matches!(typ, cmd::WRITE | cmd::WRITE_ZEROES) => errno::ENOSPC,
        IoError::OutOfRange | IoError::BadBuffer => errno::EINVAL,
        IoError::TooLarge => errno::EOVERFLOW,
        IoError::Unsupported => errno::ENOTSUP,
        IoError::CompareFailure | IoError::Media(_) | IoError::Timeout | IoError::Unavailable => {
            errno::EIO
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view() -> ExportView {
        ExportView {
            size: 1 << 20,
            tflags: tflag::HAS_FLAGS
                | tflag::SEND_FLUSH
                | tflag::SEND_FUA
                | tflag::SEND_TRIM
                | tflag::SEND_WRITE_ZEROES
                | tflag::SEND_FAST_ZERO
                | tflag::SEND_CACHE
                | tflag::SEND_DF,
            sizes: BlockSizes::for_block_size(512),
            structured: true,
            base_allocation: true,
            fast_zero: true,
        }
    }

    fn req(typ: u16, flags: u16, offset: u64, length: u32) -> NbdRequest {
        NbdRequest {
            flags,
            typ,
            cookie: 7,
            offset,
            length,
        }
    }

    fn errno_of(r: NbdRequest, x: &ExportView) -> u32 {
        check_request(&r, x).err().map_or(0, |e| e.errno)
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_fixed_newstyle_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn block_sizes_follow_the_lba_size() {
        assert_eq!(
            BlockSizes::for_block_size(512),
            BlockSizes {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert_eq!(BlockSizes::for_block_size(8192).preferred, 8192);
    }

    #[test]
    fn valid_requests_pass() {
        let x = view();
        for r in [
            req(cmd::READ, 0, 0, 4096),
            req(cmd::READ, cmdflag::DF, 512, 512),
            req(cmd::WRITE, cmdflag::FUA, (1 << 20) - 512, 512),
            req(cmd::FLUSH, 0, 0, 0),
            req(cmd::TRIM, 0, 0, 1 << 20),
            req(
                cmd::WRITE_ZEROES,
                cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
                0,
                1 << 20,
            ),
            req(cmd::CACHE, 0, 0, 4096),
            req(cmd::BLOCK_STATUS, cmdflag::REQ_ONE, 0, 1 << 20),
            req(cmd::DISC, 0xffff, u64::MAX, u32::MAX),
            req(cmd::READ, 0, 1 << 20, 0),
        ] {
            assert_eq!(check_request(&r, &x), Ok(()), "{r:?}");
        }
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let x = view();
        assert_eq!(errno_of(req(9, 0, 0, 512), &x), errno::EINVAL);
        assert_eq!(errno_of(req(cmd::READ, 1 << 9, 0, 512), &x), errno::EINVAL);
        assert_eq!(
            errno_of(req(cmd::READ, cmdflag::FUA, 0, 512), &x),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(req(cmd::WRITE, cmdflag::NO_HOLE, 0, 512), &x),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(req(cmd::FLUSH, cmdflag::DF, 0, 0), &x),
            errno::EINVAL
        );
    }

    #[test]
    fn beyond_the_end_is_enospc_for_writes_and_einval_otherwise() {
        let x = view();
        let end = 1 << 20;
        assert_eq!(errno_of(req(cmd::WRITE, 0, end, 512), &x), errno::ENOSPC);
        assert_eq!(
            errno_of(req(cmd::WRITE_ZEROES, 0, end - 512, 1024), &x),
            errno::ENOSPC
        );
        assert_eq!(errno_of(req(cmd::READ, 0, end, 512), &x), errno::EINVAL);
        assert_eq!(errno_of(req(cmd::TRIM, 0, end, 512), &x), errno::EINVAL);
        assert_eq!(errno_of(req(cmd::CACHE, 0, end, 512), &x), errno::EINVAL);
        assert_eq!(
            errno_of(req(cmd::BLOCK_STATUS, 0, end, 512), &x),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(req(cmd::READ, 0, u64::MAX - 511, 512), &x),
            errno::EINVAL
        );
    }

    #[test]
    fn misaligned_is_einval_and_too_large_is_eoverflow() {
        let x = view();
        assert_eq!(errno_of(req(cmd::READ, 0, 1, 512), &x), errno::EINVAL);
        assert_eq!(errno_of(req(cmd::WRITE, 0, 0, 100), &x), errno::EINVAL);
        assert_eq!(
            errno_of(req(cmd::READ, 0, 0, (32 << 20) + 512), &x),
            errno::EOVERFLOW
        );
        assert_eq!(
            errno_of(req(cmd::WRITE, 0, 0, u32::MAX), &x),
            errno::EOVERFLOW
        );
    }

    #[test]
    fn writes_on_read_only_exports_are_eperm() {
        let mut x = view();
        x.tflags |= tflag::READ_ONLY;
        for t in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(errno_of(req(t, 0, 0, 512), &x), errno::EPERM);
        }
        assert_eq!(errno_of(req(cmd::READ, 0, 0, 512), &x), 0);
    }

    #[test]
    fn unadvertised_features_are_einval_and_slow_fast_zero_is_enotsup() {
        let mut x = view();
        x.structured = false;
        assert_eq!(
            errno_of(req(cmd::READ, cmdflag::DF, 0, 512), &x),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(req(cmd::BLOCK_STATUS, 0, 0, 512), &x),
            errno::EINVAL
        );
        let mut x = view();
        x.fast_zero = false;
        assert_eq!(
            errno_of(req(cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 0, 512), &x),
            errno::ENOTSUP
        );
        x.tflags &= !(tflag::SEND_TRIM | tflag::SEND_FAST_ZERO);
        assert_eq!(errno_of(req(cmd::TRIM, 0, 0, 512), &x), errno::EINVAL);
        assert_eq!(
            errno_of(req(cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 0, 512), &x),
            errno::EINVAL
        );
    }

    #[test]
    fn bad_magics_are_rejected() {
        let mut b = req(cmd::READ, 0, 0, 512).encode();
        b[0] ^= 1;
        assert!(NbdRequest::decode(&b).is_err());
        let mut o = OptionHeader {
            option: 1,
            length: 0,
        }
        .encode();
        o[3] ^= 1;
        assert!(OptionHeader::decode(&o).is_err());
    }

    #[test]
    fn meta_context_decode_rejects_trailing_or_short_data() {
        let m = MetaContextRequest {
            name: "x".into(),
            queries: vec!["base:allocation".into()],
        };
        let mut e = m.encode();
        assert_eq!(MetaContextRequest::decode(&e), Some(m));
        e.push(0);
        assert_eq!(MetaContextRequest::decode(&e), None);
        e.truncate(e.len() - 3);
        assert_eq!(MetaContextRequest::decode(&e), None);
    }

    proptest! {
        #[test]
        fn request_encode_decode_round_trips(flags: u16, typ: u16, cookie: u64, offset: u64, length: u32) {
            let r = NbdRequest { flags, typ, cookie, offset, length };
            prop_assert_eq!(NbdRequest::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn option_header_round_trips(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn info_request_round_trips(name in "[a-z:/.0-9]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::decode(&r.encode()), Some(r));
        }

        #[test]
        fn meta_context_request_round_trips(name in "[a-z:/.0-9]{0,40}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..5)) {
            let r = MetaContextRequest { name, queries };
            prop_assert_eq!(MetaContextRequest::decode(&r.encode()), Some(r));
        }

        #[test]
        fn option_data_decoders_never_panic(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::decode(&d);
            let _ = MetaContextRequest::decode(&d);
            let _ = OptionReply::decode(&d);
            let _ = ReplyHeader::decode(&d);
        }

        #[test]
        fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, rtype: u16, length: u32) {
            prop_assert_eq!(
                ReplyHeader::decode(&simple_reply(error, cookie)),
                Some(ReplyHeader::Simple { error, cookie })
            );
            prop_assert_eq!(
                ReplyHeader::decode(&chunk_header(flags, rtype, cookie, length)),
                Some(ReplyHeader::Chunk { flags, rtype, cookie, length })
            );
        }

        #[test]
        fn option_reply_round_trips(option: u32, rtype: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = Vec::new();
            put_option_reply(&mut b, option, rtype, &data);
            let n = b.len();
            prop_assert_eq!(OptionReply::decode(&b), Some((OptionReply { option, rtype, data }, n)));
        }

        #[test]
        fn accepted_requests_lie_inside_the_export_and_are_aligned(
            typ in 0u16..10, flags: u16, offset in 0u64..(2 << 20), length in 0u32..(2 << 20)
        ) {
            let x = view();
            let r = req(typ, flags, offset, length);
            if check_request(&r, &x).is_ok() && typ != cmd::DISC && typ != cmd::FLUSH {
                prop_assert!(offset + u64::from(length) <= x.size);
                prop_assert_eq!(offset % 512, 0);
                prop_assert_eq!(length % 512, 0);
                prop_assert_eq!(flags & !allowed_flags(typ), 0);
            }
        }
    }
}
