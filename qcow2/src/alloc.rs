//! The binaries' allocator ([`IoAlloc`]): the system's, except where large blocks start.
//!
//! **Why.** The kernel copies file data to and from a process (`pread`, `pwrite`, `/dev/fuse`) with `rep movsb`.
//! On AMD processors with fast short `rep movsb` (FSRM; the EPYC machines qnbd is measured on) that copy runs at
//! a fifth to a third of its speed when the destination is 1 to 31 bytes past the source modulo 4096. Measured
//! here with `pread` of 1 MiB from the page cache: 11.6 GiB/s into a page-aligned buffer, 2.1 GiB/s 16 bytes
//! past one; `pwrite` of 64 KiB from 16 bytes before a page boundary (the page cache's destination then lies 16
//! bytes ahead): 1.4 against 5.0 GiB/s. glibc hands out every block it maps on its own (from 128 KiB up) 16
//! bytes past a page boundary: exactly the slow case for a read into its start from a sector-aligned file
//! offset. qimg convert read most of its input that way.
//!
//! **What.** A block of [`MID`] bytes or more (128 KiB, where glibc starts mapping blocks on their own; smaller
//! ones lie wherever its heap has room, in the slow range one time in 256) starts [`LEAD`] (64) bytes past a
//! page boundary. File positions
//! are multiples of 512 in practice, so data at the block's start, or after a header of up to a few hundred
//! bytes (an NBD reply's 16 or 28, a FUSE write request's 80), is never 1-31 bytes ahead of or behind its file
//! position, in either direction. Blocks of [`HUGE_FROM`] bytes or more (the FUSE threads' 16 MiB request
//! buffers, the largest NBD payloads) are mapped on their own, on a 2 MiB boundary, and advised for
//! transparent huge pages: the kernel pins a FUSE reader's buffer page by page for every request, and a huge
//! page ends that walk a level up. Those mappings come zeroed and are faulted in only where touched.
//!
//! Blocks that ask for more than 64-byte alignment (`O_DIRECT` buffers ask for 4096) keep the system's
//! placement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// Blocks of this many bytes or more start [`LEAD`] bytes past a page boundary (smaller: 64 KiB L2 tables cost
/// a sixth more memory in 50 exports' caches that way).
pub const MID: usize = 128 << 10;
/// Blocks of this many bytes or more get a mapping of their own, with transparent huge pages.
pub const HUGE_FROM: usize = 8 << 20;
/// Where a large block starts after its page (or huge page) boundary.
pub const LEAD: usize = 64;
const PAGE: usize = 4096;
/// The huge page size on x86_64 and aarch64 with 4 KiB base pages (on others the advice is ignored).
const HUGE: usize = 2 << 20;

/// The allocator; see the module's documentation. Use with `#[global_allocator]`.
pub struct IoAlloc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    System,
    Mid,
    Huge,
}

fn class(layout: &Layout) -> Class {
    if layout.align() > LEAD || layout.size() < MID {
        Class::System
    } else if layout.size() < HUGE_FROM {
        Class::Mid
    } else {
        Class::Huge
    }
}

/// The system allocator's layout for a mid-sized block of `size` bytes: one page-aligned block of `LEAD` more.
fn mid_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(LEAD)?, PAGE).ok()
}

/// The length of the mapping that holds a huge-class block of `size` bytes (from its 2 MiB boundary).
fn huge_len(size: usize) -> Option<usize> {
    size.checked_add(LEAD)?.checked_next_multiple_of(HUGE)
}

/// A fresh zeroed mapping for a block of `size` bytes; the block's address (`LEAD` past a 2 MiB boundary), or
/// null.
fn map_huge(size: usize) -> *mut u8 {
    let Some(len) = huge_len(size) else { return ptr::null_mut() };
    let Some(over) = len.checked_add(HUGE) else { return ptr::null_mut() };
    // SAFETY: a new private anonymous mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(HUGE);
    let head = aligned - start;
    let tail = over - head - len;
    // SAFETY: the two ranges unmapped lie in the mapping just made, outside the `len` bytes kept; the advice
    // concerns only those bytes.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice: where transparent huge pages are off, the block is an ordinary mapping. A refusal (EINVAL
        // without THP) must not show in `errno`, which the allocator's callers may still be about to read.
        let errno = *libc::__errno_location();
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        *libc::__errno_location() = errno;
    }
    (aligned + LEAD) as *mut u8
}

// SAFETY: every block is at least `layout.size()` bytes at an address aligned to `layout.align()` (the large
// classes only take alignments up to `LEAD`, and their blocks start `LEAD` past a page boundary). The class is
// a function of the layout alone, so `dealloc` and `realloc` (which get the layout the block was made with)
// undo what `alloc` did: a mid block is the system's page-aligned block of `LEAD` more bytes, a huge block a
// whole mapping of `huge_len` bytes.
unsafe impl GlobalAlloc for IoAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class(&layout) {
            Class::System => unsafe { System.alloc(layout) },
            Class::Mid => match mid_layout(layout.size()) {
                Some(l) => {
                    let p = unsafe { System.alloc(l) };
                    if p.is_null() {
                        p
                    } else {
                        unsafe { p.add(LEAD) }
                    }
                }
                None => ptr::null_mut(),
            },
            Class::Huge => map_huge(layout.size()),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class(&layout) {
            Class::System => unsafe { System.alloc_zeroed(layout) },
            Class::Mid => {
                let p = unsafe { self.alloc(layout) };
                if !p.is_null() {
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // Fresh anonymous memory reads as zeros.
            Class::Huge => map_huge(layout.size()),
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class(&layout) {
            Class::System => unsafe { System.dealloc(p, layout) },
            Class::Mid => {
                if let Some(l) = mid_layout(layout.size()) {
                    unsafe { System.dealloc(p.sub(LEAD), l) }
                }
            }
            Class::Huge => {
                if let Some(len) = huge_len(layout.size()) {
                    let r = unsafe { libc::munmap(p.sub(LEAD) as *mut libc::c_void, len) };
                    debug_assert_eq!(r, 0, "munmap of a block this allocator mapped");
                }
            }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else { return ptr::null_mut() };
        let (from, to) = (class(&layout), class(&new));
        if from == Class::System && to == Class::System {
            return unsafe { System.realloc(p, layout, new_size) };
        }
        if from == Class::Huge && to == Class::Huge && huge_len(layout.size()) == huge_len(new_size) {
            // The mapping already holds the new size.
            return p;
        }
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks are live and distinct; the copy stays inside the smaller.
            unsafe {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, checks placement and contents, grows and shrinks across the classes, frees.
    #[test]
    fn large_blocks_start_past_a_page_boundary_and_survive_growth() {
        let a = IoAlloc;
        for (size, align) in
            [(100, 8), (MID - 1, 16), (MID, 1), (MID + 5, 64), (1 << 20, 8), (HUGE_FROM, 16), (3 * HUGE_FROM + 7, 8)]
        {
            let l = Layout::from_size_align(size, align).unwrap();
            unsafe {
                let p = a.alloc_zeroed(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0);
                if size >= MID {
                    assert_eq!(p as usize % PAGE, LEAD, "size {size}");
                }
                if size >= HUGE_FROM {
                    assert_eq!(p as usize % HUGE, LEAD);
                }
                let s = std::slice::from_raw_parts_mut(p, size);
                assert!(s.iter().all(|&b| b == 0));
                s.fill(0xa5);
                // Through every class and back, the bytes kept stay.
                let mut cur = (p, l);
                for to in [size * 2 + 1, MID + 1, HUGE_FROM + 1, HUGE_FROM + 2, 10, size] {
                    let q = a.realloc(cur.0, cur.1, to);
                    assert!(!q.is_null());
                    let kept = cur.1.size().min(to);
                    assert!(std::slice::from_raw_parts(q, kept).iter().all(|&b| b == 0xa5), "{size} -> {to}");
                    if to >= MID {
                        assert_eq!(q as usize % PAGE, LEAD);
                    }
                    if to >= HUGE_FROM {
                        assert_eq!(q as usize % HUGE, LEAD);
                    }
                    std::slice::from_raw_parts_mut(q, to).fill(0xa5);
                    cur = (q, Layout::from_size_align(to, align).unwrap());
                }
                a.dealloc(cur.0, cur.1);
            }
        }
        // O_DIRECT buffers keep their page alignment.
        let l = Layout::from_size_align(1 << 20, 4096).unwrap();
        unsafe {
            let p = a.alloc(l);
            assert_eq!(p as usize % 4096, 0);
            a.dealloc(p, l);
        }
    }
}
