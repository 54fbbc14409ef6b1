//! The zygote's anonymous memory in transparent huge pages, so that a fork copies one
//! page-table entry per 2 MiB of heap instead of 512, and a sandbox's exit unmaps as few.
//!
//! Page tables are what a fork of a warm interpreter mostly costs: measured under
//! sustained load on the cgroup v1 host, `copy_page_range` (fork) and `unmap_page_range`
//! (a sandbox's exit) were each ~11% of the machine's CPU with R's heap in 4 KiB pages;
//! `MADV_COLLAPSE` (Linux 6.1) turns the heap into 2 MiB pages synchronously, whatever the
//! system-wide THP setting, and both shrink to a few percent.
//!
//! A sandbox still copies only what it writes: a write to a huge page it shares with the
//! zygote splits the sandbox's own mapping into 4 KiB entries and copies one 4 KiB page,
//! so what an idle sandbox holds privately (its USS) does not change, and neither does
//! what is charged to its cgroup.
//!
//! The heap is collapsed once, when the zygote is ready. Its own small writes between
//! forks (the control channel's buffers, in malloc's free chunks) split the extents they
//! land in back into 4 KiB mappings of the same pages; measured with R and no packages,
//! 70 MiB were huge at start, 31 MiB after the first hundred forks, and still 31 MiB after
//! six hundred: the zygote writes to the same few places. Collapsing those again would
//! give the zygote new copies while the sandboxes forked before keep the old ones alive,
//! memory per generation of sandboxes; a fork that copies 39 MiB of 4 KiB entries instead
//! of 70 is the better trade.
//!
//! What it costs: holes inside a collapsed extent become memory (the zygote's RSS grows by
//! 20–40 MiB for R), charged once to the zygote's own cgroup and shared by every sandbox.
//! Where the kernel has no THP, or cannot find a free 2 MiB page, an extent stays as it
//! is: nothing else depends on it.

use std::io;

/// Size of a PMD-mapped transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE: usize = 2 << 20;

/// The 2 MiB-aligned extents of the zygote's private anonymous memory (the C heap, R's and
/// Python's arenas, large vectors): where huge pages pay.
#[derive(Debug, Default)]
pub struct HugeHeap {
    extents: Vec<usize>,
}

/// What one pass of [`HugeHeap::collapse`] left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collapsed {
    /// Bytes now mapped by huge pages, of `eligible`.
    pub huge: usize,
    pub eligible: usize,
}

impl HugeHeap {
    /// Reads the extents from `/proc/self/maps`: writable private mappings of no file (or
    /// the `[heap]`), each rounded inwards to 2 MiB boundaries.
    pub fn scan() -> io::Result<HugeHeap> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        Ok(HugeHeap {
            extents: maps.lines().flat_map(anonymous_extents).collect(),
        })
    }

    /// Collapses every extent (`MADV_COLLAPSE`), one at a time: an
    /// extent the kernel cannot collapse (no free huge page, a page pinned, the mapping
    /// changed) is left in 4 KiB pages and does not stop the others.
    pub fn collapse(&self) -> Collapsed {
        let mut done = Collapsed {
            huge: 0,
            eligible: self.extents.len() * HUGE,
        };
        for &start in &self.extents {
            // SAFETY: MADV_COLLAPSE changes how the range is mapped, never its contents;
            // a range that is no longer mapped fails with ENOMEM and is left alone.
            let r = unsafe { libc::madvise(start as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE) };
            if r == 0 {
                done.huge += HUGE;
            }
        }
        done
    }
}

/// The 2 MiB extents inside one line of `/proc/self/maps`, if it is a writable private
/// mapping of no file or the `[heap]`.
fn anonymous_extents(line: &str) -> impl Iterator<Item = usize> {
    let mut fields = line.split_whitespace();
    let range = fields.next().unwrap_or("");
    let perms = fields.next().unwrap_or("");
    let inode = fields.nth(2).unwrap_or("");
    let path = fields.next().unwrap_or("");
    let eligible = perms.starts_with("rw")
        && perms.ends_with('p')
        && inode == "0"
        && (path.is_empty() || path == "[heap]");
    let (start, end) = range
        .split_once('-')
        .and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|_| eligible)
        .unwrap_or((0, 0));
    let first = start.div_ceil(HUGE) * HUGE;
    let last = end / HUGE * HUGE;
    (first..last).step_by(HUGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extents(line: &str) -> Vec<usize> {
        anonymous_extents(line).collect()
    }

    #[test]
    fn only_whole_aligned_extents_of_anonymous_writable_memory() {
        // [heap] from 0x55dc99203000 to 0x55dc9d64b000: 2 MiB boundaries inside it.
        let heap =
            "55dc99203000-55dc9d64b000 rw-p 00000000 00:00 0                          [heap]";
        let e = extents(heap);
        assert_eq!(e.first(), Some(&0x55dc_9940_0000));
        assert_eq!(e.last(), Some(&0x55dc_9d40_0000));
        assert!(e
            .iter()
            .all(|a| a % HUGE == 0 && a + HUGE <= 0x55dc9d64b000));
        assert_eq!(
            extents("7f4748e00000-7f4749200000 rw-p 00000000 00:00 0 "),
            [0x7f4748e00000, 0x7f4749000000]
        );
        // Smaller than one aligned extent.
        assert!(extents("7f4748e90000-7f47491f7000 rw-p 00000000 00:00 0 ").is_empty());
        // A file's data, read-only memory, shared memory, the stack: never.
        assert!(extents(
            "7f474ec00000-7f474f000000 rw-p 00621000 00:2a 1161965 /usr/lib/libpython3.11.so.1.0"
        )
        .is_empty());
        assert!(extents("7f474ec00000-7f474f000000 r--p 00000000 00:00 0 ").is_empty());
        assert!(
            extents("7f474ec00000-7f474f000000 rw-s 00000000 00:01 5 /dev/zero (deleted)")
                .is_empty()
        );
        assert!(extents("7fffad400000-7fffad800000 rw-p 00000000 00:00 0 [stack]").is_empty());
        assert!(extents("garbage").is_empty());
    }

    #[test]
    fn a_collapse_leaves_memory_as_it_was() {
        // Whether the kernel has THP or not, the contents survive a collapse.
        let mapping = crate::zygote::PagedMapping::new(3 * HUGE);
        let heap = HugeHeap::scan().unwrap();
        let start = mapping.addr().div_ceil(HUGE) * HUGE;
        assert!(
            heap.extents.contains(&start),
            "the mapping's aligned extent is found"
        );
        let done = heap.collapse();
        assert!(done.huge <= done.eligible);
        assert!(mapping.intact());
    }
}
