//! R's console, as the engine wires it: where output goes (an output hook, or fd 1/2
//! unbuffered), where progress goes (the progress hook), what reading the console
//! returns (end of file) and what quitting does in a forked child (`_exit`, never
//! R's clean-up, which would delete the zygote's temp dir).
//!
//! The callbacks here are called by R through C function pointers: they must never
//! panic across the FFI boundary and never call back into R.

use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::ffi::SaType;

/// Which of R's two console streams a piece of output belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// `print()`, `cat()`, `writeLines()`: R's output (`otype` 0).
    Stdout,
    /// `message()`, `warning()` text, `cat(file = stderr())`: R's errors (`otype` 1).
    Stderr,
}

impl OutputStream {
    /// The file descriptor the stream is written to when no hook is set.
    pub fn fd(self) -> c_int {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }
}

/// Receives R's console output, one piece at a time, in the order R wrote it.
pub type OutputHook = fn(OutputStream, &[u8]);

/// Receives `progress(value, message)` calls from R code, with `0 <= value <= 1`.
pub type ProgressHook = fn(f64, &str);

static OUTPUT_HOOK: Mutex<Option<OutputHook>> = Mutex::new(None);
static PROGRESS_HOOK: Mutex<Option<ProgressHook>> = Mutex::new(None);

/// The pid of the process that initialised R (the zygote); 0 before `init`.
pub(super) static ZYGOTE_PID: AtomicI32 = AtomicI32::new(0);

/// R's own clean-up routine, called when the zygote itself quits.
pub(super) static ORIGINAL_CLEANUP: OnceLock<unsafe extern "C" fn(SaType, c_int, c_int)> =
    OnceLock::new();

/// Sends R's console output to `hook` instead of fd 1/2 (`None` restores fd 1/2).
/// The zygote sets one when it frames output itself.
pub fn set_output_hook(hook: Option<OutputHook>) {
    *OUTPUT_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// Sets the function `progress()` calls in R (`None`: progress is accepted and dropped).
pub fn set_progress_hook(hook: Option<ProgressHook>) {
    *PROGRESS_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

pub(super) fn progress_hook() -> Option<ProgressHook> {
    *PROGRESS_HOOK.lock().unwrap_or_else(|e| e.into_inner())
}

/// True in a process forked from the one that initialised R.
pub fn in_forked_child() -> bool {
    let zygote = ZYGOTE_PID.load(Ordering::Relaxed);
    // SAFETY: getpid has no preconditions.
    zygote != 0 && zygote != unsafe { libc::getpid() }
}

/// Writes all of `bytes` to `fd`, retrying on EINTR and short writes; gives up silently
/// on any other error (a closed pipe must not kill the interpreter).
pub fn write_fd(fd: c_int, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice; write reads at most its length.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// `ptr_R_WriteConsoleEx`: every byte R prints arrives here.
pub(super) unsafe extern "C" fn write_console_ex(buf: *const c_char, len: c_int, otype: c_int) {
    if buf.is_null() || len <= 0 {
        return;
    }
    // SAFETY: R passes a buffer of `len` readable bytes that lives for this call.
    let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len as usize) };
    let stream = if otype == 0 {
        OutputStream::Stdout
    } else {
        OutputStream::Stderr
    };
    let hook = *OUTPUT_HOOK.lock().unwrap_or_else(|e| e.into_inner());
    match hook {
        Some(hook) => {
            // A panicking hook loses that piece of output rather than aborting R.
            let _ = catch_unwind(AssertUnwindSafe(|| hook(stream, bytes)));
        }
        None => write_fd(stream.fd(), bytes),
    }
}

/// `ptr_R_ReadConsole`: the console is never read. User code that asks for input
/// (`scan()`, `browser()`, `readline()` when interactive) sees end of file, and can
/// never read whatever the zygote's stdin is connected to.
pub(super) unsafe extern "C" fn read_console(
    _prompt: *const c_char,
    _buf: *mut u8,
    _len: c_int,
    _add_history: c_int,
) -> c_int {
    0
}

/// `ptr_R_CleanUp`, reached by `q()`, `quit()` and R's fatal errors (`R_Suicide`).
///
/// In a forked child it flushes and `_exit`s with R's status: R's own clean-up would
/// run `rm -Rf` on the temp dir R created at start-up, which is the zygote's. In the
/// zygote it is R's own clean-up.
pub(super) unsafe extern "C" fn clean_up(save: SaType, status: c_int, run_last: c_int) {
    if in_forked_child() {
        super::exit_child(status);
    }
    if let Some(original) = ORIGINAL_CLEANUP.get() {
        // SAFETY: the routine R installed at start-up, called with R's own arguments.
        unsafe { original(save, status, run_last) };
    }
    // R's clean-up never returns; if it is missing, end the zygote the same way.
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(status) }
}
