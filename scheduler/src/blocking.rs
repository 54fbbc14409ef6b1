//! Running blocking work from async code without handing it to another thread and back
//! where that can be avoided: on an idle machine those two wake-ups cost more than a
//! short blocking call (a cgroup write, an `fdatasync`).

/// Runs `f`, which may block: in place on a multi-threaded runtime
/// ([`tokio::task::block_in_place`]: the runtime hands this worker's other tasks to
/// another thread meanwhile), else on the blocking pool. Once begun, `f` runs to the
/// end even if the awaiting future is dropped.
pub(crate) async fn run<T, F>(f: F) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return Ok(tokio::task::block_in_place(f));
    }
    tokio::task::spawn_blocking(f).await
}
