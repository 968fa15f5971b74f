//! Allocator policy for the hot loops. The binary allocates through mimalloc (see `lib.rs`); by
//! default it hands freed pages back to the kernel after 10 ms, which is right for a gateway at
//! rest but wrong inside a training step, where the same gigabytes of activations are freed and
//! allocated again every few milliseconds and each fresh page is faulted in and zeroed by the
//! kernel (measured: 12% of a SmolLM2 LoRA step in `clear_page`).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

/// mimalloc's `mi_option_purge_delay` (stable index in mimalloc 2 and 3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const DEFAULT_PURGE_DELAY_MS: std::os::raw::c_long = 10;

static HOLDERS: AtomicUsize = AtomicUsize::new(0);

/// While alive, freed memory stays with the process for reuse. When the last one drops, the
/// default delay returns and retained pages are released.
pub struct RetainFreedMemory(());

impl RetainFreedMemory {
    pub fn new() -> Self {
        if HOLDERS.fetch_add(1, Ordering::SeqCst) == 0 {
            // SAFETY: mi_option_set only stores an integer option; mimalloc reads options with
            // atomic loads, so setting one while other threads allocate is supported.
            unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
        }
        Self(())
    }
}

impl Default for RetainFreedMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RetainFreedMemory {
    fn drop(&mut self) {
        if HOLDERS.fetch_sub(1, Ordering::SeqCst) == 1 {
            // SAFETY: as in `new`; mi_collect(true) frees this thread's retained pages and is
            // safe to call at any time.
            unsafe {
                libmimalloc_sys::mi_option_set(PURGE_DELAY, DEFAULT_PURGE_DELAY_MS);
                libmimalloc_sys::mi_collect(true);
            }
        }
    }
}
