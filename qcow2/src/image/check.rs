//! Consistency check (qemu-img check): placeholder module, filled in below.
