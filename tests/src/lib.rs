//! Shared helpers for Hatchery integration tests.
