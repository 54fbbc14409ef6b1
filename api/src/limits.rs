//! Process limits a long-running Hatchery process sets for itself at start.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises this process's soft limit of open files to its hard limit, and returns the
/// soft limit before and after.
///
/// Every open WebSocket, HTTP connection, pooled sandbox (its channel, pidfd, output
/// pipes and freezer files) and running execution (its cgroup's usage files) holds
/// descriptors, and a service manager's usual soft limit (1024) would refuse the next
/// one with `EMFILE` well before the host runs out of anything else. The hard limit is
/// what the administrator allows; it is left as it is. A sandbox sets its own, lower,
/// limit before any user code runs.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_of_open_files_is_raised_to_the_hard_one() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(256);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let (before, after) = raise_open_files_limit().unwrap();
        assert_eq!(before, low);
        assert_eq!(after, hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        // Already at the hard limit: nothing to change.
        assert_eq!(raise_open_files_limit().unwrap(), (hard, hard));
    }
}
