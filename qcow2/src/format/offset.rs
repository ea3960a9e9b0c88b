//! Offsets that cross module boundaries, each as its own type: a guest offset (into the virtual disk) can
//! not be passed where a host offset (into the image or data file) is meant, nor the other way round.

/// A byte offset into the virtual disk the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset into the file that holds guest data (the image file, or its external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl GuestOffset {
    /// The offset as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `n` bytes further, unless that overflows.
    pub fn checked_add(self, n: u64) -> Option<GuestOffset> {
        self.0.checked_add(n).map(GuestOffset)
    }
}

impl HostOffset {
    /// The offset as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `n` bytes further, unless that overflows.
    pub fn checked_add(self, n: u64) -> Option<HostOffset> {
        self.0.checked_add(n).map(HostOffset)
    }
}
