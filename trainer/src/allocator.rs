//! The C allocator's settings for training on the CPU.
//!
//! A training step on flex allocates and frees activations of several megabytes hundreds of
//! times. glibc's allocator serves blocks above its (adaptive) mmap threshold with fresh
//! mappings and returns freed memory at the top of the heap to the system, so each new
//! activation faults in fresh zero pages: with the step's convolutions in `mekd-kernels`, page
//! faults and the kernel's locking around them took more time than batch norm
//! (`BENCHMARKS.md`, session 18). [`keep_freed_memory`] keeps freed blocks for reuse instead,
//! as PyTorch's CPU allocator does by caching.

/// Blocks up to this size come from the heap (and are reused once freed): glibc's largest
/// allowed mmap threshold on 64-bit targets (32 MiB), above every activation of the zoo at
/// batch 256.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Have glibc's allocator keep freed memory for reuse: a fixed mmap threshold of
/// [`MMAP_THRESHOLD`] and no trimming of the heap. The process's resident memory then stays
/// at its peak instead of shrinking between steps. Call it first in `main`, before threads
/// start; elsewhere than on glibc it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes two allocator thresholds (it takes the allocator's lock);
    // a rejected value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
