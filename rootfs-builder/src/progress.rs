//! Progress lines on stderr: `[  12.3s stage] message`.
//!
//! Owns nothing but the start time and the writer; safe to share between the
//! threads that read a child's stdout and stderr.

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    start: Instant,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Progress {
    /// Progress on the process's stderr.
    pub fn stderr() -> Self {
        Self::to(Box::new(io::stderr()))
    }

    pub fn to(out: Box<dyn Write + Send>) -> Self {
        Progress {
            start: Instant::now(),
            out: Mutex::new(out),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Prints one line labelled with the stage and the time since the start.
    pub fn line(&self, stage: &str, message: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // Progress is best effort: a closed stderr must not fail the build.
        let _ = writeln!(out, "[{secs:7.1}s {stage}] {message}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_stage_and_elapsed_time() {
        let buf = Buf::default();
        let p = Progress::to(Box::new(buf.clone()));
        p.line("debootstrap", "I: Retrieving InRelease");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.starts_with("[    0.0s debootstrap] I: Retrieving InRelease"),
            "{text}"
        );
    }
}
