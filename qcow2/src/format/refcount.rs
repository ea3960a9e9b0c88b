//! Refcount block entries of any width from 1 to 64 bits (qcow2.rst, "Reference counts").

/// Reads entry `index` of a refcount block of `order` (width = 2^order bits) from `block`.
/// Returns `None` when the index lies outside the block.
pub fn get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    let bits = 1u64.checked_shl(order).filter(|&b| b <= 64)?;
    let bit_off = index.checked_mul(bits)?;
    let byte = usize::try_from(bit_off / 8).ok()?;
    if order >= 3 {
        let n = usize::try_from(bits / 8).ok()?;
        let s = block.get(byte..byte.checked_add(n)?)?;
        Some(s.iter().fold(0u64, |acc, &b| acc.wrapping_shl(8) | u64::from(b)))
    } else {
        // Sub-byte entries: qemu stores entry 0 in the least significant bits of byte 0 (bits < 8 here).
        let b = *block.get(byte)?;
        let shift = (bit_off % 8) as u32;
        let mask = 1u64.checked_shl(bits as u32)?.wrapping_sub(1);
        Some(u64::from(b.checked_shr(shift)?) & mask)
    }
}

/// Number of entries in one refcount block.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    // cluster_bits <= 21 and order <= 6 once a header has been accepted; anything else gives 0 entries.
    cluster_bits.checked_add(3).and_then(|b| 1u64.checked_shl(b)).and_then(|n| n.checked_shr(order)).unwrap_or(0)
}

/// Writes entry `index` of a refcount block of `order`; returns false if the index or value does not fit.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) -> bool {
    let Some(bits) = 1u64.checked_shl(order).filter(|&b| b <= 64) else {
        return false;
    };
    if bits < 64 && value.checked_shr(bits as u32).unwrap_or(0) != 0 {
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
        let Some(s) = byte.checked_add(n).and_then(|end| block.get_mut(byte..end)) else {
            return false;
        };
        // Big-endian: the last byte holds the lowest 8 bits.
        let mut v = value;
        for b in s.iter_mut().rev() {
            *b = v as u8;
            v = v.checked_shr(8).unwrap_or(0);
        }
    } else {
        let Some(b) = block.get_mut(byte) else {
            return false;
        };
        let shift = (bit_off % 8) as u32;
        // bits < 8 and shift + bits <= 8 here: the entry lies inside the byte.
        let low = 1u16.checked_shl(bits as u32).map_or(0xff, |m| m.wrapping_sub(1)) as u8;
        let mask = low.checked_shl(shift).unwrap_or(0);
        *b = (*b & !mask) | (value as u8 & low).checked_shl(shift).unwrap_or(0);
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
