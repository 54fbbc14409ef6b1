//! Hatchery's sandbox runtime.
pub mod seccomp;
