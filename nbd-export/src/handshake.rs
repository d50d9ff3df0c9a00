//! The NBD handshake: fixed newstyle negotiation with `NO_ZEROES`.
//!
//! [`Negotiation`] is the pure option state machine (one call per client
//! option, replies appended to a byte vector); [`negotiate`] drives it over
//! a blocking stream. Unknown options are answered with
//! `NBD_REP_ERR_UNSUP` and negotiation continues; only a wrong magic, an
//! unknown client flag, an unknown export in `NBD_OPT_EXPORT_NAME` (which
//! has no error reply), `NBD_OPT_ABORT` or an absurdly long option end the
//! connection. This module does not open devices: the caller does that when
//! [`negotiate`] reports that the client chose an export.

use std::io::{Read, Write};

use crate::proto::{
    self, cflag, info, opt, put_option_reply, rep, tflag, BlockSizes, InfoRequest,
    MetaContextRequest, OptionHeader, BASE_ALLOCATION, BASE_ALLOCATION_ID,
};
use crate::{Error, Result};

/// Option data longer than this is skipped and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data longer than this ends the connection (not worth skipping).
pub const MAX_SKIPPED_OPTION_DATA: u32 = 16 << 20;

/// What the negotiation needs to know about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportMeta {
    /// Names the export answers to; the first is the one `NBD_OPT_LIST` shows.
    pub names: Vec<String>,
    /// Description (`NBD_INFO_DESCRIPTION`, `NBD_REP_SERVER`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size constraints.
    pub sizes: BlockSizes,
    /// Transmission flags, without `SEND_DF` (added with structured replies).
    pub tflags: u16,
}

/// The state of the session the client chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Index of the export in the list given to the negotiation.
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` is selected for this export.
    pub base_allocation: bool,
    /// The transmission flags sent to the client.
    pub tflags: u16,
}

/// What happens after an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies (if any) and close the connection.
    Close,
    /// `NBD_OPT_GO`: the `NBD_REP_INFO` replies are in the output; the caller
    /// opens the export, then appends `NBD_REP_ACK` with [`ack_go`] (or an
    /// error reply instead) and enters transmission.
    Go(Session),
    /// `NBD_OPT_EXPORT_NAME`: the export data is in the output; transmission
    /// starts right after it.
    ExportName(Session),
}

/// The option state machine of one connection.
#[derive(Debug)]
pub struct Negotiation<'a> {
    exports: &'a [ExportMeta],
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Export for which `base:allocation` was selected.
    meta_export: Option<usize>,
}

impl<'a> Negotiation<'a> {
    /// A negotiation over `exports` after the client sent `client_flags`;
    /// `None` if the flags contain bits this server does not know (the
    /// protocol requires closing the connection then).
    pub fn new(exports: &'a [ExportMeta], client_flags: u32) -> Option<Self> {
        if client_flags & !cflag::KNOWN != 0 {
            return None;
        }
        Some(Negotiation {
            exports,
            no_zeroes: client_flags & cflag::NO_ZEROES != 0,
            structured: false,
            meta_export: None,
        })
    }

    /// Finds an export by name; `""` is the first (default) export.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports
            .iter()
            .position(|e| e.names.iter().any(|n| n == name))
    }

    fn session(&self, export: usize) -> Session {
        let mut tflags = self.exports[export].tflags;
        if self.structured {
            tflags |= tflag::SEND_DF;
        }
        Session {
            export,
            structured: self.structured,
            base_allocation: self.structured && self.meta_export == Some(export),
            tflags,
        }
    }

    /// Handles one option with its data, appending replies to `out`.
    pub fn option(&mut self, h: OptionHeader, data: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        let o = h.option;
        let err = |out: &mut Vec<u8>, t: u32, msg: &str| {
            put_option_reply(out, o, t, msg.as_bytes());
            OptionOutcome::Continue
        };
        match o {
            opt::EXPORT_NAME => {
                let Some(x) = std::str::from_utf8(data).ok().and_then(|n| self.lookup(n)) else {
                    return OptionOutcome::Close;
                };
                let s = self.session(x);
                out.extend_from_slice(&self.exports[x].size.to_be_bytes());
                out.extend_from_slice(&s.tflags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                OptionOutcome::ExportName(s)
            }
            opt::ABORT => {
                put_option_reply(out, o, rep::ACK, &[]);
                OptionOutcome::Close
            }
            opt::LIST => {
                if !data.is_empty() {
                    return err(out, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                for e in self.exports {
                    let name = e.names.first().map_or("", String::as_str);
                    let mut d = Vec::with_capacity(4 + name.len() + e.description.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    put_option_reply(out, o, rep::SERVER, &d);
                }
                put_option_reply(out, o, rep::ACK, &[]);
                OptionOutcome::Continue
            }
            opt::INFO | opt::GO => {
                let Some(r) = InfoRequest::decode(data) else {
                    return err(out, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
                };
                let Some(x) = self.lookup(&r.name) else {
                    return err(
                        out,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {:?}", r.name),
                    );
                };
                let e = &self.exports[x];
                let s = self.session(x);
                put_option_reply(out, o, rep::INFO, &proto::info_export(e.size, s.tflags));
                // Block sizes are sent whether asked for or not, as the
                // protocol allows: clients that honour them send aligned
                // requests; the others get EINVAL for misaligned ones.
                put_option_reply(out, o, rep::INFO, &proto::info_block_size(e.sizes));
                if r.requests.contains(&info::NAME) {
                    let name = e.names.first().map_or("", String::as_str);
                    put_option_reply(out, o, rep::INFO, &proto::info_string(info::NAME, name));
                }
                if r.requests.contains(&info::DESCRIPTION) && !e.description.is_empty() {
                    put_option_reply(
                        out,
                        o,
                        rep::INFO,
                        &proto::info_string(info::DESCRIPTION, &e.description),
                    );
                }
                if o == opt::GO {
                    OptionOutcome::Go(s)
                } else {
                    put_option_reply(out, o, rep::ACK, &[]);
                    OptionOutcome::Continue
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return err(
                        out,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured = true;
                put_option_reply(out, o, rep::ACK, &[]);
                OptionOutcome::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = o == opt::SET_META_CONTEXT;
                if set && !self.structured {
                    return err(
                        out,
                        rep::ERR_INVALID,
                        "NBD_OPT_SET_META_CONTEXT needs structured replies first",
                    );
                }
                let Some(m) = MetaContextRequest::decode(data) else {
                    return err(out, rep::ERR_INVALID, "malformed meta context data");
                };
                let Some(x) = self.lookup(&m.name) else {
                    return err(
                        out,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {:?}", m.name),
                    );
                };
                let selected = if m.queries.is_empty() {
                    !set
                } else {
                    m.queries
                        .iter()
                        .any(|q| proto::query_selects_base_allocation(q, !set))
                };
                if set {
                    self.meta_export = selected.then_some(x);
                }
                if selected {
                    let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                    d.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    put_option_reply(out, o, rep::META_CONTEXT, &d);
                }
                put_option_reply(out, o, rep::ACK, &[]);
                OptionOutcome::Continue
            }
            opt::STARTTLS => err(out, rep::ERR_UNSUP, "TLS is not supported by this server"),
            _ => err(out, rep::ERR_UNSUP, "option not supported by this server"),
        }
    }
}

/// Appends the final `NBD_REP_ACK` of a successful `NBD_OPT_GO`.
pub fn ack_go(out: &mut Vec<u8>) {
    put_option_reply(out, opt::GO, rep::ACK, &[]);
}

/// Reads exactly `buf.len()` bytes; a clean or early EOF is [`Error::Closed`].
fn read_exact<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io {
            what: "reading the handshake",
            source: e,
        },
    })
}

fn write_all<S: Write>(s: &mut S, b: &[u8]) -> Result<()> {
    s.write_all(b).map_err(|source| Error::Io {
        what: "writing the handshake",
        source,
    })
}

/// Runs the handshake on a blocking stream. `open` is called when the
/// client picks an export (GO or EXPORT_NAME); if it fails for GO the client
/// gets `NBD_REP_ERR_SHUTDOWN` with the reason and may try again. Returns
/// the session and what `open` produced, or `None` if the client ended the
/// negotiation.
pub fn negotiate<S, T, F>(
    s: &mut S,
    exports: &[ExportMeta],
    mut open: F,
) -> Result<Option<(Session, T)>>
where
    S: Read + Write,
    F: FnMut(usize) -> Result<T>,
{
    write_all(s, &proto::greeting())?;
    let mut cf = [0u8; 4];
    read_exact(s, &mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    let Some(mut n) = Negotiation::new(exports, client_flags) else {
        return Err(Error::UnknownClientFlags(client_flags));
    };
    let mut out = Vec::with_capacity(4096);
    let mut data = Vec::new();
    loop {
        let mut hb = [0u8; proto::OPTION_HEADER_LEN];
        read_exact(s, &mut hb)?;
        let h = OptionHeader::decode(&hb).map_err(Error::BadOptionMagic)?;
        out.clear();
        if h.length > MAX_OPTION_DATA {
            if h.length > MAX_SKIPPED_OPTION_DATA || h.option == opt::EXPORT_NAME {
                return Err(Error::OptionTooLong {
                    option: h.option,
                    length: h.length,
                });
            }
            let skipped = std::io::copy(
                &mut Read::by_ref(s).take(u64::from(h.length)),
                &mut std::io::sink(),
            )
            .map_err(|source| Error::Io {
                what: "skipping option data",
                source,
            })?;
            if skipped != u64::from(h.length) {
                return Err(Error::Closed);
            }
            put_option_reply(
                &mut out,
                h.option,
                rep::ERR_TOO_BIG,
                b"option data too long",
            );
            write_all(s, &out)?;
            continue;
        }
        data.resize(h.length as usize, 0);
        read_exact(s, &mut data)?;
        tracing::debug!(option = h.option, len = h.length, "NBD option");
        match n.option(h, &data, &mut out) {
            OptionOutcome::Continue => write_all(s, &out)?,
            OptionOutcome::Close => {
                write_all(s, &out)?;
                return Ok(None);
            }
            OptionOutcome::ExportName(sess) => match open(sess.export) {
                Ok(t) => {
                    write_all(s, &out)?;
                    return Ok(Some((sess, t)));
                }
                Err(e) => return Err(e),
            },
            OptionOutcome::Go(sess) => match open(sess.export) {
                Ok(t) => {
                    ack_go(&mut out);
                    write_all(s, &out)?;
                    return Ok(Some((sess, t)));
                }
                Err(e) => {
                    out.clear();
                    let msg = e.to_string();
                    put_option_reply(&mut out, opt::GO, rep::ERR_SHUTDOWN, msg.as_bytes());
                    write_all(s, &out)?;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{OptionReply, REPLY_MAGIC};

    fn exports() -> Vec<ExportMeta> {
        vec![
            ExportMeta {
                names: vec!["nqn.x/ns1".into(), "disk".into()],
                description: "a disk".into(),
                size: 1 << 20,
                sizes: BlockSizes::for_block_size(512),
                tflags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
            },
            ExportMeta {
                names: vec!["second".into()],
                description: String::new(),
                size: 4096,
                sizes: BlockSizes::for_block_size(4096),
                tflags: tflag::HAS_FLAGS | tflag::READ_ONLY,
            },
        ]
    }

    fn replies(mut b: &[u8]) -> Vec<OptionReply> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let (r, n) = OptionReply::decode(b).expect("well-formed reply");
            v.push(r);
            b = &b[n..];
        }
        v
    }

    fn run(n: &mut Negotiation, option: u32, data: &[u8]) -> (OptionOutcome, Vec<OptionReply>) {
        let mut out = Vec::new();
        let o = n.option(
            OptionHeader {
                option,
                length: data.len() as u32,
            },
            data,
            &mut out,
        );
        let r = match o {
            OptionOutcome::ExportName(_) => Vec::new(),
            _ => replies(&out),
        };
        (o, r)
    }

    #[test]
    fn unknown_client_flags_refuse_the_negotiation() {
        let e = exports();
        assert!(Negotiation::new(&e, 4).is_none());
        assert!(Negotiation::new(&e, 3).is_some());
    }

    #[test]
    fn unknown_options_get_err_unsup_and_negotiation_continues() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        for o in [
            opt::PEEK_EXPORT,
            opt::STARTTLS,
            opt::EXTENDED_HEADERS,
            12345,
        ] {
            let (out, r) = run(&mut n, o, b"junk");
            assert_eq!(out, OptionOutcome::Continue);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].rtype, rep::ERR_UNSUP);
            assert_eq!(r[0].option, o);
        }
    }

    #[test]
    fn list_names_every_export_with_its_description() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        let (_, r) = run(&mut n, opt::LIST, &[]);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].rtype, rep::SERVER);
        assert_eq!(&r[0].data[..4], &9u32.to_be_bytes());
        assert_eq!(&r[0].data[4..], b"nqn.x/ns1a disk");
        assert_eq!(r[2].rtype, rep::ACK);
        let (_, r) = run(&mut n, opt::LIST, b"x");
        assert_eq!(r[0].rtype, rep::ERR_INVALID);
    }

    #[test]
    fn go_with_empty_name_or_alias_picks_the_export_and_sends_info() {
        let e = exports();
        for name in ["", "disk", "nqn.x/ns1"] {
            let mut n = Negotiation::new(&e, 3).unwrap();
            let req = InfoRequest {
                name: name.into(),
                requests: vec![info::NAME, info::DESCRIPTION],
            };
            let (o, r) = run(&mut n, opt::GO, &req.encode());
            let OptionOutcome::Go(s) = o else {
                panic!("{o:?}")
            };
            assert_eq!(s.export, 0);
            assert!(r.iter().all(|r| r.rtype == rep::INFO));
            let types: Vec<u16> = r
                .iter()
                .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
                .collect();
            assert_eq!(
                types,
                vec![
                    info::EXPORT,
                    info::BLOCK_SIZE,
                    info::NAME,
                    info::DESCRIPTION
                ]
            );
            assert_eq!(&r[0].data[2..10], &(1u64 << 20).to_be_bytes());
        }
    }

    #[test]
    fn go_and_info_for_unknown_export_are_err_unknown() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        let req = InfoRequest {
            name: "nope".into(),
            requests: vec![],
        };
        for o in [opt::GO, opt::INFO] {
            let (out, r) = run(&mut n, o, &req.encode());
            assert_eq!(out, OptionOutcome::Continue);
            assert_eq!(r[0].rtype, rep::ERR_UNKNOWN);
        }
        let (_, r) = run(&mut n, opt::GO, b"\0\0");
        assert_eq!(r[0].rtype, rep::ERR_INVALID);
    }

    #[test]
    fn structured_replies_add_df_and_enable_set_meta_context() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        let m = MetaContextRequest {
            name: "".into(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        let (_, r) = run(&mut n, opt::SET_META_CONTEXT, &m.encode());
        assert_eq!(r[0].rtype, rep::ERR_INVALID, "SET before STRUCTURED_REPLY");
        let (_, r) = run(&mut n, opt::STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].rtype, rep::ACK);
        let (_, r) = run(&mut n, opt::SET_META_CONTEXT, &m.encode());
        assert_eq!(r[0].rtype, rep::META_CONTEXT);
        assert_eq!(&r[0].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(r[1].rtype, rep::ACK);
        let req = InfoRequest {
            name: "disk".into(),
            requests: vec![],
        };
        let (o, _) = run(&mut n, opt::GO, &req.encode());
        let OptionOutcome::Go(s) = o else { panic!() };
        assert!(s.structured && s.base_allocation);
        assert_ne!(s.tflags & tflag::SEND_DF, 0);
        // The context was set for export 0; GO to export 1 has none.
        let req = InfoRequest {
            name: "second".into(),
            requests: vec![],
        };
        let (o, _) = run(&mut n, opt::GO, &req.encode());
        let OptionOutcome::Go(s) = o else { panic!() };
        assert!(!s.base_allocation);
    }

    #[test]
    fn list_meta_context_lists_base_allocation_for_base_prefix() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        for q in [vec![], vec!["base:".to_string()]] {
            let m = MetaContextRequest {
                name: "".into(),
                queries: q,
            };
            let (_, r) = run(&mut n, opt::LIST_META_CONTEXT, &m.encode());
            assert_eq!(r[0].rtype, rep::META_CONTEXT);
            assert_eq!(&r[0].data[4..], BASE_ALLOCATION.as_bytes());
        }
        let m = MetaContextRequest {
            name: "".into(),
            queries: vec!["qemu:dirty-bitmap:x".into()],
        };
        let (_, r) = run(&mut n, opt::LIST_META_CONTEXT, &m.encode());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].rtype, rep::ACK);
    }

    #[test]
    fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
        let e = exports();
        for (flags, len) in [(1u32, 134usize), (3, 10)] {
            let mut n = Negotiation::new(&e, flags).unwrap();
            let mut out = Vec::new();
            let o = n.option(
                OptionHeader {
                    option: opt::EXPORT_NAME,
                    length: 6,
                },
                b"second",
                &mut out,
            );
            assert!(matches!(o, OptionOutcome::ExportName(s) if s.export == 1));
            assert_eq!(out.len(), len);
            assert_eq!(&out[..8], &4096u64.to_be_bytes());
        }
        let mut n = Negotiation::new(&e, 3).unwrap();
        let mut out = Vec::new();
        let o = n.option(
            OptionHeader {
                option: opt::EXPORT_NAME,
                length: 4,
            },
            b"nope",
            &mut out,
        );
        assert_eq!(o, OptionOutcome::Close);
    }

    #[test]
    fn abort_is_acked_and_closes() {
        let e = exports();
        let mut n = Negotiation::new(&e, 3).unwrap();
        let (o, r) = run(&mut n, opt::ABORT, &[]);
        assert_eq!(o, OptionOutcome::Close);
        assert_eq!(r[0].rtype, rep::ACK);
        assert_eq!(REPLY_MAGIC, 0x3e889045565a9);
    }
}
