//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0, §3.6), digests, and a
//! streaming decoder.
//!
//! Every PDU starts with an 8-byte common header (CH), then a PDU-specific
//! header (PSH), an optional header digest (HDGST), padding up to PDO, data,
//! and an optional data digest (DDGST). Digests are CRC32C, little-endian.
//!
//! [`PduDecoder`] takes bytes as they arrive from a socket, in any split, and
//! yields [`Event`]s: a decoded header, then the data as slices of the input
//! (or the caller reads data straight into its own buffer and reports it with
//! [`PduDecoder::consume_data_direct`]), then the end of the data with its
//! digest verdict. It holds at most one header (≤ 256 bytes) and never
//! allocates. Every violation is a [`FatalError`] carrying the Fatal Error
//! Status and Field Error Information for the Termination Request.

use crate::le;
use crate::nvme::{Cqe, Sqe, CQE_SIZE, SQE_SIZE};

/// PDU types (§3.6.1, Figure 19).
pub mod pdu_type {
    /// Initialize Connection Request.
    pub const ICREQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const ICRESP: u8 = 0x01;
    /// Host to Controller Terminate Connection Request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to Host Terminate Connection Request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command Capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response Capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to Controller Data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to Host Data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to Transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags (§3.6.1).
pub mod flags {
    /// A header digest follows the PSH.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 0x02;
    /// Last data PDU of a command (H2CData/C2HData).
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal Error Status values of a Termination Request (§3.6.2.10, Figure 32).
pub mod fes {
    /// Invalid PDU Header Field (FEI: byte offset of the field).
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU Sequence Error.
    pub const SEQUENCE_ERROR: u16 = 0x02;
    /// Header Digest Error.
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    /// Data Transfer Out of Range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// R2T Limit Exceeded / Data Transfer Limit Exceeded.
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    /// Unsupported Parameter (FEI: byte offset of the field).
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Common header length.
pub const CH_LEN: usize = 8;
/// ICReq/ICResp length.
pub const IC_LEN: usize = 128;
/// CapsuleCmd header length (CH + SQE).
pub const CAPSULE_CMD_HLEN: usize = CH_LEN + SQE_SIZE;
/// CapsuleResp header length (CH + CQE).
pub const CAPSULE_RESP_HLEN: usize = CH_LEN + CQE_SIZE;
/// H2CData/C2HData/R2T header length.
pub const DATA_HLEN: usize = 24;
/// Termination request header length.
pub const TERM_HLEN: usize = 24;
/// Most bytes of the offending header a Termination Request carries.
pub const TERM_MAX_DATA: usize = 152;
/// Digest length.
pub const DIGEST_LEN: usize = 4;
/// Largest header (with digest and padding) the encoder writes.
pub const MAX_HEADER: usize = 256;

/// ICReq/ICResp DGST bit: header digest.
pub const DGST_HDR: u8 = 0x01;
/// ICReq/ICResp DGST bit: data digest.
pub const DGST_DATA: u8 = 0x02;

/// Initialize Connection Request PSH (§3.6.2.2, Figure 23).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcReq {
    /// PDU Format Version (0).
    pub pfv: u16,
    /// Host PDU Data Alignment, in dwords, 0's based.
    pub hpda: u8,
    /// Digest types enabled (DGST_HDR | DGST_DATA).
    pub dgst: u8,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// Initialize Connection Response PSH (§3.6.2.3, Figure 24).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcResp {
    /// PDU Format Version (0).
    pub pfv: u16,
    /// Controller PDU Data Alignment, in dwords, 0's based.
    pub cpda: u8,
    /// Digest types enabled.
    pub dgst: u8,
    /// Maximum H2C data bytes per H2CData PDU.
    pub maxh2cdata: u32,
}

/// H2C/C2H Termination Request PSH (§3.6.2.4/5). The offending PDU header
/// follows as data (`data_len` bytes, at most [`TERM_MAX_DATA`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal Error Status.
    pub fes: u16,
    /// Field Error Information.
    pub fei: u32,
    /// Bytes of the offending header carried as data.
    pub data_len: u32,
}

/// Command Capsule PDU header (§3.6.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapsuleCmd {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// In-capsule data bytes following the header.
    pub data_len: u32,
}

/// Response Capsule PDU header (§3.6.2.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapsuleResp {
    /// The completion queue entry.
    pub cqe: Cqe,
}

/// H2CData / C2HData PSH (§3.6.2.8/9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPdu {
    /// Command Capsule CID.
    pub cccid: u16,
    /// Transfer Tag (H2CData; reserved in C2HData).
    pub ttag: u16,
    /// Data offset within the command's transfer.
    pub datao: u32,
    /// Data length of this PDU.
    pub datal: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
}

/// Ready to Transfer PSH (§3.6.2.10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R2t {
    /// Command Capsule CID.
    pub cccid: u16,
    /// Transfer Tag.
    pub ttag: u16,
    /// Requested data offset.
    pub r2to: u32,
    /// Requested data length.
    pub r2tl: u32,
}

/// A decoded (or to-be-encoded) PDU header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2cTermReq(TermReq),
    /// C2HTermReq.
    C2hTermReq(TermReq),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2cData(DataPdu),
    /// C2HData.
    C2hData(DataPdu),
    /// R2T.
    R2t(R2t),
}

impl Pdu {
    /// The PDU type byte.
    pub fn pdu_type(&self) -> u8 {
        match self {
            Pdu::IcReq(_) => pdu_type::ICREQ,
            Pdu::IcResp(_) => pdu_type::ICRESP,
            Pdu::H2cTermReq(_) => pdu_type::H2C_TERM_REQ,
            Pdu::C2hTermReq(_) => pdu_type::C2H_TERM_REQ,
            Pdu::CapsuleCmd(_) => pdu_type::CAPSULE_CMD,
            Pdu::CapsuleResp(_) => pdu_type::CAPSULE_RESP,
            Pdu::H2cData(_) => pdu_type::H2C_DATA,
            Pdu::C2hData(_) => pdu_type::C2H_DATA,
            Pdu::R2t(_) => pdu_type::R2T,
        }
    }

    /// Data bytes that follow the header.
    pub fn data_len(&self) -> u32 {
        match self {
            Pdu::H2cTermReq(t) | Pdu::C2hTermReq(t) => t.data_len,
            Pdu::CapsuleCmd(c) => c.data_len,
            Pdu::H2cData(d) | Pdu::C2hData(d) => d.datal,
            _ => 0,
        }
    }
}

/// Header length for a PDU type, or `None` for an unknown type.
pub fn hlen_of(t: u8) -> Option<usize> {
    Some(match t {
        pdu_type::ICREQ | pdu_type::ICRESP => IC_LEN,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => TERM_HLEN,
        pdu_type::CAPSULE_CMD => CAPSULE_CMD_HLEN,
        pdu_type::CAPSULE_RESP => CAPSULE_RESP_HLEN,
        pdu_type::H2C_DATA | pdu_type::C2H_DATA | pdu_type::R2T => DATA_HLEN,
        _ => return None,
    })
}

/// True if PDUs of this type carry a header digest when negotiated.
fn has_hdgst(t: u8) -> bool {
    !matches!(
        t,
        pdu_type::ICREQ | pdu_type::ICRESP | pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ
    )
}

/// True if PDUs of this type may carry data with PDO/DDGST framing.
fn has_framed_data(t: u8) -> bool {
    matches!(
        t,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    )
}

/// CRC32C digest of several slices, as the 4 little-endian bytes sent on the wire.
pub fn digest(chunks: &[&[u8]]) -> [u8; 4] {
    let mut crc = 0u32;
    for c in chunks {
        crc = crc32c::crc32c_append(crc, c);
    }
    crc.to_le_bytes()
}

/// PDU framing settings agreed at connection initialization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// Header digests enabled.
    pub hdgst: bool,
    /// Data digests enabled.
    pub ddgst: bool,
    /// Data alignment the receiver demands of this direction (HPDA for
    /// C2H PDUs, CPDA for H2C PDUs), in dwords, 0's based.
    pub pda: u8,
}

impl Framing {
    /// PDO for a header of `hlen` bytes carrying data.
    fn pdo(&self, header_total: usize) -> usize {
        if self.pda == 0 {
            header_total
        } else {
            let a = (usize::from(self.pda) + 1) * 4;
            header_total.div_ceil(a) * a
        }
    }
}

/// Encodes a PDU's header (CH, PSH, header digest, padding up to PDO) into
/// `out` and returns how many bytes were written. The caller sends `data_len`
/// data bytes next and, if `framing.ddgst` and there is data, their
/// [`digest`]. `out` must hold [`MAX_HEADER`] bytes.
pub fn encode_header(pdu: &Pdu, framing: &Framing, out: &mut [u8]) -> usize {
    let t = pdu.pdu_type();
    let hlen = hlen_of(t).expect("every Pdu variant has a known type");
    let data_len = pdu.data_len() as usize;
    out[..hlen].fill(0);
    let hd = framing.hdgst && has_hdgst(t);
    let header_total = hlen + if hd { DIGEST_LEN } else { 0 };
    let mut fl = 0u8;
    let (pdo, plen) = if has_framed_data(t) && data_len > 0 {
        let pdo = framing.pdo(header_total);
        let dd = if framing.ddgst {
            fl |= flags::DDGSTF;
            DIGEST_LEN
        } else {
            0
        };
        (pdo, pdo + data_len + dd)
    } else if matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ) {
        (0, hlen + data_len)
    } else {
        (0, header_total)
    };
    if hd {
        fl |= flags::HDGSTF;
    }
    match pdu {
        Pdu::IcReq(p) => {
            le::put_u16(out, 8, p.pfv);
            out[10] = p.hpda;
            out[11] = p.dgst;
            le::put_u32(out, 12, p.maxr2t);
        }
        Pdu::IcResp(p) => {
            le::put_u16(out, 8, p.pfv);
            out[10] = p.cpda;
            out[11] = p.dgst;
            le::put_u32(out, 12, p.maxh2cdata);
        }
        Pdu::H2cTermReq(p) | Pdu::C2hTermReq(p) => {
            le::put_u16(out, 8, p.fes);
            le::put_u32(out, 10, p.fei);
        }
        Pdu::CapsuleCmd(p) => p.sqe.encode(&mut out[8..72]),
        Pdu::CapsuleResp(p) => p.cqe.encode(&mut out[8..24]),
        Pdu::H2cData(p) | Pdu::C2hData(p) => {
            le::put_u16(out, 8, p.cccid);
            le::put_u16(out, 10, if t == pdu_type::H2C_DATA { p.ttag } else { 0 });
            le::put_u32(out, 12, p.datao);
            le::put_u32(out, 16, p.datal);
            if p.last {
                fl |= flags::LAST_PDU;
            }
            if p.success && t == pdu_type::C2H_DATA {
                fl |= flags::SUCCESS;
            }
        }
        Pdu::R2t(p) => {
            le::put_u16(out, 8, p.cccid);
            le::put_u16(out, 10, p.ttag);
            le::put_u32(out, 12, p.r2to);
            le::put_u32(out, 16, p.r2tl);
        }
    }
    out[0] = t;
    out[1] = fl;
    out[2] = hlen as u8;
    out[3] = pdo as u8;
    le::put_u32(out, 4, plen as u32);
    let mut n = hlen;
    if hd {
        let d = digest(&[&out[..hlen]]);
        out[hlen..hlen + DIGEST_LEN].copy_from_slice(&d);
        n += DIGEST_LEN;
    }
    if pdo > n {
        out[n..pdo].fill(0);
        n = pdo;
    }
    n
}

/// Which end of the connection the decoder serves: it accepts only the PDUs
/// that travel towards that end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We are the controller: accept ICReq, H2CTermReq, CapsuleCmd, H2CData.
    Controller,
    /// We are the host: accept ICResp, C2HTermReq, CapsuleResp, C2HData, R2T.
    Host,
}

/// Limits the decoder enforces on data-carrying PDUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most in-capsule data bytes in a CapsuleCmd.
    pub max_incapsule: u32,
    /// Most data bytes in one H2CData (MAXH2CDATA) or C2HData PDU.
    pub max_data: u32,
}

/// A protocol violation that ends the connection: the Termination Request's
/// FES and FEI, and a description for the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fatal NVMe/TCP error (FES {fes:#x}, FEI {fei:#x}): {msg}")]
pub struct FatalError {
    /// Fatal Error Status.
    pub fes: u16,
    /// Field Error Information.
    pub fei: u32,
    /// What was wrong.
    pub msg: &'static str,
}

impl FatalError {
    fn field(fei: u32, msg: &'static str) -> Self {
        FatalError {
            fes: fes::INVALID_HEADER_FIELD,
            fei,
            msg,
        }
    }
}

/// What the decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete, verified PDU header. If `pdu.data_len() > 0`, `Data`
    /// events (or direct reads) follow, then `DataEnd`.
    Pdu(Pdu),
    /// A chunk of the current PDU's data, borrowed from the input.
    Data(&'a [u8]),
    /// The current PDU's data is complete; `digest_ok` is false on a data
    /// digest mismatch (not fatal: the command fails, the connection lives).
    DataEnd {
        /// Data digest verdict (true when digests are off).
        digest_ok: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Pad { remaining: usize },
    Data { remaining: usize },
    DataDigest { have: usize },
}

/// Streaming PDU decoder; see the module documentation.
#[derive(Debug)]
pub struct PduDecoder {
    role: Role,
    framing: Framing,
    limits: Limits,
    ic_done: bool,
    hdr: [u8; MAX_HEADER],
    have: usize,
    need: usize,
    state: State,
    crc: u32,
    ddgst_this: bool,
    data_total: usize,
    recv_digest: [u8; 4],
}

impl PduDecoder {
    /// A decoder for a fresh connection: only the IC PDU is accepted until
    /// [`PduDecoder::set_framing`] is called after the IC exchange.
    pub fn new(role: Role, limits: Limits) -> Self {
        PduDecoder {
            role,
            framing: Framing::default(),
            limits,
            ic_done: false,
            hdr: [0; MAX_HEADER],
            have: 0,
            need: CH_LEN,
            state: State::Header,
            crc: 0,
            ddgst_this: false,
            data_total: 0,
            recv_digest: [0; 4],
        }
    }

    /// Applies the negotiated digests and the alignment this end demanded.
    pub fn set_framing(&mut self, framing: Framing) {
        self.framing = framing;
    }

    /// Replaces the data limits (e.g. after ICResp told the host MAXH2CDATA).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The raw bytes of the last (or partially) received header, for the
    /// Termination Request's data. At most [`TERM_MAX_DATA`] bytes.
    pub fn last_header(&self) -> &[u8] {
        &self.hdr[..self.have.min(TERM_MAX_DATA)]
    }

    /// Data bytes still expected for the current PDU (0 outside data).
    pub fn data_remaining(&self) -> usize {
        match self.state {
            State::Data { remaining } => remaining,
            _ => 0,
        }
    }

    /// True between PDUs (no partial header or data pending).
    pub fn is_idle(&self) -> bool {
        self.state == State::Header && self.have == 0
    }

    /// Reports `data` as consumed by the caller directly (read from the
    /// socket into its own buffer). `data.len()` must not exceed
    /// [`PduDecoder::data_remaining`]; extra bytes are ignored.
    pub fn consume_data_direct(&mut self, data: &[u8]) {
        if let State::Data { remaining } = self.state {
            let n = data.len().min(remaining);
            if self.ddgst_this {
                self.crc = crc32c::crc32c_append(self.crc, &data[..n]);
            }
            self.state = State::Data {
                remaining: remaining - n,
            };
        }
    }

    /// Consumes bytes from `input` and returns how many were consumed and
    /// the event they completed, if any. Call again with the rest of the
    /// input until it returns `(0, None)`.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), FatalError> {
        match self.state {
            State::Header => self.decode_header(input),
            State::Pad { remaining } => {
                let n = remaining.min(input.len());
                self.state = if n == remaining {
                    State::Data {
                        remaining: self.data_total,
                    }
                } else {
                    State::Pad {
                        remaining: remaining - n,
                    }
                };
                Ok((n, None))
            }
            State::Data { remaining: 0 } => {
                if self.ddgst_this {
                    self.state = State::DataDigest { have: 0 };
                    self.decode(input)
                } else {
                    self.finish_pdu();
                    Ok((0, Some(Event::DataEnd { digest_ok: true })))
                }
            }
            State::Data { remaining } => {
                let n = remaining.min(input.len());
                if n == 0 {
                    return Ok((0, None));
                }
                let chunk = &input[..n];
                if self.ddgst_this {
                    self.crc = crc32c::crc32c_append(self.crc, chunk);
                }
                self.state = State::Data {
                    remaining: remaining - n,
                };
                Ok((n, Some(Event::Data(chunk))))
            }
            State::DataDigest { have } => {
                let n = (DIGEST_LEN - have).min(input.len());
                self.recv_digest[have..have + n].copy_from_slice(&input[..n]);
                if have + n < DIGEST_LEN {
                    self.state = State::DataDigest { have: have + n };
                    return Ok((n, None));
                }
                let ok = self.recv_digest == self.crc.to_le_bytes();
                self.finish_pdu();
                Ok((n, Some(Event::DataEnd { digest_ok: ok })))
            }
        }
    }

    fn finish_pdu(&mut self) {
        self.state = State::Header;
        self.have = 0;
        self.need = CH_LEN;
    }

    fn decode_header<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), FatalError> {
        let mut used = 0;
        loop {
            let n = (self.need - self.have).min(input.len() - used);
            self.hdr[self.have..self.have + n].copy_from_slice(&input[used..used + n]);
            self.have += n;
            used += n;
            if self.have < self.need {
                return Ok((used, None));
            }
            if self.need == CH_LEN {
                self.need = self.check_common_header()?;
                continue;
            }
            let ev = self.finish_header()?;
            return Ok((used, Some(ev)));
        }
    }

    /// Checks that a PDU of type `t` may come now, in this role; returns
    /// its header length.
    fn check_type(&self, t: u8) -> Result<usize, FatalError> {
        let allowed = match self.role {
            Role::Controller => matches!(
                t,
                pdu_type::ICREQ
                    | pdu_type::H2C_TERM_REQ
                    | pdu_type::CAPSULE_CMD
                    | pdu_type::H2C_DATA
            ),
            Role::Host => matches!(
                t,
                pdu_type::ICRESP
                    | pdu_type::C2H_TERM_REQ
                    | pdu_type::CAPSULE_RESP
                    | pdu_type::C2H_DATA
                    | pdu_type::R2T
            ),
        };
        let Some(want_hlen) = hlen_of(t).filter(|_| allowed) else {
            return Err(FatalError::field(0, "unknown or misdirected PDU type"));
        };
        let is_ic = matches!(t, pdu_type::ICREQ | pdu_type::ICRESP);
        let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
        if !self.ic_done && !is_ic && !is_term {
            return Err(FatalError {
                fes: fes::SEQUENCE_ERROR,
                fei: 0,
                msg: "PDU before connection initialization",
            });
        }
        if self.ic_done && is_ic {
            return Err(FatalError {
                fes: fes::SEQUENCE_ERROR,
                fei: 0,
                msg: "second IC PDU",
            });
        }
        Ok(want_hlen)
    }

    /// Checks the data framing of a data-carrying PDU (PLEN, PDO, digest
    /// flag, negotiated limits) and records the data length.
    fn check_data(
        &mut self,
        t: u8,
        fl: u8,
        pdo: usize,
        plen: usize,
        header_total: usize,
    ) -> Result<(), FatalError> {
        let dd = self.framing.ddgst;
        let max = if t == pdu_type::CAPSULE_CMD {
            self.limits.max_incapsule
        } else {
            self.limits.max_data
        } as usize;
        // Largest PDU of this type: header, up to 128 bytes of padding, data, digest.
        if plen > header_total + 128 + max + DIGEST_LEN {
            return Err(too_much_data(t, "PLEN exceeds the in-capsule data size"));
        }
        if (fl & flags::DDGSTF != 0) != dd {
            return Err(FatalError::field(
                1,
                "DDGSTF does not match the negotiated data digest",
            ));
        }
        if pdo < header_total || pdo >= plen {
            return Err(FatalError::field(3, "PDO outside the PDU"));
        }
        if self.framing.pda != 0 && !pdo.is_multiple_of((usize::from(self.framing.pda) + 1) * 4) {
            return Err(FatalError::field(
                3,
                "PDO violates the negotiated data alignment",
            ));
        }
        let dlen = plen - pdo;
        let data = dlen
            .checked_sub(if dd { DIGEST_LEN } else { 0 })
            .filter(|&d| d > 0);
        let Some(data) = data else {
            return Err(FatalError::field(4, "PLEN leaves no room for data"));
        };
        if data > max {
            return Err(too_much_data(
                t,
                "in-capsule data larger than the controller accepts",
            ));
        }
        self.data_total = data;
        self.ddgst_this = dd;
        Ok(())
    }

    /// Validates the common header; returns the header bytes to collect
    /// (PSH and header digest; TermReq data is delivered as data).
    fn check_common_header(&mut self) -> Result<usize, FatalError> {
        let h = &self.hdr;
        let (t, fl, hlen, pdo, plen) = (
            h[0],
            h[1],
            usize::from(h[2]),
            usize::from(h[3]),
            le::u32(h, 4) as usize,
        );
        let want_hlen = self.check_type(t)?;
        let is_ic = matches!(t, pdu_type::ICREQ | pdu_type::ICRESP);
        let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
        if hlen != want_hlen {
            return Err(FatalError::field(2, "wrong HLEN for PDU type"));
        }
        let hd = self.framing.hdgst && has_hdgst(t);
        if has_hdgst(t) && ((fl & flags::HDGSTF != 0) != hd) {
            return Err(FatalError::field(
                1,
                "HDGSTF does not match the negotiated header digest",
            ));
        }
        let header_total = hlen + if hd { DIGEST_LEN } else { 0 };
        if is_ic {
            if plen != IC_LEN {
                return Err(FatalError::field(4, "IC PDU PLEN is not 128"));
            }
            self.data_total = 0;
            return Ok(IC_LEN);
        }
        if is_term {
            if !(TERM_HLEN..=TERM_HLEN + TERM_MAX_DATA).contains(&plen) {
                return Err(FatalError::field(
                    4,
                    "termination request PLEN out of range",
                ));
            }
            self.data_total = plen - TERM_HLEN;
            self.ddgst_this = false;
            return Ok(TERM_HLEN);
        }
        if plen < header_total {
            return Err(FatalError::field(4, "PLEN shorter than the header"));
        }
        if !has_framed_data(t) {
            if plen != header_total {
                return Err(FatalError::field(
                    4,
                    "PLEN does not match a PDU without data",
                ));
            }
            if fl & flags::DDGSTF != 0 {
                return Err(FatalError::field(1, "DDGSTF on a PDU without data"));
            }
            self.data_total = 0;
            self.ddgst_this = false;
            return Ok(header_total);
        }
        if plen == header_total {
            // A data-carrying type without data (a CapsuleCmd with no in-capsule data).
            if t != pdu_type::CAPSULE_CMD {
                return Err(FatalError::field(4, "data PDU without data"));
            }
            if fl & flags::DDGSTF != 0 {
                return Err(FatalError::field(1, "DDGSTF on a PDU without data"));
            }
            self.data_total = 0;
            self.ddgst_this = false;
            return Ok(header_total);
        }
        self.check_data(t, fl, pdo, plen, header_total)?;
        // Padding between the header digest and PDO is skipped in Pad state.
        Ok(header_total)
    }

    fn finish_header<'a>(&mut self) -> Result<Event<'a>, FatalError> {
        let h = &self.hdr;
        let (t, hlen, pdo) = (h[0], usize::from(h[2]), usize::from(h[3]));
        if self.framing.hdgst && has_hdgst(t) {
            let want = digest(&[&h[..hlen]]);
            if h[hlen..hlen + DIGEST_LEN] != want {
                return Err(FatalError {
                    fes: fes::HEADER_DIGEST_ERROR,
                    fei: 0,
                    msg: "header digest mismatch",
                });
            }
        }
        let data = self.data_total;
        let pdu = decode_psh(h, data)?;
        if matches!(pdu, Pdu::IcReq(_) | Pdu::IcResp(_)) {
            self.ic_done = true;
        }
        if data == 0 {
            self.finish_pdu();
        } else {
            self.crc = 0;
            let header_total = self.need;
            let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
            let pad = if is_term {
                0
            } else {
                pdo.saturating_sub(header_total)
            };
            self.state = if pad > 0 {
                State::Pad { remaining: pad }
            } else {
                State::Data { remaining: data }
            };
            // Keep `have` so last_header() still shows this header; reset on finish.
        }
        Ok(Event::Pdu(pdu))
    }
}

/// The error for more data than allowed: for a capsule an invalid PLEN
/// (`capsule_msg`), for a data PDU Data Transfer Limit Exceeded.
fn too_much_data(t: u8, capsule_msg: &'static str) -> FatalError {
    if t == pdu_type::CAPSULE_CMD {
        FatalError::field(4, capsule_msg)
    } else {
        FatalError {
            fes: fes::DATA_LIMIT_EXCEEDED,
            fei: 0,
            msg: "data PDU larger than the negotiated maximum",
        }
    }
}

/// Decodes the PDU-specific header of the complete header `h` (common
/// header checked; `data` is the PDU's data length).
fn decode_psh(h: &[u8], data: usize) -> Result<Pdu, FatalError> {
    let (t, fl) = (h[0], h[1]);
    Ok(match t {
        pdu_type::ICREQ => Pdu::IcReq(IcReq {
            pfv: le::u16(h, 8),
            hpda: h[10],
            dgst: h[11],
            maxr2t: le::u32(h, 12),
        }),
        pdu_type::ICRESP => Pdu::IcResp(IcResp {
            pfv: le::u16(h, 8),
            cpda: h[10],
            dgst: h[11],
            maxh2cdata: le::u32(h, 12),
        }),
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => {
            let tr = TermReq {
                fes: le::u16(h, 8),
                fei: le::u32(h, 10),
                data_len: data as u32,
            };
            if t == pdu_type::H2C_TERM_REQ {
                Pdu::H2cTermReq(tr)
            } else {
                Pdu::C2hTermReq(tr)
            }
        }
        pdu_type::CAPSULE_CMD => {
            let sqe = Sqe::decode(&h[8..72]).map_err(|_| FatalError::field(8, "short SQE"))?;
            Pdu::CapsuleCmd(CapsuleCmd {
                sqe,
                data_len: data as u32,
            })
        }
        pdu_type::CAPSULE_RESP => {
            let cqe = Cqe::decode(&h[8..24]).map_err(|_| FatalError::field(8, "short CQE"))?;
            Pdu::CapsuleResp(CapsuleResp { cqe })
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = DataPdu {
                cccid: le::u16(h, 8),
                ttag: if t == pdu_type::H2C_DATA {
                    le::u16(h, 10)
                } else {
                    0
                },
                datao: le::u32(h, 12),
                datal: le::u32(h, 16),
                last: fl & flags::LAST_PDU != 0,
                success: fl & flags::SUCCESS != 0,
            };
            if d.datal as usize != data {
                return Err(FatalError::field(16, "DATAL does not match PLEN"));
            }
            if t == pdu_type::C2H_DATA && d.success && !d.last {
                return Err(FatalError::field(1, "SUCCESS without LAST_PDU"));
            }
            if t == pdu_type::H2C_DATA {
                Pdu::H2cData(d)
            } else {
                Pdu::C2hData(d)
            }
        }
        pdu_type::R2T => Pdu::R2t(R2t {
            cccid: le::u16(h, 8),
            ttag: le::u16(h, 10),
            r2to: le::u32(h, 12),
            r2tl: le::u32(h, 16),
        }),
        _ => return Err(FatalError::field(0, "unknown PDU type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_incapsule: 8192,
        max_data: 131072,
    };

    fn framing(h: bool, d: bool, pda: u8) -> Framing {
        Framing {
            hdgst: h,
            ddgst: d,
            pda,
        }
    }

    /// Encodes a full PDU (header, data, data digest).
    fn wire(pdu: &Pdu, f: &Framing, data: &[u8]) -> Vec<u8> {
        let mut hdr = [0u8; MAX_HEADER];
        let n = encode_header(pdu, f, &mut hdr);
        let mut v = hdr[..n].to_vec();
        v.extend_from_slice(data);
        if f.ddgst && !data.is_empty() && has_framed_data(pdu.pdu_type()) {
            v.extend_from_slice(&digest(&[data]));
        }
        v
    }

    /// Decodes everything, feeding `chunk` bytes at a time.
    fn decode_all(
        dec: &mut PduDecoder,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<(Pdu, Vec<u8>, bool)>, FatalError> {
        let mut out: Vec<(Pdu, Vec<u8>, bool)> = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            let mut off = 0;
            loop {
                let (n, ev) = dec.decode(&piece[off..])?;
                off += n;
                match ev {
                    Some(Event::Pdu(p)) => {
                        out.push((p, Vec::new(), true));
                        if p.data_len() == 0 {
                            continue;
                        }
                    }
                    Some(Event::Data(d)) => out.last_mut().unwrap().1.extend_from_slice(d),
                    Some(Event::DataEnd { digest_ok }) => out.last_mut().unwrap().2 = digest_ok,
                    None if off == piece.len() => break,
                    None => {}
                }
            }
        }
        // Drain a pending zero-byte transition (DataEnd without digest).
        loop {
            match dec.decode(&[])? {
                (_, Some(Event::DataEnd { digest_ok })) => out.last_mut().unwrap().2 = digest_ok,
                (_, None) => break,
                (_, Some(_)) => unreachable!(),
            }
        }
        Ok(out)
    }

    fn ready(role: Role, f: Framing) -> PduDecoder {
        let mut d = PduDecoder::new(role, LIMITS);
        d.ic_done = true;
        d.set_framing(f);
        d
    }

    fn arb_sqe() -> impl Strategy<Value = Sqe> {
        proptest::collection::vec(any::<u8>(), 64).prop_map(|v| Sqe::decode(&v).unwrap())
    }

    proptest! {
        #[test]
        fn capsule_cmd_round_trips_in_any_split(
            sqe in arb_sqe(),
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            h: bool, d: bool, pda in 0u8..4, chunk in 1usize..200,
        ) {
            let f = framing(h, d, pda);
            let pdu = Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len: data.len() as u32 });
            let bytes = wire(&pdu, &f, &data);
            let mut dec = ready(Role::Controller, f);
            let got = decode_all(&mut dec, &bytes, chunk).unwrap();
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(got[0].0, pdu);
            prop_assert_eq!(&got[0].1, &data);
            prop_assert!(got[0].2);
            prop_assert!(dec.is_idle());
        }

        #[test]
        fn data_pdus_round_trip(
            cccid: u16, ttag: u16, datao: u32, last: bool,
            data in proptest::collection::vec(any::<u8>(), 1..5000),
            h: bool, d: bool, chunk in 1usize..999,
        ) {
            let f = framing(h, d, 0);
            let dp = DataPdu { cccid, ttag, datao, datal: data.len() as u32, last, success: false };
            let bytes = wire(&Pdu::H2cData(dp), &f, &data);
            let got = decode_all(&mut ready(Role::Controller, f), &bytes, chunk).unwrap();
            prop_assert_eq!(got[0].0, Pdu::H2cData(dp));
            prop_assert_eq!(&got[0].1, &data);
            let c2h = DataPdu { ttag: 0, success: last, ..dp };
            let bytes = wire(&Pdu::C2hData(c2h), &f, &data);
            let got = decode_all(&mut ready(Role::Host, f), &bytes, chunk).unwrap();
            prop_assert_eq!(got[0].0, Pdu::C2hData(c2h));
            prop_assert_eq!(&got[0].1, &data);
        }

        #[test]
        fn small_pdus_round_trip(cqe_raw in proptest::collection::vec(any::<u8>(), 16),
                                 cccid: u16, ttag: u16, r2to: u32, r2tl: u32, h: bool) {
            let f = framing(h, false, 0);
            let cqe = Cqe::decode(&cqe_raw).unwrap();
            let seq = [Pdu::CapsuleResp(CapsuleResp { cqe }), Pdu::R2t(R2t { cccid, ttag, r2to, r2tl })];
            let mut bytes = Vec::new();
            for p in &seq { bytes.extend(wire(p, &f, &[])); }
            let got = decode_all(&mut ready(Role::Host, f), &bytes, 7).unwrap();
            prop_assert_eq!(got.len(), 2);
            prop_assert_eq!(got[0].0, seq[0]);
            prop_assert_eq!(got[1].0, seq[1]);
        }

        #[test]
        fn ic_pdus_round_trip(pfv: u16, pda in 0u8..32, dgst in 0u8..4, m: u32) {
            let req = Pdu::IcReq(IcReq { pfv, hpda: pda, dgst, maxr2t: m });
            let got = decode_all(&mut PduDecoder::new(Role::Controller, LIMITS), &wire(&req, &Framing::default(), &[]), 5).unwrap();
            prop_assert_eq!(got[0].0, req);
            let resp = Pdu::IcResp(IcResp { pfv, cpda: pda, dgst, maxh2cdata: m });
            let got = decode_all(&mut PduDecoder::new(Role::Host, LIMITS), &wire(&resp, &Framing::default(), &[]), 128).unwrap();
            prop_assert_eq!(got[0].0, resp);
        }

        #[test]
        fn term_req_round_trips(fes in 1u16..7, fei: u32, data in proptest::collection::vec(any::<u8>(), 0..=152)) {
            let p = Pdu::C2hTermReq(TermReq { fes, fei, data_len: data.len() as u32 });
            let got = decode_all(&mut ready(Role::Host, framing(true, true, 0)), &wire(&p, &framing(true, true, 0), &data), 9).unwrap();
            prop_assert_eq!(got[0].0, p);
            prop_assert_eq!(&got[0].1, &data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), h: bool, d: bool, ic: bool) {
            for role in [Role::Controller, Role::Host] {
                let mut dec = PduDecoder::new(role, LIMITS);
                dec.ic_done = ic;
                dec.set_framing(framing(h, d, 0));
                let _ = decode_all(&mut dec, &bytes, 13);
            }
        }
    }

    fn expect_fatal(role: Role, f: Framing, bytes: &[u8]) -> FatalError {
        decode_all(&mut ready(role, f), bytes, 64).expect_err("must be fatal")
    }

    #[test]
    fn bad_hlen_is_invalid_header_field_at_offset_2() {
        let mut b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd::default()),
            &Framing::default(),
            &[],
        );
        b[2] = 70;
        let e = expect_fatal(Role::Controller, Framing::default(), &b);
        assert_eq!((e.fes, e.fei), (fes::INVALID_HEADER_FIELD, 2));
    }

    #[test]
    fn unknown_and_misdirected_types_are_rejected_at_offset_0() {
        let mut b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd::default()),
            &Framing::default(),
            &[],
        );
        b[0] = 0x0b;
        assert_eq!(
            expect_fatal(Role::Controller, Framing::default(), &b).fei,
            0
        );
        let b = wire(
            &Pdu::CapsuleResp(CapsuleResp::default()),
            &Framing::default(),
            &[],
        );
        assert_eq!(
            expect_fatal(Role::Controller, Framing::default(), &b).fes,
            fes::INVALID_HEADER_FIELD
        );
    }

    #[test]
    fn header_digest_mismatch_is_fes_3() {
        let f = framing(true, false, 0);
        let mut b = wire(&Pdu::CapsuleCmd(CapsuleCmd::default()), &f, &[]);
        b[72] ^= 1;
        assert_eq!(
            expect_fatal(Role::Controller, f, &b).fes,
            fes::HEADER_DIGEST_ERROR
        );
    }

    #[test]
    fn data_digest_mismatch_is_reported_not_fatal() {
        let f = framing(false, true, 0);
        let mut b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd {
                sqe: Sqe::default(),
                data_len: 4,
            }),
            &f,
            &[1, 2, 3, 4],
        );
        let l = b.len();
        b[l - 1] ^= 0xff;
        let got = decode_all(&mut ready(Role::Controller, f), &b, 3).unwrap();
        assert!(!got[0].2);
    }

    #[test]
    fn pdu_before_icreq_is_a_sequence_error() {
        let b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd::default()),
            &Framing::default(),
            &[],
        );
        let e = decode_all(&mut PduDecoder::new(Role::Controller, LIMITS), &b, 100).unwrap_err();
        assert_eq!(e.fes, fes::SEQUENCE_ERROR);
    }

    #[test]
    fn oversized_plen_is_rejected_before_reading_data() {
        let mut b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd {
                sqe: Sqe::default(),
                data_len: 16,
            }),
            &Framing::default(),
            &[0; 16],
        );
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = expect_fatal(Role::Controller, Framing::default(), &b[..8]);
        assert_eq!((e.fes, e.fei), (fes::INVALID_HEADER_FIELD, 4));
        let dp = DataPdu {
            datal: 200_000,
            ..Default::default()
        };
        let b = wire(&Pdu::H2cData(dp), &Framing::default(), &vec![0; 200_000]);
        assert_eq!(
            expect_fatal(Role::Controller, Framing::default(), &b[..8]).fes,
            fes::DATA_LIMIT_EXCEEDED
        );
    }

    #[test]
    fn digest_flag_mismatch_is_invalid_flags() {
        let b = wire(
            &Pdu::CapsuleCmd(CapsuleCmd::default()),
            &Framing::default(),
            &[],
        );
        let e = expect_fatal(Role::Controller, framing(true, false, 0), &b);
        assert_eq!((e.fes, e.fei), (fes::INVALID_HEADER_FIELD, 1));
    }

    #[test]
    fn pda_padding_is_emitted_and_skipped() {
        let f = framing(true, false, 7); // 32-byte alignment
        let pdu = Pdu::C2hData(DataPdu {
            datal: 3,
            last: true,
            ..Default::default()
        });
        let b = wire(&pdu, &f, &[9, 8, 7]);
        assert_eq!(b[3], 32, "PDO rounded up from 28 to 32");
        let got = decode_all(&mut ready(Role::Host, f), &b, 1).unwrap();
        assert_eq!(got[0].1, vec![9, 8, 7]);
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(u32::from_le_bytes(digest(&[b"123456789"])), 0xE306_9283);
    }

    #[test]
    fn direct_data_consumption_verifies_digest() {
        let f = framing(false, true, 0);
        let data = vec![5u8; 100];
        let b = wire(
            &Pdu::H2cData(DataPdu {
                datal: 100,
                last: true,
                ..Default::default()
            }),
            &f,
            &data,
        );
        let mut dec = ready(Role::Controller, f);
        let (n, ev) = dec.decode(&b).unwrap();
        assert!(matches!(ev, Some(Event::Pdu(_))));
        assert_eq!(dec.data_remaining(), 100);
        dec.consume_data_direct(&b[n..n + 100]);
        // The digest bytes are consumed in the same call that ends the data.
        let (used, ev) = dec.decode(&b[n + 100..]).unwrap();
        assert_eq!(used, 4);
        assert_eq!(ev, Some(Event::DataEnd { digest_ok: true }));
        assert!(dec.is_idle());
    }
}
