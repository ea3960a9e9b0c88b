//! The handshake state machine from the server's side: any sequence of options, any client flags, under each TLS
//! policy (chosen by the input's length, so seeds keep their meaning); STARTTLS is taken as succeeding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd_server::negotiate::{Catalog, ExportMeta, Negotiation, Step, TlsPolicy};

struct Two;
impl Catalog for Two {
    fn lookup(&self, name: &str) -> Option<ExportMeta> {
        ["", "a", "disk"].contains(&name).then(|| ExportMeta {
            name: if name.is_empty() { "disk".into() } else { name.into() },
            description: "d".into(),
            size: 1 << 20,
            flags: 0x1fff,
            allocation_depth: name != "a",
            bitmaps: if name == "disk" { vec!["b0".into()] } else { Vec::new() },
            block_size: (1, 4096, 32 << 20),
        })
    }
    fn list(&self) -> Vec<ExportMeta> {
        ["a", "disk"].iter().filter_map(|n| self.lookup(n)).collect()
    }
    fn tls_only(&self, name: &str) -> bool {
        name == "a"
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let policy = [TlsPolicy::NoTls, TlsPolicy::Forced, TlsPolicy::Selective][data.len() % 3];
    let Some(n) = Negotiation::new(u32::from_be_bytes([data[0], data[1], data[2], data[3]])) else { return };
    let mut n = n.with_tls(policy);
    let mut rest = &data[4..];
    let mut out = Vec::new();
    while rest.len() >= 6 {
        let opt = u32::from(u16::from_be_bytes([rest[0], rest[1]])) % 16;
        let len = (u16::from_be_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
        let too_long = rest[4] == 0xff;
        let body = &rest[4..4 + len];
        out.clear();
        let step = n.option(opt, body, too_long, &Two, &mut out);
        // Every option reply is well formed: magic, echoed option, length matching its data.
        let mut o = &out[..];
        if !matches!(step, Step::Transmit(_)) || opt != 1 {
            while o.len() >= 20 {
                assert_eq!(&o[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
                let l = u32::from_be_bytes([o[16], o[17], o[18], o[19]]) as usize;
                assert!(o.len() >= 20 + l);
                o = &o[20 + l..];
            }
            assert!(o.is_empty(), "trailing bytes in the option replies");
        }
        match step {
            Step::Continue => {}
            Step::StartTls => {
                assert_ne!(policy, TlsPolicy::NoTls, "STARTTLS accepted without TLS");
                assert!(!n.tls_active(), "STARTTLS accepted twice");
                n.tls_started();
            }
            Step::Transmit(t) => {
                // Nothing enters transmission before TLS where the policy forbids it.
                if !n.tls_active() {
                    assert_ne!(policy, TlsPolicy::Forced);
                    assert!(policy != TlsPolicy::Selective || t.export.name != "a");
                }
                return;
            }
            Step::Close => return,
        }
        rest = &rest[4 + len..];
    }
});
