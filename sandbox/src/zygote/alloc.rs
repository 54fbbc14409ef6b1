//! The zygote's own allocations, kept out of the heap its sandboxes share.
//!
//! Between forks the zygote's control loop allocates (message buffers, JSON, a directory
//! read to count its threads). With the system allocator those land in free chunks all
//! over the interpreter's C heap, and glibc's bookkeeping (`malloc_consolidate`) writes to
//! chunks across it: every such page is shared with live sandboxes, so each write is a
//! copy-on-write fault in the zygote and, worse, splits the huge page around it back into
//! 4 KiB mappings that every later fork copies again ([`super::huge`]). Measured with
//! R and no packages: 47 MiB of the heap in huge pages after the first forks, 20–30 MiB
//! after a hundred, every split coming from `_int_malloc` and `malloc_consolidate`.
//!
//! [`LoopAlloc`] is the zygote binary's global allocator. It is the system allocator,
//! except on the zygote's main thread once [`enter_loop`] was called: there it serves
//! allocations from an arena of its own, a private anonymous mapping made for it (and
//! never collapsed into huge pages), by bumping a pointer; when nothing allocated from
//! the arena is still alive, the next allocation starts again at its beginning, so the
//! loop keeps writing the same few pages. A forked sandbox keeps allocating from (its copy
//! of) the arena while it sets itself up, for the same reason (its writes then land on a
//! few contiguous pages of its own instead of free chunks across the shared heap), and
//! calls [`leave_loop`] before it reports ready: user code allocates from the system
//! allocator; freeing what came from the arena only counts down. An allocation that does
//! not fit what is left of the arena goes to the system allocator, so the arena can run
//! out without anything failing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space reserved for the arena (pages are used only as they are touched).
const ARENA_BYTES: usize = 16 << 20;

static BASE: AtomicUsize = AtomicUsize::new(0);
/// Offset of the next free byte in the arena.
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Arena allocations not freed yet.
static LIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread is the zygote's control loop.
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// From now on, the calling thread's allocations come from the arena (made here, once).
/// Without `LoopAlloc` as the global allocator this changes nothing.
pub fn enter_loop() {
    if BASE.load(Ordering::Relaxed) == 0 {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return;
        }
        // SAFETY: advice on the mapping just made; a failure leaves it as it is.
        unsafe { libc::madvise(p, ARENA_BYTES, libc::MADV_NOHUGEPAGE) };
        BASE.store(p as usize, Ordering::Relaxed);
    }
    IN_LOOP.with(|l| l.set(true));
}

/// The calling thread allocates from the system allocator again (a forked sandbox, once
/// it is set up, before any user code).
pub fn leave_loop() {
    IN_LOOP.with(|l| l.set(false));
}

/// The zygote binary's global allocator (see the module docs).
pub struct LoopAlloc;

fn in_arena(ptr: *mut u8) -> bool {
    let base = BASE.load(Ordering::Relaxed);
    let p = ptr as usize;
    base != 0 && p >= base && p < base + ARENA_BYTES
}

// SAFETY: every block handed out is either the system allocator's or a disjoint range of
// the arena (the bump offset only moves past what it hands out, and goes back to the
// start only when no arena block is alive); blocks are freed by their own allocator.
unsafe impl GlobalAlloc for LoopAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = BASE.load(Ordering::Relaxed);
        // try_with: during thread teardown the flag may be gone; the system allocator
        // serves then.
        if base != 0 && IN_LOOP.try_with(Cell::get).unwrap_or(false) {
            // Only this thread allocates from the arena, so nobody moves NEXT meanwhile;
            // LIVE may drop (a free on another thread), never rise.
            if LIVE.load(Ordering::Acquire) == 0 {
                NEXT.store(0, Ordering::Relaxed);
            }
            let next = NEXT.load(Ordering::Relaxed);
            let start = (base + next).next_multiple_of(layout.align()) - base;
            if let Some(end) = start.checked_add(layout.size()) {
                if end <= ARENA_BYTES {
                    NEXT.store(end, Ordering::Relaxed);
                    LIVE.fetch_add(1, Ordering::AcqRel);
                    return (base + start) as *mut u8;
                }
            }
        }
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            LIVE.fetch_sub(1, Ordering::AcqRel);
        } else {
            // SAFETY: not the arena's, so the system allocator's, with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_arena(ptr) && !IN_LOOP.try_with(Cell::get).unwrap_or(false) {
            // SAFETY: the system allocator's block, outside the loop: its own realloc.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: a valid layout (same alignment, non-zero size, as the caller promises).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for alloc and dealloc above; the old block is valid for
        // min(old, new) bytes and does not overlap the new one.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_reuses_the_arena_and_everything_else_is_the_systems() {
        let a = LoopAlloc;
        let small = Layout::from_size_align(100, 8).unwrap();
        let wide = Layout::from_size_align(64, 64).unwrap();
        // SAFETY: blocks allocated here, used within their size, freed with their layout.
        unsafe {
            let outside = a.alloc(small);
            assert!(!in_arena(outside));
            enter_loop();
            let x = a.alloc(small);
            let y = a.alloc(wide);
            assert!(in_arena(x) && in_arena(y));
            assert_eq!(y as usize % 64, 0);
            assert!(y as usize >= x as usize + 100, "blocks overlap");
            x.write_bytes(1, 100);
            let x2 = a.realloc(x, small, 5000);
            assert!(in_arena(x2));
            assert_eq!(*x2.add(99), 1, "realloc kept the contents");
            // A block larger than the arena comes from the system.
            let huge = Layout::from_size_align(ARENA_BYTES + 1, 8).unwrap();
            let big = a.alloc(huge);
            assert!(!big.is_null() && !in_arena(big));
            a.dealloc(big, huge);
            a.dealloc(y, wide);
            a.dealloc(x2, Layout::from_size_align(5000, 8).unwrap());
            // Nothing alive: the next block starts the arena again.
            let z = a.alloc(small);
            assert_eq!(z as usize, BASE.load(Ordering::Relaxed));
            // Another thread is not the loop.
            let other = std::thread::spawn(move || {
                let o = LoopAlloc.alloc(small);
                let there = in_arena(o);
                LoopAlloc.dealloc(o, small);
                there
            })
            .join()
            .unwrap();
            assert!(!other, "another thread allocated from the arena");
            leave_loop();
            let w = a.alloc(small);
            assert!(!in_arena(w));
            a.dealloc(w, small);
            a.dealloc(z, small);
            a.dealloc(outside, small);
        }
    }
}
