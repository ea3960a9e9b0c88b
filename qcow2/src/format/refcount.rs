//! Refcount block entries of any width from 1 to 64 bits (qcow2.rst, "Reference counts").

/// Reads entry `index` of a refcount block of `order` (width = 2^order bits) from `block`.
/// Returns `None` when the index lies outside the block.
pub fn get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    let bits = 1u64 << order;
    let bit_off = index.checked_mul(bits)?;
    let byte = usize::try_from(bit_off / 8).ok()?;
    if order >= 3 {
        let n = (bits / 8) as usize;
        let s = block.get(byte..byte + n)?;
        Some(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    } else {
        // Sub-byte entries: qemu stores entry 0 in the least significant bits of byte 0.
        let b = *block.get(byte)?;
        let shift = (bit_off % 8) as u32;
        Some(u64::from(b >> shift) & ((1u64 << bits) - 1))
    }
}

/// Number of entries in one refcount block.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> order
}

/// Writes entry `index` of a refcount block of `order`; returns false if the index or value does not fit.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) -> bool {
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return false;
    }
    let Some(bit_off) = index.checked_mul(bits) else {
        return false;
    };
    let Ok(byte) = usize::try_from(bit_off / 8) else {
        return false;
    };
    if order >= 3 {
        let n = (bits / 8) as usize;
        let Some(s) = block.get_mut(byte..byte + n) else {
            return false;
        };
        for (i, b) in s.iter_mut().enumerate() {
            *b = (value >> (8 * (n - 1 - i))) as u8;
        }
    } else {
        let Some(b) = block.get_mut(byte) else {
            return false;
        };
        let shift = (bit_off % 8) as u32;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        *b = (*b & !mask) | ((value as u8) << shift);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        let b = [0x00, 0x05, 0xff, 0xee];
        assert_eq!(get(&b, 4, 0), Some(5));
        assert_eq!(get(&b, 4, 1), Some(0xffee));
        assert_eq!(get(&b, 4, 2), None);
        assert_eq!(get(&[0b1101_0010], 0, 1), Some(1));
        assert_eq!(get(&[0b1101_0010], 0, 0), Some(0));
        assert_eq!(get(&[0b1101_0010], 1, 0), Some(2));
        assert_eq!(get(&[0b1101_0010], 2, 1), Some(0b1101));
    }
}
