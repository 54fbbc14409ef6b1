//! The zygote: a language runtime initialised once (R embedded through libR, with its
//! packages preloaded and a full GC done), inside a sandbox of its own, that forks
//! single-use sandboxes on request. [`server`] is the zygote's side; [`protocol`] the
//! messages between the agent (see [`crate::pool`]), the zygote and each sandbox.

pub mod alloc;
pub mod huge;
pub mod prefault;
pub mod protocol;
pub mod server;

/// A private anonymous mapping for tests, each 4 KiB page's first byte holding the page's
/// index (mod 256); unmapped when dropped.
#[cfg(test)]
pub(crate) struct PagedMapping {
    ptr: *mut u8,
    len: usize,
}

#[cfg(test)]
impl PagedMapping {
    pub(crate) fn new(len: usize) -> PagedMapping {
        // SAFETY: a fresh private anonymous mapping, owned by the value returned.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let mut m = PagedMapping { ptr: p.cast(), len };
        for (i, b) in m.bytes_mut().iter_mut().enumerate().step_by(4096) {
            *b = (i / 4096) as u8;
        }
        m
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr as usize
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the whole mapping, alive as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Whether every page still holds its index.
    pub(crate) fn intact(&self) -> bool {
        // SAFETY: the whole mapping, alive as long as `self`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        bytes
            .iter()
            .enumerate()
            .step_by(4096)
            .all(|(i, b)| *b == (i / 4096) as u8)
    }
}

#[cfg(test)]
impl Drop for PagedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
