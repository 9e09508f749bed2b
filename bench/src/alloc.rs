//! A global allocator that counts live heap bytes, so that the memory
//! scenario can report heap growth per aggregate exactly, independent of
//! how the system allocator reuses freed memory (which RSS cannot see).
//! It counts only inside a [`Window`]: two atomic adds per allocation, on
//! counters every thread shares, made the other scenarios measure cache
//! lines moving between cores (a replay allocates on two threads at once).
//! Outside a window an allocation costs one read of a flag that never
//! changes under it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// The system allocator with a live-bytes counter.
pub struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

/// While it lives, the allocator counts. Differences of [`live_bytes`] and
/// [`live_blocks`] taken inside one window are exact: a block freed in the
/// window counts against it wherever it was allocated, as it would if the
/// allocator counted all the time.
pub struct Window(());

impl Window {
    /// Starts counting.
    pub fn open() -> Window {
        COUNTING.store(true, Ordering::SeqCst);
        Window(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}

fn counting() -> bool {
    COUNTING.load(Ordering::Relaxed)
}

/// Heap bytes allocated minus freed while counting (see [`Window`]).
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Heap blocks allocated minus freed while counting (see [`Window`]).
pub fn live_blocks() -> isize {
    BLOCKS.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded to `System` unchanged; only a counter is
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counting() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        if counting() {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
            BLOCKS.fetch_sub(1, Ordering::Relaxed);
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && counting() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counting() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}
