//! Behaviour of `sandbox run` on the built R root filesystem: limits hold, the clock kills
//! whole trees, the sandbox sees only itself, R runs, and nothing is left behind — after
//! success, failure, or a `sandbox` killed with SIGKILL.
//!
//! Runs as root (as CI does) on the host's cgroup setup: the v1 backend on hybrid
//! development machines; `tests/tests/cgroups.rs` also runs inside the pure-v2 VM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatchery_tests::{cgroup_parents, host_hostname, sandbox_bin, Canary, HostMarker, Sandbox};

/// Host pids whose command line contains `needle` (our own tag, so only our processes).
fn host_processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("sandbox run") {
            found.push(pid);
        }
    }
    found
}

/// Host mounts that belong to a sandbox (they must never appear on the host).
fn sandbox_mounts_on_host() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        // (The VM's test guest mounts the image store itself over 9p: that is no sandbox's.)
        .filter(|l| {
            l.contains("/run/hatchery/stage")
                || (l.contains("hatchery/rootfs") && !l.contains(" - 9p "))
        })
        .map(String::from)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn r_runs_inside_on_the_built_rootfs() {
    let run = Sandbox::new().memory("512M").timeout("60s").run([
        "Rscript",
        "-e",
        "cat(sum(1:10), '\\n'); library(Matrix); fit <- lm(dist ~ speed, cars); \
         cat(sprintf('%.4f', coef(fit)[2]), '\\n'); cat(R.version$major, '\\n')",
    ]);
    run.assert_status("exited", 0);
    let lines: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    assert_eq!(lines.first(), Some(&"55"), "{}", run.describe());
    assert_eq!(lines.get(1), Some(&"3.9324"), "{}", run.describe());
    assert_eq!(lines.get(2), Some(&"4"), "{}", run.describe());
    run.assert_cleaned_up();
}

#[test]
fn memory_bomb_in_r_ends_oom_killed_with_the_host_untouched() {
    let mut canary = Canary::start();
    let run = Sandbox::new().memory("96M").timeout("60s").run([
        "Rscript",
        "-e",
        "x <- numeric(5e7); cat('survived', length(x))",
    ]);
    run.assert_status("oom_killed", 137);
    assert!(!run.stdout.contains("survived"), "{}", run.describe());
    let peak = run.report().peak_memory_bytes;
    assert!(
        peak <= 97 << 20,
        "peak memory {peak} above the 96M limit\n{}",
        run.describe()
    );
    assert!(run.stderr.contains("memory limit"), "{}", run.describe());
    canary.assert_alive("after a memory bomb");
    run.assert_cleaned_up();
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let mut canary = Canary::start();
    let run = Sandbox::new().pids(16).timeout("20s").run([
        "/bin/sh",
        "-c",
        "while :; do sleep 100 & done",
    ]);
    // dash gives up with exit code 2 at the first refused fork; the sleeps die with the
    // sandbox.
    run.assert_status("exited", 2);
    assert!(
        run.stderr.contains("Cannot fork"),
        "forks were never refused\n{}",
        run.describe()
    );
    canary.assert_alive("after a fork bomb");
    // The host can still create processes.
    assert!(Command::new("true").status().unwrap().success());
    run.assert_cleaned_up();
}

#[test]
fn cpu_bound_loop_under_half_a_cpu_gets_about_half_a_core() {
    let run =
        Sandbox::new()
            .cpus("0.5")
            .timeout("2s")
            .run(["/bin/sh", "-c", "while :; do :; done"]);
    run.assert_status("timed_out", 124);
    let r = run.report();
    let share = (r.user_cpu_ms + r.system_cpu_ms) / r.wall_time_ms;
    // The quota is a ceiling; on a loaded machine the loop may get less, never more.
    assert!(
        (0.25..=0.6).contains(&share),
        "cpu share {share:.2} under --cpus 0.5\n{}",
        run.describe()
    );
    run.assert_cleaned_up();
}

#[test]
fn timeout_kills_a_double_forked_setsid_tree() {
    let tag = format!("{}", 900_000 + std::process::id() % 90_000);
    let script = format!(
        "(setsid sh -c 'sleep {tag} & sleep {tag}' &); (sleep {tag} &); echo started; sleep {tag}"
    );
    let started = Instant::now();
    // 6 s: time for the shell to build its tree (and say so) even on a loaded machine or
    // under software emulation (the cgroup v2 VM once took 2.5 s of system time before
    // the first `echo`), so the kill has a whole tree to find.
    let run = Sandbox::new().timeout("6s").run(["/bin/sh", "-c", &script]);
    run.assert_status("timed_out", 124);
    assert!(run.stdout.contains("started"), "{}", run.describe());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the timeout took {:?}",
        started.elapsed()
    );
    let wall = run.report().wall_time_ms;
    assert!(
        (6000.0..8000.0).contains(&wall),
        "wall time {wall} ms for a 6 s timeout\n{}",
        run.describe()
    );
    assert_eq!(
        host_processes_with(&format!("sleep {tag}")),
        Vec::<u32>::new(),
        "processes of the tree survived the timeout"
    );
    run.assert_cleaned_up();
}

#[test]
fn the_sandbox_sees_only_its_own_pids_hostname_env_and_files() {
    let marker = HostMarker::create();
    let script = format!(
        "hostname; echo pids $(ls /proc | grep -cE '^[0-9]+$'); \
         test -e {marker} && echo MARKER-VISIBLE; \
         env | sort; echo uid $(id -u) gid $(id -g); echo pwd $(pwd); \
         test -e /proc/1/exe && echo init-visible; true",
        marker = marker.path().display()
    );
    let run = Sandbox::new()
        .hostname("modelbox")
        .env("MODEL", "markov")
        .host_env("HATCHERY_SECRET_TOKEN", "do-not-leak")
        .run(["/bin/sh", "-c", &script]);
    run.assert_status("exited", 0);
    let out = &run.stdout;
    assert!(out.starts_with("modelbox\n"), "{}", run.describe());
    assert_ne!(host_hostname(), "modelbox");
    // init, sh, ls and grep at most: nothing of the host.
    let pids: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("pids "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(usize::MAX);
    assert!(pids <= 5, "saw {pids} pids\n{}", run.describe());
    assert!(!out.contains("MARKER-VISIBLE"), "host file visible");
    assert!(out.contains("MODEL=markov\n"), "{}", run.describe());
    assert!(out.contains("PATH=/usr/local/sbin"), "{}", run.describe());
    assert!(!out.contains("HATCHERY_SECRET_TOKEN"), "host env leaked");
    assert!(!out.contains("CARGO"), "host env leaked");
    assert!(out.contains("uid 65534 gid 65534"), "{}", run.describe());
    assert!(out.contains("pwd /work"), "{}", run.describe());
    assert!(!out.contains("init-visible"), "the init's exe is reachable");
    run.assert_cleaned_up();
}

#[test]
fn only_loopback_exists_in_the_network_namespace() {
    let run = Sandbox::new().run(["/bin/sh", "-c", "ls /sys/class/net; cat /proc/net/dev"]);
    run.assert_status("exited", 0);
    let ifaces: Vec<&str> = run
        .stdout
        .lines()
        .take_while(|l| !l.contains('|'))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{}", run.describe());
}

#[test]
fn output_past_the_limit_is_cut_reported_and_stops_the_run() {
    let run =
        Sandbox::new()
            .output_limit("10k")
            .timeout("20s")
            .run(["/bin/sh", "-c", "yes hatchery"]);
    run.assert_status("output_limit", 122);
    assert_eq!(run.stdout.len(), 10 * 1024, "{}", run.describe());
    assert!(run.report().stdout_truncated);
    assert!(!run.report().stderr_truncated);
    assert!(run.stderr.contains("stdout cut after 10240 bytes"));
    run.assert_cleaned_up();
}

#[test]
fn exit_codes_and_signals_follow_the_documented_rules() {
    let run = Sandbox::new().run(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"]);
    run.assert_status("exited", 7);
    assert_eq!(run.stdout, "out\n");
    assert!(run.stderr.starts_with("err\n"), "{}", run.describe());

    let run = Sandbox::new().run(["/bin/sh", "-c", "kill -TERM $$"]);
    run.assert_status("signaled", 128 + 15);
    assert_eq!(run.report().signal, Some(15));

    let run = Sandbox::new().run(["no-such-command"]);
    run.assert_status("setup_error", 127);
    assert!(run.stderr.contains("no-such-command"), "{}", run.describe());
    run.assert_cleaned_up();

    let run = Sandbox::new().run(["/etc/passwd"]);
    run.assert_status("setup_error", 126);
    run.assert_cleaned_up();
}

#[test]
fn rlimits_and_tmpfs_sizes_hold() {
    // /tmp is filled with 512 KiB files, each under the 1 MiB file-size limit, so only the
    // tmpfs size can stop the writes; 16 of them (8 MiB) would fit if --tmp-size were
    // ignored. /var/tmp is world-writable in the image, so only a read-only root refuses
    // a file there.
    let run = Sandbox::new()
        .tmp_size("4M")
        .option("--file-size-limit")
        .option("1M")
        .run([
            "/bin/sh",
            "-c",
            "echo core $(ulimit -c) nofile $(ulimit -n); \
             head -c 2M /dev/zero > /work/big 2>/dev/null; echo fsize $(stat -c %s /work/big); \
             i=0; while [ $i -lt 16 ]; do \
               head -c 512K /dev/zero 2>&1 > /tmp/f$i || { echo tmp-stopped-at $i; break; }; \
               i=$((i+1)); \
             done; \
             echo tmp-total $(cat /tmp/f* | wc -c); \
             touch /var/tmp/x 2>&1; \
             grep ' / / ' /proc/self/mountinfo",
        ]);
    run.assert_status("exited", 0);
    let out = &run.stdout;
    assert!(
        out.contains("core 0 nofile 1024"),
        "core or nofile rlimit not applied\n{}",
        run.describe()
    );
    assert!(
        out.contains(&format!("fsize {}", 1 << 20)),
        "a 2 MiB write was not cut at the 1 MiB file-size limit\n{}",
        run.describe()
    );

    assert!(
        out.contains("tmp-stopped-at"),
        "8 MiB of 512 KiB files fit in a 4 MiB /tmp\n{}",
        run.describe()
    );
    assert!(
        out.contains("No space left on device"),
        "/tmp did not fill with ENOSPC\n{}",
        run.describe()
    );
    let total: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("tmp-total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tmp-total line\n{}", run.describe()));
    assert!(
        (3584 << 10..=4 << 20).contains(&total),
        "{total} bytes fit in /tmp, expected close to its 4 MiB size\n{}",
        run.describe()
    );

    assert!(
        out.contains("cannot touch '/var/tmp/x': Read-only file system"),
        "creating a file in the world-writable /var/tmp was not refused with EROFS\n{}",
        run.describe()
    );
    // mountinfo: id parent major:minor root mount-point options ...; the last line for /
    // is the mount on top.
    let root_options = out
        .lines()
        .rev()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() > 5 && fields[4] == "/").then(|| fields[5].to_string())
        })
        .unwrap_or_else(|| panic!("no mountinfo line for /\n{}", run.describe()));
    assert!(
        root_options.split(',').any(|o| o == "ro"),
        "/ is mounted {root_options}, not read-only\n{}",
        run.describe()
    );
    run.assert_cleaned_up();
}

#[test]
fn user_namespace_maps_root_to_an_unprivileged_host_uid() {
    let tag = format!("{}", 800_000 + std::process::id() % 90_000);
    let child = Command::new(sandbox_bin())
        .args(["run", "--userns", "--timeout", "30s", "--", "/bin/sh", "-c"])
        .arg(format!("cat /proc/self/uid_map; sleep {tag}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);
    let needle = format!("sleep {tag}");
    wait_for("the sandboxed sleep", Duration::from_secs(10), || {
        !host_processes_with(&needle).is_empty()
    });
    let pid = host_processes_with(&needle)[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let host_uid: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(host_uid, 1_000_000 + 65534, "{uid_line}");
    let _ = child.0.kill();
    let _ = child.0.wait();
}

#[test]
fn cleanup_holds_after_success_and_failure_and_leaves_no_mounts() {
    let before = sandbox_mounts_on_host();
    assert!(before.is_empty(), "sandbox mounts on the host: {before:?}");
    for script in ["true", "exit 3", "kill -KILL $$"] {
        let run = Sandbox::new().run(["/bin/sh", "-c", script]);
        run.assert_cleaned_up();
    }
    let run = Sandbox::new().timeout("200ms").run(["sleep", "10"]);
    run.assert_status("timed_out", 124);
    run.assert_cleaned_up();
    assert_eq!(sandbox_mounts_on_host(), Vec::<String>::new());
}

#[test]
fn a_killed_sandbox_takes_its_tree_down_and_gc_reaps_the_cgroup() {
    let tag = format!("{}", 700_000 + std::process::id() % 90_000);
    let mut sandbox = Command::new(sandbox_bin())
        .args(["run", "--", "/bin/sh", "-c"])
        .arg(format!("(setsid sleep {tag} &); sleep {tag}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let owner = sandbox.id();
    let needle = format!("sleep {tag}");
    wait_for("the tree to start", Duration::from_secs(10), || {
        host_processes_with(&needle).len() >= 2
    });
    let prefix = format!("run-{owner}-");
    let leftovers = || -> Vec<std::path::PathBuf> {
        cgroup_parents()
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    assert!(
        !leftovers().is_empty(),
        "the run's cgroup is not where expected"
    );
    sandbox.kill().unwrap();
    sandbox.wait().unwrap();
    // The init dies with its supervisor (parent-death signal), and the pid namespace with it.
    wait_for("the orphaned tree to die", Duration::from_secs(5), || {
        host_processes_with(&needle).is_empty()
    });
    // Only an empty cgroup can be left; `sandbox gc` removes it.
    let out = Command::new(sandbox_bin()).arg("gc").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(leftovers(), Vec::<std::path::PathBuf>::new());
    assert!(sandbox_mounts_on_host().is_empty());
}

#[test]
fn the_next_start_reaps_what_a_killed_sandbox_left() {
    let mut sandbox = Command::new(sandbox_bin())
        .args(["run", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("run-{}-", sandbox.id());
    let leftovers = || -> usize {
        cgroup_parents()
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    };
    wait_for("the run's cgroup", Duration::from_secs(10), || {
        leftovers() > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    sandbox.kill().unwrap();
    sandbox.wait().unwrap();
    let run = Sandbox::new().run(["true"]);
    run.assert_status("exited", 0);
    assert_eq!(leftovers(), 0, "the next start did not reap the orphan");
}

#[test]
fn a_missing_rootfs_is_a_clear_setup_error() {
    let out = Command::new(sandbox_bin())
        .args(["run", "--rootfs", "/nonexistent/rootfs", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/rootfs"), "{err}");
    assert!(!Path::new("/nonexistent").exists());
}
