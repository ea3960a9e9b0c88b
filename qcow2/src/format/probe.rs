//! Format probing from an image's first bytes, as qemu's `bdrv_probe_all` does: every format qemu knows by
//! a magic number is recognised, so that a file qnbd cannot read is refused by name instead of being served as
//! raw, and so that a write that would turn a probed raw image into another format can be refused.

/// Bytes of the file probing looks at (qemu's `BLOCK_PROBE_BUF_SIZE`: the first sector).
pub const PROBE_BYTES: usize = 512;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// qcow2 (`QFI\xfb`, version 2 or 3).
    Qcow2,
    /// Nothing recognised: raw.
    Raw,
    /// A format qemu knows and qnbd does not read: its qemu driver name.
    Other(&'static str),
}

fn starts(b: &[u8], magic: &[u8]) -> bool {
    b.len() >= magic.len() && &b[..magic.len()] == magic
}

/// Probes `first`, the first bytes of a file (fewer than [`PROBE_BYTES`] for a short file).
pub fn detect(first: &[u8]) -> Detected {
    if starts(first, b"QFI\xfb") {
        // qcow.c and qcow2.c tell their versions apart; anything else with this magic is neither.
        return match first.get(4..8).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])) {
            Some(1) => Detected::Other("qcow"),
            _ => Detected::Qcow2,
        };
    }
    let text_magics: [(&[u8], &str); 11] = [
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"LUKS\xba\xbe", "luks"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    ];
    for (m, name) in text_magics {
        if starts(first, m) {
            return Detected::Other(name);
        }
    }
    // vdi.c: the signature is a little-endian word at offset 64.
    if first.get(64..68) == Some(&0xbeda_107f_u32.to_le_bytes()[..]) {
        return Detected::Other("vdi");
    }
    Detected::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        assert_eq!(detect(&q), Detected::Qcow2);
        q[7] = 1;
        assert_eq!(detect(&q), Detected::Other("qcow"));
        assert_eq!(detect(b"KDMV...."), Detected::Other("vmdk"));
        assert_eq!(detect(b"vhdxfile"), Detected::Other("vhdx"));
        let mut v = vec![0u8; 512];
        v[64..68].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(detect(&v), Detected::Other("vdi"));
        assert_eq!(detect(&[0u8; 512]), Detected::Raw);
        assert_eq!(detect(b"QF"), Detected::Raw);
    }
}
