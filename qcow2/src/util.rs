//! Small helpers shared by the library, qimg and the server.

/// Whether every byte of `b` is zero (sixteen bytes at a time; the compiler vectorises this).
pub fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(16);
    let rest = chunks.remainder();
    chunks.fold(0u128, |acc, c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        acc | u128::from_ne_bytes(w)
    }) == 0
        && rest.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_and_not() {
        assert!(super::is_zero(&[0; 33]));
        let mut b = [0u8; 33];
        b[32] = 1;
        assert!(!super::is_zero(&b));
        b[32] = 0;
        b[3] = 1;
        assert!(!super::is_zero(&b));
        assert!(super::is_zero(&[]));
    }
}
