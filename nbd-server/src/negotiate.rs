//! The handshake as a state machine over decoded options (proto.md, "Option haggling"). Pure: the connection
//! reads each option, calls [`Negotiation::option`], writes the bytes it produced and acts on the [`Step`].
#![deny(clippy::arithmetic_side_effects)] // every number here comes from a client or the user

use crate::proto::option::{reply, Reader};
use crate::proto::reply::Style;
use crate::proto::*;

/// What the handshake needs to know about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportMeta {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Whether `qemu:allocation-depth` is offered (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Persistent dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (qemu-nbd's `-B NAME`).
    pub bitmaps: Vec<String>,
    /// Block size constraints: minimum, preferred, maximum.
    pub block_size: (u32, u32, u32),
}

/// The exports a server offers.
pub trait Catalog {
    /// The export called `name` ("" names the default export).
    fn lookup(&self, name: &str) -> Option<ExportMeta>;
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportMeta>;
    /// Whether export `name` may only be used over TLS (SELECTIVETLS mode).
    fn tls_only(&self, _name: &str) -> bool {
        false
    }
}

/// The TLS policy of a server (proto.md "TLS support": NOTLS, FORCEDTLS, SELECTIVETLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: NBD_OPT_STARTTLS is refused by policy.
    NoTls,
    /// Every option but STARTTLS and ABORT needs TLS first.
    Forced,
    /// TLS is the client's choice, except on exports the catalog calls TLS-only.
    Selective,
}

/// A metadata context a client can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    BaseAllocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap with this index.
    DirtyBitmap(u16),
}

/// The prefix of `qemu:dirty-bitmap:NAME` (qemu's docs/interop/nbd.rst).
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

impl Context {
    /// The context's ID in this server (stable for the life of the connection).
    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 0,
            Context::AllocationDepth => 1,
            Context::DirtyBitmap(i) => u32::from(i).saturating_add(2),
        }
    }

    /// The context's name on export `e`.
    pub fn name(self, e: &ExportMeta) -> String {
        match self {
            Context::BaseAllocation => BASE_ALLOCATION.to_string(),
            Context::AllocationDepth => QEMU_ALLOCATION_DEPTH.to_string(),
            Context::DirtyBitmap(i) => {
                format!("{QEMU_DIRTY_BITMAP}{}", e.bitmaps.get(usize::from(i)).map_or("", String::as_str))
            }
        }
    }
}

/// The result of the handshake: what the transmission phase serves and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The export.
    pub export: ExportMeta,
    /// Reply style.
    pub style: Style,
    /// Selected metadata contexts.
    pub contexts: Vec<Context>,
}

/// What the connection does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the next option.
    Continue,
    /// Close the connection (after writing what was produced).
    Close,
    /// Enter the transmission phase.
    Transmit(Transmit),
    /// Start the TLS handshake (the ACK was produced); then call [`Negotiation::tls_started`] and go on.
    StartTls,
}

/// Handshake state of one connection.
#[derive(Debug, Clone)]
pub struct Negotiation {
    /// The client set NBD_FLAG_C_NO_ZEROES.
    pub no_zeroes: bool,
    style: Style,
    /// Contexts selected by SET_META_CONTEXT and the export name they were selected for.
    meta: Option<(String, Vec<Context>)>,
    tls: TlsPolicy,
    tls_active: bool,
}

impl Negotiation {
    /// Starts from the client flags; `None` means the flags are unacceptable and the connection must close
    /// (proto.md: a server that does not understand a client flag MUST drop the connection).
    pub fn new(client_flags: u32) -> Option<Negotiation> {
        if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return None;
        }
        Some(Negotiation {
            no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
            style: Style::Simple,
            meta: None,
            tls: TlsPolicy::NoTls,
            tls_active: false,
        })
    }

    /// Applies a TLS policy (before the first option).
    pub fn with_tls(mut self, tls: TlsPolicy) -> Negotiation {
        self.tls = tls;
        self
    }

    /// The TLS handshake succeeded: everything negotiated before it is forgotten (proto.md, NBD_OPT_STARTTLS:
    /// the client and server MUST forget any state from before the TLS upgrade).
    pub fn tls_started(&mut self) {
        self.style = Style::Simple;
        self.meta = None;
        self.tls_active = true;
    }

    /// Whether TLS is running on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether `name` can't be used before TLS under this connection's policy.
    fn needs_tls(&self, name: &str, cat: &dyn Catalog) -> bool {
        !self.tls_active
            && match self.tls {
                TlsPolicy::NoTls => false,
                TlsPolicy::Forced => true,
                TlsPolicy::Selective => cat.tls_only(name),
            }
    }

    /// The reply style negotiated so far.
    pub fn style(&self) -> Style {
        self.style
    }

    fn err(out: &mut Vec<u8>, opt: u32, kind: u32, msg: &str) -> Step {
        reply(out, opt, kind, msg.as_bytes());
        Step::Continue
    }

    /// Handles one option. `data` is its payload; `too_long` says the payload exceeds [`MAX_OPTION_LEN`]
    /// and was discarded (or, past `MAX_OPTION_DRAIN`, not read: the caller then closes the connection).
    pub fn option(&mut self, opt: u32, data: &[u8], too_long: bool, cat: &dyn Catalog, out: &mut Vec<u8>) -> Step {
        if too_long {
            if opt == NBD_OPT_EXPORT_NAME {
                return Step::Close;
            }
            return Self::err(out, opt, NBD_REP_ERR_TOO_BIG, "option too long");
        }
        if self.tls == TlsPolicy::Forced && !self.tls_active {
            match opt {
                NBD_OPT_STARTTLS | NBD_OPT_ABORT => {}
                // EXPORT_NAME has no error reply: the server closes the connection.
                NBD_OPT_EXPORT_NAME => return Step::Close,
                _ => return Self::err(out, opt, NBD_REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS"),
            }
        }
        match opt {
            NBD_OPT_EXPORT_NAME => self.export_name(data, cat, out),
            NBD_OPT_ABORT => {
                reply(out, opt, NBD_REP_ACK, &[]);
                Step::Close
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                for e in cat.list().into_iter().filter(|e| !self.needs_tls(&e.name, cat)) {
                    let mut d = Vec::with_capacity(e.name.len().saturating_add(e.description.len()).saturating_add(4));
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(out, opt, NBD_REP_SERVER, &d);
                }
                reply(out, opt, NBD_REP_ACK, &[]);
                Step::Continue
            }
            NBD_OPT_STARTTLS => {
                if !data.is_empty() {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                }
                if self.tls == TlsPolicy::NoTls {
                    return Self::err(out, opt, NBD_REP_ERR_POLICY, "TLS is not configured on this server");
                }
                if self.tls_active {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "TLS is already active");
                }
                reply(out, opt, NBD_REP_ACK, &[]);
                Step::StartTls
            }
            NBD_OPT_INFO | NBD_OPT_GO => self.info_go(opt, data, cat, out),
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                match self.style {
                    Style::Extended => {
                        return Self::err(out, opt, NBD_REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
                    }
                    Style::Structured => {
                        return Self::err(out, opt, NBD_REP_ERR_INVALID, "structured replies already negotiated")
                    }
                    Style::Simple => {}
                }
                self.style = Style::Structured;
                reply(out, opt, NBD_REP_ACK, &[]);
                Step::Continue
            }
            NBD_OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                }
                if self.style == Style::Extended {
                    return Self::err(out, opt, NBD_REP_ERR_INVALID, "extended headers already negotiated");
                }
                self.style = Style::Extended;
                reply(out, opt, NBD_REP_ACK, &[]);
                Step::Continue
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => self.meta_context(opt, data, cat, out),
            _ => Self::err(out, opt, NBD_REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn export_name(&mut self, data: &[u8], cat: &dyn Catalog, out: &mut Vec<u8>) -> Step {
        if self.style == Style::Extended {
            // proto.md: a client MUST NOT use EXPORT_NAME once extended headers are negotiated.
            return Step::Close;
        }
        let Some(mut e) = std::str::from_utf8(data)
            .ok()
            .filter(|n| n.len() <= MAX_STRING && !self.needs_tls(n, cat))
            .and_then(|n| cat.lookup(n))
        else {
            // EXPORT_NAME has no error reply: the server closes the connection.
            return Step::Close;
        };
        e.flags = self.flags_for(e.flags);
        out.extend_from_slice(&e.size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        let contexts = self.contexts_for(&e.name);
        Step::Transmit(Transmit { export: e, style: self.style, contexts })
    }

    /// Transmission flags as this connection may see them: DF only with structured replies, the block status
    /// payload only with extended headers (proto.md, "Transmission flags").
    fn flags_for(&self, flags: u16) -> u16 {
        let mut f = flags;
        if self.style == Style::Simple {
            f &= !NBD_FLAG_SEND_DF;
        }
        if self.style != Style::Extended {
            f &= !NBD_FLAG_BLOCK_STATUS_PAYLOAD;
        }
        f
    }

    /// Contexts selected for `name`; a selection made for another export does not carry over.
    fn contexts_for(&self, name: &str) -> Vec<Context> {
        match &self.meta {
            Some((n, c)) if n == name => c.clone(),
            _ => Vec::new(),
        }
    }

    fn info_go(&mut self, opt: u32, data: &[u8], cat: &dyn Catalog, out: &mut Vec<u8>) -> Step {
        let mut r = Reader::new(data);
        let Some(name) = r.string() else {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "malformed export name");
        };
        let Some(n) = r.u16() else {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "missing information request count");
        };
        if r.remaining() != usize::from(n).saturating_mul(2) {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "information request list has the wrong length");
        }
        // Whether the client asked for the block size constraints, and so promises to obey them.
        let wants_sizes = (0..n).filter_map(|_| r.u16()).any(|i| i == NBD_INFO_BLOCK_SIZE);
        if self.needs_tls(name, cat) {
            return Self::err(out, opt, NBD_REP_ERR_TLS_REQD, &format!("export '{name}' requires TLS"));
        }
        let Some(mut e) = cat.lookup(name) else {
            return Self::err(out, opt, NBD_REP_ERR_UNKNOWN, &format!("export '{name}' not present"));
        };
        e.flags = self.flags_for(e.flags);
        // NBD_INFO_EXPORT always; NAME, DESCRIPTION and BLOCK_SIZE always too (clients may ignore them).
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
        reply(out, opt, NBD_REP_INFO, &d);
        let mut d = NBD_INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        reply(out, opt, NBD_REP_INFO, &d);
        if !e.description.is_empty() {
            let mut d = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            reply(out, opt, NBD_REP_INFO, &d);
        }
        // proto.md, "Block size constraints": a client that did not ask for the constraints may send any size,
        // so GO reports a minimum of 1 to it (every device here serves unaligned requests, with a
        // read-modify-write where it must), as qemu-nbd does; INFO reports the real minimum, and where that is
        // above 1 it ends with NBD_REP_ERR_BLOCK_SIZE_REQD: the client should ask for the constraints before it
        // uses the export.
        let min = if wants_sizes || opt == NBD_OPT_INFO { e.block_size.0 } else { 1 };
        let mut d = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&min.to_be_bytes());
        d.extend_from_slice(&e.block_size.1.to_be_bytes());
        d.extend_from_slice(&e.block_size.2.to_be_bytes());
        reply(out, opt, NBD_REP_INFO, &d);
        if opt == NBD_OPT_INFO && !wants_sizes && min > 1 {
            return Self::err(
                out,
                opt,
                NBD_REP_ERR_BLOCK_SIZE_REQD,
                &format!("export '{}' has a minimum block size of {min}: request NBD_INFO_BLOCK_SIZE", e.name),
            );
        }
        reply(out, opt, NBD_REP_ACK, &[]);
        if opt == NBD_OPT_INFO {
            return Step::Continue;
        }
        let contexts =
            self.contexts_for(&e.name).into_iter().chain(self.contexts_for(name)).fold(Vec::new(), |mut v, c| {
                if !v.contains(&c) {
                    v.push(c);
                }
                v
            });
        Step::Transmit(Transmit { export: e, style: self.style, contexts })
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], cat: &dyn Catalog, out: &mut Vec<u8>) -> Step {
        // A TLS-only export's contexts are not told before TLS (proto.md: NBD_REP_ERR_TLS_REQD).
        if let Some(name) = Reader::new(data).string() {
            if self.needs_tls(name, cat) {
                return Self::err(out, opt, NBD_REP_ERR_TLS_REQD, &format!("export '{name}' requires TLS"));
            }
        }
        let set = opt == NBD_OPT_SET_META_CONTEXT;
        if set && self.style == Style::Simple {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
        }
        let mut r = Reader::new(data);
        let Some(name) = r.string() else {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "malformed export name");
        };
        let Some(nq) = r.u32() else {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "missing query count");
        };
        let mut queries = Vec::new();
        for _ in 0..nq {
            match r.string() {
                Some(q) => queries.push(q),
                None => return Self::err(out, opt, NBD_REP_ERR_INVALID, "malformed query"),
            }
        }
        if r.remaining() != 0 {
            return Self::err(out, opt, NBD_REP_ERR_INVALID, "trailing bytes after the queries");
        }
        let Some(e) = cat.lookup(name) else {
            return Self::err(out, opt, NBD_REP_ERR_UNKNOWN, &format!("export '{name}' not present"));
        };
        let mut offered = vec![Context::BaseAllocation];
        if e.allocation_depth {
            offered.push(Context::AllocationDepth);
        }
        offered.extend((0..e.bitmaps.len().min(usize::from(u16::MAX))).map(|i| Context::DirtyBitmap(i as u16)));
        let mut chosen: Vec<Context> = Vec::new();
        let add = |c: Context, chosen: &mut Vec<Context>| {
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        };
        if queries.is_empty() && !set {
            for &c in &offered {
                add(c, &mut chosen);
            }
        }
        for q in &queries {
            for &c in &offered {
                let name = c.name(&e);
                let ns = name.split(':').next().unwrap_or("");
                // LIST accepts a bare namespace ("base:", "qemu:") as "every context in it", and qemu's
                // "qemu:dirty-bitmap:" as every bitmap.
                let leaf = matches!(c, Context::DirtyBitmap(_)) && *q == QEMU_DIRTY_BITMAP;
                let matches = q == &name || (!set && (*q == format!("{ns}:") || leaf));
                if matches {
                    add(c, &mut chosen);
                }
            }
        }
        for c in &chosen {
            // In LIST replies the ID is reserved and SHOULD be zero.
            let id = if set { c.id() } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(c.name(&e).as_bytes());
            reply(out, opt, NBD_REP_META_CONTEXT, &d);
        }
        if set {
            self.meta = Some((name.to_string(), chosen));
        }
        reply(out, opt, NBD_REP_ACK, &[]);
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl Catalog for One {
        fn lookup(&self, name: &str) -> Option<ExportMeta> {
            (name.is_empty() || name == "disk").then(|| ExportMeta {
                name: "disk".into(),
                description: String::new(),
                size: 1 << 20,
                flags: NBD_FLAG_HAS_FLAGS,
                allocation_depth: true,
                bitmaps: vec!["b0".into()],
                block_size: (1, 4096, 32 << 20),
            })
        }
        fn list(&self) -> Vec<ExportMeta> {
            self.lookup("").into_iter().collect()
        }
    }

    fn meta_query(name: &str, qs: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(qs.len() as u32).to_be_bytes());
        for q in qs {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    struct Two;
    impl Catalog for Two {
        fn lookup(&self, name: &str) -> Option<ExportMeta> {
            One.lookup("").map(|mut e| {
                e.name = if name.is_empty() { "disk".into() } else { name.into() };
                e
            })
        }
        fn list(&self) -> Vec<ExportMeta> {
            ["disk", "secret"].iter().filter_map(|n| self.lookup(n)).collect()
        }
        fn tls_only(&self, name: &str) -> bool {
            name == "secret"
        }
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    fn reply_kind(out: &[u8]) -> u32 {
        u32::from_be_bytes(out[12..16].try_into().unwrap())
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let mut n = Negotiation::new(1).unwrap().with_tls(TlsPolicy::Forced);
        for opt in [NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, 99] {
            let mut out = Vec::new();
            let data = if opt == NBD_OPT_GO || opt == NBD_OPT_INFO { go("") } else { Vec::new() };
            assert_eq!(n.option(opt, &data, false, &One, &mut out), Step::Continue);
            assert_eq!(reply_kind(&out), NBD_REP_ERR_TLS_REQD, "option {opt}");
        }
        let mut out = Vec::new();
        assert_eq!(n.option(NBD_OPT_EXPORT_NAME, b"", false, &One, &mut out), Step::Close);
        assert!(out.is_empty());
        let mut n = Negotiation::new(1).unwrap().with_tls(TlsPolicy::Forced);
        let mut out = Vec::new();
        assert_eq!(n.option(NBD_OPT_STARTTLS, b"x", false, &One, &mut out), Step::Continue);
        assert_eq!(reply_kind(&out), NBD_REP_ERR_INVALID);
        out.clear();
        assert_eq!(n.option(NBD_OPT_STARTTLS, b"", false, &One, &mut out), Step::StartTls);
        assert_eq!(reply_kind(&out), NBD_REP_ACK);
        n.tls_started();
        out.clear();
        assert_eq!(n.option(NBD_OPT_STARTTLS, b"", false, &One, &mut out), Step::Continue);
        assert_eq!(reply_kind(&out), NBD_REP_ERR_INVALID, "STARTTLS twice");
        out.clear();
        assert!(matches!(n.option(NBD_OPT_GO, &go(""), false, &One, &mut out), Step::Transmit(_)));
    }

    #[test]
    fn starttls_forgets_structured_replies_and_contexts() {
        let mut n = Negotiation::new(1).unwrap().with_tls(TlsPolicy::Selective);
        let mut out = Vec::new();
        n.option(NBD_OPT_STRUCTURED_REPLY, b"", false, &One, &mut out);
        n.option(NBD_OPT_SET_META_CONTEXT, &meta_query("disk", &["base:allocation"]), false, &One, &mut out);
        assert_eq!(n.style(), Style::Structured);
        assert_eq!(n.option(NBD_OPT_STARTTLS, b"", false, &One, &mut out), Step::StartTls);
        n.tls_started();
        assert_eq!(n.style(), Style::Simple);
        out.clear();
        let Step::Transmit(t) = n.option(NBD_OPT_GO, &go("disk"), false, &One, &mut out) else { panic!("no GO") };
        assert!(t.contexts.is_empty());
        assert_eq!(t.style, Style::Simple);
    }

    #[test]
    fn selective_tls_guards_only_tls_only_exports() {
        let mut n = Negotiation::new(1).unwrap().with_tls(TlsPolicy::Selective);
        let mut out = Vec::new();
        n.option(NBD_OPT_LIST, b"", false, &Two, &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("disk") && !text.contains("secret"), "TLS-only exports are not listed before TLS");
        out.clear();
        assert_eq!(n.option(NBD_OPT_GO, &go("secret"), false, &Two, &mut out), Step::Continue);
        assert_eq!(reply_kind(&out), NBD_REP_ERR_TLS_REQD);
        out.clear();
        assert_eq!(n.option(NBD_OPT_EXPORT_NAME, b"secret", false, &Two, &mut out), Step::Close);
        out.clear();
        assert!(matches!(n.option(NBD_OPT_GO, &go("disk"), false, &Two, &mut out), Step::Transmit(_)));
        let mut n = Negotiation::new(1).unwrap().with_tls(TlsPolicy::Selective);
        n.tls_started();
        out.clear();
        assert!(matches!(n.option(NBD_OPT_GO, &go("secret"), false, &Two, &mut out), Step::Transmit(_)));
    }

    #[test]
    fn unknown_client_flags_close() {
        assert!(Negotiation::new(4).is_none());
        assert!(Negotiation::new(3).is_some());
    }

    #[test]
    fn unknown_option_is_unsupported_and_continues() {
        let mut n = Negotiation::new(1).unwrap();
        let mut out = Vec::new();
        assert_eq!(n.option(99, b"xyz", false, &One, &mut out), Step::Continue);
        assert_eq!(&out[12..16], &NBD_REP_ERR_UNSUP.to_be_bytes());
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut n = Negotiation::new(1).unwrap();
        let mut out = Vec::new();
        n.option(NBD_OPT_SET_META_CONTEXT, &meta_query("disk", &[BASE_ALLOCATION]), false, &One, &mut out);
        assert_eq!(&out[12..16], &NBD_REP_ERR_INVALID.to_be_bytes());
    }

    /// The option replies in `out`: (reply type, data).
    fn replies(out: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = out;
        while let (Some(h), Some(body)) = (rest.get(..20), rest.get(20..)) {
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let data = body.get(..len).expect("a reply ends past the bytes written");
            v.push((kind, data.to_vec()));
            rest = &body[len..];
        }
        assert!(rest.is_empty(), "bytes after the last reply");
        v
    }

    /// An export whose minimum block size is 512 (a probed raw image, or O_DIRECT).
    struct Sectors;
    impl Catalog for Sectors {
        fn lookup(&self, name: &str) -> Option<ExportMeta> {
            One.lookup(name).map(|e| ExportMeta { block_size: (512, 4096, 32 << 20), ..e })
        }
        fn list(&self) -> Vec<ExportMeta> {
            self.lookup("").into_iter().collect()
        }
    }

    #[test]
    fn block_size_constraints_as_asked_for() {
        let with = |asked: &[u16]| {
            let mut d = go("");
            d.truncate(d.len() - 2);
            d.extend_from_slice(&(asked.len() as u16).to_be_bytes());
            asked.iter().for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
            d
        };
        let min_of = |out: &[u8]| {
            let r = replies(out);
            let bs = r.iter().find(|(k, d)| *k == NBD_REP_INFO && d[..2] == NBD_INFO_BLOCK_SIZE.to_be_bytes());
            u32::from_be_bytes(bs.expect("NBD_INFO_BLOCK_SIZE").1[2..6].try_into().unwrap())
        };
        let last = |out: &[u8]| replies(out).last().unwrap().0;
        let mut n = Negotiation::new(1).unwrap();
        // INFO without asking: the real minimum, then NBD_REP_ERR_BLOCK_SIZE_REQD (as qemu-nbd answers).
        let mut out = Vec::new();
        assert_eq!(n.option(NBD_OPT_INFO, &with(&[]), false, &Sectors, &mut out), Step::Continue);
        assert_eq!((min_of(&out), last(&out)), (512, NBD_REP_ERR_BLOCK_SIZE_REQD));
        // INFO asking (with other requests around it): the real minimum and ACK.
        out.clear();
        let asked = with(&[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE, 77]);
        assert_eq!(n.option(NBD_OPT_INFO, &asked, false, &Sectors, &mut out), Step::Continue);
        assert_eq!((min_of(&out), last(&out)), (512, NBD_REP_ACK));
        // INFO without asking, on an export with no constraint beyond the default: ACK.
        out.clear();
        assert_eq!(n.option(NBD_OPT_INFO, &with(&[NBD_INFO_NAME]), false, &One, &mut out), Step::Continue);
        assert_eq!((min_of(&out), last(&out)), (1, NBD_REP_ACK));
        // GO without asking: a minimum of 1, since such a client may send any size; asking: the real one.
        out.clear();
        assert!(matches!(n.option(NBD_OPT_GO, &with(&[]), false, &Sectors, &mut out), Step::Transmit(_)));
        assert_eq!((min_of(&out), last(&out)), (1, NBD_REP_ACK));
        let mut n = Negotiation::new(1).unwrap();
        out.clear();
        let asked = with(&[NBD_INFO_BLOCK_SIZE]);
        assert!(matches!(n.option(NBD_OPT_GO, &asked, false, &Sectors, &mut out), Step::Transmit(_)));
        assert_eq!((min_of(&out), last(&out)), (512, NBD_REP_ACK));
    }

    #[test]
    fn go_carries_contexts_selected_for_the_same_export() {
        let mut n = Negotiation::new(1).unwrap();
        let mut out = Vec::new();
        n.option(NBD_OPT_STRUCTURED_REPLY, &[], false, &One, &mut out);
        n.option(NBD_OPT_SET_META_CONTEXT, &meta_query("disk", &[BASE_ALLOCATION, "x:y"]), false, &One, &mut out);
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        match n.option(NBD_OPT_GO, &go, false, &One, &mut out) {
            Step::Transmit(t) => assert_eq!(t.contexts, vec![Context::BaseAllocation]),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn list_meta_context_with_namespace_query() {
        let mut n = Negotiation::new(1).unwrap();
        let mut out = Vec::new();
        n.option(NBD_OPT_LIST_META_CONTEXT, &meta_query("disk", &["qemu:"]), false, &One, &mut out);
        assert_eq!(&out[12..16], &NBD_REP_META_CONTEXT.to_be_bytes());
        let dl = QEMU_ALLOCATION_DEPTH.len();
        assert_eq!(&out[24..24 + dl], QEMU_ALLOCATION_DEPTH.as_bytes());
        // Then the export's bitmap, the ACK, and nothing from the base: namespace.
        let b = "qemu:dirty-bitmap:b0";
        let at = 24 + dl;
        assert_eq!(&out[at + 12..at + 16], &NBD_REP_META_CONTEXT.to_be_bytes());
        assert_eq!(&out[at + 24..at + 24 + b.len()], b.as_bytes());
        let at = at + 24 + b.len();
        assert_eq!(&out[at + 12..at + 16], &NBD_REP_ACK.to_be_bytes());
        assert_eq!(out.len(), at + 20);
        // "qemu:dirty-bitmap:" lists the bitmaps only; SET takes a bitmap by its full name.
        out.clear();
        n.option(NBD_OPT_LIST_META_CONTEXT, &meta_query("disk", &[QEMU_DIRTY_BITMAP]), false, &One, &mut out);
        assert_eq!(&out[24..24 + b.len()], b.as_bytes());
        assert_eq!(out.len(), 24 + b.len() + 20);
    }

    #[test]
    fn go_with_unknown_export_and_bad_lengths() {
        let mut n = Negotiation::new(1).unwrap();
        let mut out = Vec::new();
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nop");
        go.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(n.option(NBD_OPT_GO, &go, false, &One, &mut out), Step::Continue);
        assert_eq!(&out[12..16], &NBD_REP_ERR_UNKNOWN.to_be_bytes());
        out.clear();
        assert_eq!(n.option(NBD_OPT_GO, &[0, 0, 0, 9], false, &One, &mut out), Step::Continue);
        assert_eq!(&out[12..16], &NBD_REP_ERR_INVALID.to_be_bytes());
    }
}
