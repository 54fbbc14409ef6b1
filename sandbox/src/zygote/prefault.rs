//! The pages a claimed sandbox touches first, faulted in before it is frozen, so that the
//! claim path does not take them one fault at a time.
//!
//! A forked sandbox shares the zygote's memory copy-on-write, and a fork does not copy the
//! page-table entries of file mappings that were never written (the interpreter's code):
//! the first evaluation after a thaw takes a fault for each page of R's heap, stack and
//! globals it writes and each page of code it runs for the first time. Measured in a
//! sandbox on the cgroup v1 host, `x <- 1` took 54 minor faults and 0.63 ms, against
//! 0.07 ms for the same evaluation in the zygote: at ~10 µs per fault in this VM, the
//! faults are most of what the first statement costs.
//!
//! Which pages those are depends on the interpreter, its packages and the addresses its
//! heap ended up at, so the zygote learns them once, when it is ready ([`learn`]): a probe
//! child forked like a sandbox runs a small evaluation through the same path as a claimed
//! sandbox, then reads its own page map (`/proc/self/pagemap`): the pages of writable
//! memory it holds exclusively are the ones it copied (or allocated), the pages of file
//! mappings it has mapped are the ones it ran or read. Every sandbox then asks the kernel
//! for the same pages before it reports ready ([`Prefault::apply`]: `MADV_POPULATE_WRITE`
//! and `MADV_POPULATE_READ`, Linux 5.14), during the refill instead of after the claim.
//!
//! What it costs: the pages written become the sandbox's own (its USS and its cgroup's
//! charge grow by their size, reported by the pool), and the refill does the faults the
//! claimed sandbox would otherwise have done. An address that is no longer mapped, or a
//! kernel without the advice, makes a run fail harmlessly: the page is faulted on first
//! use, as before. Nothing here reads or writes contents: populating a page that is
//! already present is a no-op.

use std::io::{self, Read, Write};

/// At most this many pages are learnt (the probe's evaluation touches ~100–300).
pub const MAX_PAGES: usize = 4096;

const PAGE: usize = 4096;
/// `madvise` advice of Linux 5.14 (not in every libc crate version).
const MADV_POPULATE_READ: libc::c_int = 22;
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// `/proc/pid/pagemap` bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_EXCLUSIVE: u64 = 1 << 56;

/// A run of pages to populate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub pages: usize,
    /// Written (a private copy is made) rather than only mapped.
    pub write: bool,
}

/// The pages every sandbox populates before it reports ready.
#[derive(Debug, Default, Clone)]
pub struct Prefault {
    runs: Vec<Run>,
}

impl Prefault {
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Pages populated by writing (each a private copy in every sandbox).
    pub fn written_pages(&self) -> usize {
        self.runs.iter().filter(|r| r.write).map(|r| r.pages).sum()
    }

    /// Pages only mapped (shared with the zygote and the page cache).
    pub fn mapped_pages(&self) -> usize {
        self.runs.iter().filter(|r| !r.write).map(|r| r.pages).sum()
    }

    /// Populates every run in this process. Allocates nothing; a run the kernel refuses
    /// (unmapped since, or no such advice) is skipped.
    pub fn apply(&self) {
        for r in &self.runs {
            let advice = if r.write {
                MADV_POPULATE_WRITE
            } else {
                MADV_POPULATE_READ
            };
            // SAFETY: populating changes which pages are present, never their contents
            // (a write fault copies the page as it is); an unmapped or unsuitable range
            // fails with an error and is left alone.
            unsafe {
                libc::madvise(r.start as *mut libc::c_void, r.pages * PAGE, advice);
            }
        }
    }
}

/// Forks a probe child that runs `probe` (an evaluation through the sandbox's path), then
/// reports the pages it touched; returns them as runs. Must be called from a
/// single-threaded process (the zygote), before its loop.
pub fn learn(probe: impl FnOnce()) -> io::Result<Prefault> {
    // Everything the child fills after the probe is allocated (and written) here, before
    // the fork, so that its own bookkeeping touches no page it would then report.
    let mut maps = vec![0u8; 1 << 20];
    let mut out: Vec<u64> = vec![0; 3 * MAX_PAGES];
    let skip = [range_of(&maps), range_of(&out)];
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the zygote is single-threaded (it checks before every fork); the child
    // only runs the probe, writes to the pipe (no allocation) and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(rd);
        probe();
        let n = touched(&mut maps, &mut out, &skip).unwrap_or(0);
        let _ = std::fs::File::from(wr).write_all(bytemuck_u64(&out[..n * 3]));
        // SAFETY: leaving without any of the zygote's exit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    let mut bytes = Vec::new();
    let read = std::fs::File::from(rd).read_to_end(&mut bytes);
    let status = loop {
        match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other?,
        }
    };
    read?;
    if status != nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0) {
        return Err(io::Error::other(format!(
            "the page probe ended with {status:?}"
        )));
    }
    Ok(Prefault {
        runs: parse_runs(&bytes),
    })
}

/// The runs the probe sent: (start, pages, write) words, whole triples only, within
/// [`MAX_PAGES`] in all.
fn parse_runs(bytes: &[u8]) -> Vec<Run> {
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")))
        .collect();
    let mut total = 0usize;
    let mut runs = Vec::new();
    for t in words.chunks_exact(3) {
        let (start, pages) = (t[0] as usize, t[1] as usize);
        if start % PAGE != 0 || pages == 0 || total + pages > MAX_PAGES {
            continue;
        }
        total += pages;
        runs.push(Run {
            start,
            pages,
            write: t[2] != 0,
        });
    }
    runs
}

fn range_of<T>(v: &[T]) -> (usize, usize) {
    let start = v.as_ptr() as usize;
    (start, start + std::mem::size_of_val(v))
}

fn bytemuck_u64(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), std::mem::size_of_val(words)) }
}

/// In the probe child: the pages this process touched, as (start, pages, write) triples in
/// `out`, read from `/proc/self/maps` (into `maps`) and `/proc/self/pagemap`; `skip`: the
/// probe's own buffers. Returns the number of triples.
fn touched(maps: &mut [u8], out: &mut [u64], skip: &[(usize, usize)]) -> io::Result<usize> {
    let len = read_file(c"/proc/self/maps", maps)?;
    // SAFETY: opening a file of this process read-only; closed below.
    let pagemap = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY) };
    if pagemap < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut runs = Runs {
        out,
        n: 0,
        pages: 0,
    };
    let mut entries = [0u64; 512];
    for line in maps[..len].split(|&b| b == b'\n') {
        let Some(m) = Mapping::parse(line) else {
            continue;
        };
        let mut page = m.start;
        while page < m.end {
            let count = ((m.end - page) / PAGE).min(entries.len());
            let offset = (page / PAGE * 8) as libc::off_t;
            // SAFETY: reading `count` entries into the local array.
            let n = unsafe { libc::pread(pagemap, entries.as_mut_ptr().cast(), count * 8, offset) };
            if n <= 0 {
                break;
            }
            for (i, &e) in entries[..n as usize / 8].iter().enumerate() {
                let addr = page + i * PAGE;
                let kind = if e & PM_PRESENT == 0 {
                    None
                } else if m.writable && e & PM_EXCLUSIVE != 0 {
                    Some(true)
                } else if m.file {
                    Some(false)
                } else {
                    None
                };
                let own = skip.iter().any(|&(a, b)| addr + PAGE > a && addr < b);
                match kind {
                    Some(write) if !own => runs.push(addr, write),
                    _ => {}
                }
            }
            page += (n as usize / 8) * PAGE;
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(pagemap) };
    Ok(runs.n)
}

/// Triples being written into a fixed buffer, adjacent pages of one kind merged.
struct Runs<'a> {
    out: &'a mut [u64],
    n: usize,
    pages: usize,
}

impl Runs<'_> {
    fn push(&mut self, addr: usize, write: bool) {
        if self.pages >= MAX_PAGES {
            return;
        }
        self.pages += 1;
        if self.n > 0 {
            let last = &mut self.out[(self.n - 1) * 3..self.n * 3];
            if last[0] as usize + last[1] as usize * PAGE == addr && (last[2] != 0) == write {
                last[1] += 1;
                return;
            }
        }
        if (self.n + 1) * 3 > self.out.len() {
            return;
        }
        self.out[self.n * 3..self.n * 3 + 3].copy_from_slice(&[addr as u64, 1, write as u64]);
        self.n += 1;
    }
}

/// One line of `/proc/self/maps`, as far as populating goes.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Private and writable: a write makes a private copy.
    writable: bool,
    /// Backed by a file (its pages are only mapped on first use after a fork).
    file: bool,
}

impl Mapping {
    /// `None` for lines that are not worth populating: shared mappings, the kernel's
    /// (`[vvar]`, `[vdso]`, `[vsyscall]`), inaccessible ones, and anything unparsable.
    fn parse(line: &[u8]) -> Option<Mapping> {
        let line = std::str::from_utf8(line).ok()?;
        let mut fields = line.split_whitespace();
        let (a, b) = fields.next()?.split_once('-')?;
        let perms = fields.next()?.as_bytes();
        let inode = fields.nth(2)?;
        let path = fields.next().unwrap_or("");
        if perms.len() < 4 || perms[3] != b'p' || perms[0] != b'r' {
            return None;
        }
        if path.starts_with("[v") {
            return None;
        }
        Some(Mapping {
            start: usize::from_str_radix(a, 16).ok()?,
            end: usize::from_str_radix(b, 16).ok()?,
            writable: perms[1] == b'w',
            file: inode != "0",
        })
    }
}

/// Reads a whole (small) file into `buf` without allocating; the bytes read.
fn read_file(path: &std::ffi::CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: opening read-only; closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut len = 0;
    while len < buf.len() {
        // SAFETY: reading into the unfilled part of the caller's buffer.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_worth_populating() {
        let heap = Mapping::parse(b"55dc99203000-55dc9d64b000 rw-p 00000000 00:00 0  [heap]");
        assert_eq!(
            heap,
            Some(Mapping {
                start: 0x55dc99203000,
                end: 0x55dc9d64b000,
                writable: true,
                file: false
            })
        );
        let code = Mapping::parse(
            b"7f474ec00000-7f474f000000 r-xp 00021000 00:2a 1161965 /usr/lib/R/lib/libR.so",
        )
        .unwrap();
        assert!(code.file && !code.writable);
        assert!(Mapping::parse(b"7f47-7f48 rw-s 00000000 00:01 5 /dev/zero (deleted)").is_none());
        assert!(Mapping::parse(b"7f47-7f48 ---p 00000000 00:00 0 ").is_none());
        assert!(Mapping::parse(b"7ffd-7ffe r--p 00000000 00:00 0 [vvar]").is_none());
        assert!(Mapping::parse(b"garbage").is_none());
    }

    #[test]
    fn adjacent_pages_of_one_kind_make_one_run() {
        let mut out = vec![0u64; 12];
        let mut runs = Runs {
            out: &mut out,
            n: 0,
            pages: 0,
        };
        for (addr, write) in [
            (0x1000, true),
            (0x2000, true),
            (0x3000, false),
            (0x5000, false),
            (0x6000, false),
        ] {
            runs.push(addr, write);
        }
        assert_eq!(runs.n, 3);
        let bytes = bytemuck_u64(&out[..9]).to_vec();
        assert_eq!(
            parse_runs(&bytes),
            [
                Run {
                    start: 0x1000,
                    pages: 2,
                    write: true
                },
                Run {
                    start: 0x3000,
                    pages: 1,
                    write: false
                },
                Run {
                    start: 0x5000,
                    pages: 2,
                    write: false
                },
            ]
        );
        // Torn and misaligned input is dropped, not trusted.
        assert!(parse_runs(&bytes[..20]).len() <= 1);
        assert!(parse_runs(bytemuck_u64(&[0x1001, 1, 1])).is_empty());
    }

    #[test]
    fn a_probe_reports_the_pages_it_wrote_and_populating_keeps_contents() {
        // A fresh mapping of 16 pages, each holding its index; the probe writes pages
        // 3 and 4 only (as a forked child: the parent's copy is untouched).
        let len = 16 * PAGE;
        let mapping = crate::zygote::PagedMapping::new(len);
        let base = mapping.addr();
        // The test harness runs tests on threads: fork only this thread's copy, as the
        // zygote does (the child touches nothing that another thread could hold locked).
        let learnt = learn(|| {
            // SAFETY: the child's own copy of the mapping.
            unsafe {
                std::ptr::write_volatile((base + 3 * PAGE) as *mut u8, 33);
                std::ptr::write_volatile((base + 4 * PAGE + 7) as *mut u8, 44);
            }
        })
        .unwrap();
        let inside: Vec<Run> = learnt
            .runs()
            .iter()
            .filter(|r| r.start < base + len && r.start + r.pages * PAGE > base)
            .copied()
            .collect();
        assert_eq!(
            inside,
            [Run {
                start: base + 3 * PAGE,
                pages: 2,
                write: true
            }],
            "exactly the pages the probe wrote"
        );
        assert!(learnt.written_pages() >= 2);
        // Populating here writes nothing: the parent's contents are as they were.
        learnt.apply();
        assert!(mapping.intact());
    }
}
