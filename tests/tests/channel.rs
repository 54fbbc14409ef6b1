//! Attacks by the channel-holding process itself: the R process of a pooled sandbox holds
//! its end of the channel to the pool owner, so user code that loads native code
//! (`tests/hostile/hostile.c`, compiled at test time, written to `/tmp` and
//! `dyn.load`ed by the R code) can write anything on it. The owner must stay the
//! authority on time, cancellation, sizes and the final state: a partial frame cannot
//! hold the time limit or a cancel, a malformed, oversize, out-of-order or
//! descriptor-carrying frame ends the run `protocol_violation`, floods of output or
//! progress are bounded and never silent, and two sandboxes running at once cannot reach
//! each other (locks and inotify on image files, abstract sockets, signals, /proc,
//! per-uid quotas).
//!
//! Needs root, `cargo build -p hatchery-sandbox --bins`, gcc and the R root filesystem.
//! Run: `cargo test -p hatchery-tests --test channel`.

use std::time::{Duration, Instant};

use hatchery_sandbox::pool::{Event, ExecRequest, ExecStatus, OUTPUT_INTERVAL, PROGRESS_INTERVAL};
use hatchery_sandbox::upstream::MAX_DATA;
use hatchery_tests::{host_processes_with, r_load_hostile, unique_token};

mod pools;
use pools::*;

/// A request whose code first loads the hostile library.
fn hostile(code: &str, time_limit: Duration) -> ExecRequest {
    let mut req = ExecRequest::new(format!("{}{code}", r_load_hostile()));
    req.timeout = Some(time_limit);
    req
}

/// Runs `req`, returning the execution and how long the claim → result took.
fn timed(tp: &TestPool, req: ExecRequest) -> (Ran, Duration) {
    let started = Instant::now();
    let exec = tp.pool.claim(req).expect("claim a sandbox");
    let out = exec.wait();
    let took = started.elapsed();
    (tp.finish_execution(out), took)
}

/// A partial frame header followed by a spin or a sleep cannot hold the time limit: the
/// run ends `timed_out` at its limit and the sandbox is dead by the time the result is
/// out (the result is sent after the sandbox's process has exited).
#[test]
fn a_partial_frame_cannot_hold_the_time_limit() {
    let tp = r_pool(2);
    // Long enough for the code to reach its attack before the limit even in the emulated
    // cgroup v2 guest, where a thawed sandbox's first page faults can take seconds: the
    // bound under test is what comes after the limit.
    let limit = Duration::from_secs(6);
    for attack in [
        "hostile_partial_header_spin",
        "hostile_partial_header_sleep",
    ] {
        let (ran, took) = timed(
            &tp,
            hostile(&format!("cat('attacking\\n'); .C('{attack}')"), limit),
        );
        ran.assert_status(ExecStatus::TimedOut);
        assert!(ran.stdout().contains("attacking"), "{}", ran.describe());
        let past = took.saturating_sub(limit);
        eprintln!(
            "{attack}: deadline → dead sandbox {:.1} ms",
            past.as_secs_f64() * 1e3
        );
        assert!(
            took >= limit && past < Duration::from_millis(1500),
            "{attack}: the result came {took:?} after the claim for a {limit:?} limit\n{}",
            ran.describe()
        );
    }
    tp.finish();
}

/// A cancel is acted on while the sandbox sits on a half-written frame.
#[test]
fn a_cancel_is_never_blocked_by_a_partial_frame() {
    let tp = r_pool(1);
    let exec = tp
        .pool
        .claim(hostile(
            "cat('attacking\\n'); .C('hostile_partial_header_spin')",
            Duration::from_secs(60),
        ))
        .expect("claim");
    // Wait until the code is past the attack's first frame.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = exec
            .events()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the execution reports before the deadline");
        let go = matches!(&e, Event::Stdout { data } if data.windows(9).any(|w| w == b"attacking"));
        events.push(e);
        if go {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    exec.cancel();
    // The result comes as soon as the runtime has stopped the run; the teardown of the
    // sandbox (the channel closes after it) is timed on its own, with a bound that holds
    // under software emulation too.
    let result = loop {
        let e = exec
            .events()
            .recv_timeout(Duration::from_secs(30))
            .expect("the execution finishes after a cancel");
        if let Event::Finished(r) = &e {
            let r = (**r).clone();
            events.push(e);
            break r;
        }
        events.push(e);
    };
    let latency = asked.elapsed();
    // The channel closes when the runtime is done with the sandbox.
    events.extend(exec.events().iter());
    let torn_down = asked.elapsed();
    let ran = tp.finish_execution((events, result));
    ran.assert_status(ExecStatus::Cancelled);
    eprintln!(
        "under a partial frame: cancel → result {:.1} ms, → sandbox torn down {:.1} ms",
        latency.as_secs_f64() * 1e3,
        torn_down.as_secs_f64() * 1e3
    );
    assert!(
        latency < Duration::from_secs(2),
        "the cancel took {latency:?}\n{}",
        ran.describe()
    );
    assert!(
        torn_down < Duration::from_secs(10),
        "the sandbox was torn down {torn_down:?} after the cancel\n{}",
        ran.describe()
    );
    tp.finish();
}

/// Every malformed, oversize, out-of-order or descriptor-carrying frame ends the run at
/// once with `protocol_violation` (the time limit is far away), names what was wrong, and
/// leaves the pool serving.
#[test]
fn protocol_violations_end_the_run_at_once() {
    let tp = r_pool(2);
    let cases: &[(&str, &str)] = &[
        (".C('hostile_garbage')", "unknown frame kind"),
        (".C('hostile_huge_length')", "more than"),
        (".C('hostile_empty_frame')", "empty frame"),
        (".C('hostile_forged_started')", "started frame where"),
        (".C('hostile_forged_ready')", "ready frame where"),
        (".C('hostile_forged_finished_with_status')", "unknown field"),
        (".C('hostile_bad_value')", "not JSON"),
        (".C('hostile_bad_progress')", "not a number"),
        (
            "r <- .C('hostile_scm_rights', r = integer(1))$r; cat('sendmsg', r, '\\n')",
            "descriptors",
        ),
        (
            ".C('hostile_progress_flood', n = 1L, len = 2000L)",
            "message too long",
        ),
    ];
    for (code, why) in cases {
        let (ran, took) = timed(&tp, hostile(code, Duration::from_secs(60)));
        ran.assert_status(ExecStatus::ProtocolViolation);
        let error = ran.result.error.clone().unwrap_or_default();
        assert!(
            error.contains("protocol violation") && error.contains(why),
            "{code}: error {error:?} does not say {why:?}\n{}",
            ran.describe()
        );
        assert!(
            took < Duration::from_secs(20),
            "{code}: took {took:?}: ended by something else than the violation"
        );
        // The pool serves the next claim as if nothing happened.
        let next = tp.run_code("sum(1:10)");
        next.assert_status(ExecStatus::Succeeded);
        assert_eq!(next.value(), serde_json::json!(55), "{}", next.describe());
    }
    tp.finish();
}

/// Artifact frames written by the code itself: the pool holds at most what the run asked
/// for (count and bytes) and ends the run `protocol_violation` at the first frame beyond
/// it, or at any artifact when none was asked for, or at a name that is not a plain file
/// name. Nothing past the limits is kept in memory; the pool serves on.
#[test]
fn forged_artifacts_beyond_what_was_asked_end_the_run() {
    let tp = r_pool(2);
    let limits = hatchery_sandbox::pool::ArtifactLimits {
        max_count: 3,
        max_bytes: 200_000,
    };
    let forge = |name: &str, n: u32, len: u32, distinct: bool| {
        format!(
            ".C('hostile_artifacts', name = '{name}', n = {n}L, len = {len}L, distinct = {}L)",
            distinct as i32
        )
    };
    let cases: Vec<(String, bool, &str)> = vec![
        (
            forge("a.png", 1, 10, false),
            false,
            "no artifacts were asked for",
        ),
        (
            forge("x", 4, 10, true),
            true,
            "more artifacts than the limit",
        ),
        (
            forge("big.bin", 5, 60_000, false),
            true,
            "more artifact bytes than the limit",
        ),
        (
            forge("../../etc/passwd", 1, 10, false),
            true,
            "not a valid artifact name",
        ),
        (
            forge(".hidden", 1, 10, false),
            true,
            "not a valid artifact name",
        ),
        (
            ".C('hostile_artifact_long_name')".to_string(),
            true,
            "the name is longer than the frame",
        ),
    ];
    for (code, asked, why) in &cases {
        let mut req = hostile(code, Duration::from_secs(60));
        if *asked {
            req.artifacts = Some(limits);
        }
        let (ran, took) = timed(&tp, req);
        ran.assert_status(ExecStatus::ProtocolViolation);
        let error = ran.result.error.clone().unwrap_or_default();
        assert!(
            error.contains("protocol violation") && error.contains(why),
            "{code}: error {error:?} does not say {why:?}\n{}",
            ran.describe()
        );
        assert!(
            !ran.events
                .iter()
                .any(|e| matches!(e, Event::Artifact { .. })),
            "{code}: an artifact of a violating run was passed on\n{}",
            ran.describe()
        );
        assert!(
            took < Duration::from_secs(20),
            "{code}: took {took:?}: ended by something else than the violation"
        );
    }
    // Within the limits, forged pieces are just artifacts (the code may write what it
    // likes to its own channel): appended under their names, in order, and no more.
    let mut req = hostile(
        &format!(
            "{}; {}",
            forge("x", 3, 1000, true),
            forge("x0", 2, 50, false)
        ),
        Duration::from_secs(60),
    );
    req.artifacts = Some(limits);
    let (ran, _) = timed(&tp, req);
    ran.assert_status(ExecStatus::Succeeded);
    let got: Vec<(String, usize)> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Artifact { name, data } => Some((name.clone(), data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("x0".into(), 1100),
            ("x1".into(), 1000),
            ("x2".into(), 1000)
        ],
        "{}",
        ran.describe()
    );
    let next = tp.run_code("sum(1:10)");
    next.assert_status(ExecStatus::Succeeded);
    tp.finish();
}

/// A violation in one sandbox has no effect on another running at the same time.
#[test]
fn a_violation_does_not_touch_a_concurrent_execution() {
    let tp = r_pool(2);
    let steady = tp
        .pool
        .claim(request(
            "for (i in 1:20) { cat(i, '\\n'); Sys.sleep(0.05) }; 'steady'",
        ))
        .expect("claim");
    let (bad, _) = timed(
        &tp,
        hostile(".C('hostile_garbage')", Duration::from_secs(30)),
    );
    bad.assert_status(ExecStatus::ProtocolViolation);
    let ok = tp.finish_execution(steady.wait());
    ok.assert_status(ExecStatus::Succeeded);
    assert_eq!(ok.value(), serde_json::json!("steady"), "{}", ok.describe());
    let lines: Vec<u32> = ok
        .stdout()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(lines, (1..=20).collect::<Vec<u32>>(), "{}", ok.describe());
    tp.finish();
}

/// A value and `finished` written by native code end the execution right there, as if
/// the code had returned that value and quit: nothing after it runs, and the result
/// carries only what a sandbox may claim — the timings and usage are the owner's.
#[test]
fn a_result_written_by_native_code_ends_the_run_and_claims_nothing_else() {
    let tp = r_pool(1);
    let (ran, took) = timed(
        &tp,
        hostile(
            "cat('before\\n'); .C('hostile_forged_finished'); cat('after\\n'); 'real'",
            Duration::from_secs(60),
        ),
    );
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(
        ran.value(),
        serde_json::json!("forged"),
        "{}",
        ran.describe()
    );
    assert!(ran.stdout().contains("before"), "{}", ran.describe());
    assert!(
        !ran.stdout().contains("after"),
        "code ran after its result\n{}",
        ran.describe()
    );
    let t = &ran.result.timings;
    let start = t
        .start_ms
        .expect("the start mark came from the sandbox before its code");
    assert!(
        start > 0.0 && start < t.total_ms && t.total_ms <= took.as_secs_f64() * 1e3,
        "timings are not the owner's: {t:?} (claim → result {took:?})"
    );
    assert!(
        ran.result.usage.memory_peak_bytes > 1 << 20,
        "usage does not come from the cgroup: {:?}",
        ran.result.usage
    );
    tp.finish();
}

/// Output is bounded and never silent: 100 MB from R's console, from a child process or
/// written natively on the channel end `output_limit` with the stream flagged, delivered
/// in events of at most 64 KiB that add up to exactly the limit.
#[test]
fn output_floods_end_output_limit_in_bounded_events() {
    let tp = r_pool(2);
    let limit: u64 = 1 << 20;
    let cases: &[(&str, bool)] = &[
        ("cat(strrep('x', 1e8)); 'after'", true),
        (
            "system('head -c 100000000 /dev/zero | tr \"\\\\\\\\0\" x'); 'after'",
            true,
        ),
        (
            ".C('hostile_output_flood', n = 2000L, len = 65536L); 'after'",
            true,
        ),
        ("message(strrep('y', 5e6)); 'after'", false),
    ];
    for (code, stdout) in cases {
        let mut req = hostile(code, Duration::from_secs(60));
        req.output_limit = limit;
        let (ran, _) = timed(&tp, req);
        ran.assert_status(ExecStatus::OutputLimit);
        let (flag, other) = if *stdout {
            (ran.result.stdout_truncated, ran.result.stderr_truncated)
        } else {
            (ran.result.stderr_truncated, ran.result.stdout_truncated)
        };
        assert!(
            flag && !other,
            "{code}: truncation flags\n{}",
            ran.describe()
        );
        let mut total = 0usize;
        for e in &ran.events {
            if let Event::Stdout { data } | Event::Stderr { data } = e {
                assert!(
                    data.len() <= MAX_DATA,
                    "{code}: an event of {} bytes",
                    data.len()
                );
                total += data.len();
            }
        }
        // Everything up to the limit is delivered, nothing beyond it (the loaded
        // library's own few bytes of output count too).
        assert!(
            total as u64 <= limit && total as u64 >= limit - 4096,
            "{code}: {total} bytes delivered for a limit of {limit}\n{}",
            ran.describe()
        );
        assert!(
            ran.result.outcome.value_json.is_none(),
            "{code}: the code went on"
        );
    }
    tp.finish();
}

/// A flood of `progress()` calls (200,000) becomes at most 20 progress events per second
/// (the last value kept); native floods of progress frames count against the output
/// limit.
#[test]
fn progress_floods_are_coalesced_and_counted() {
    let tp = r_pool(1);
    let (ran, took) = timed(
        &tp,
        hostile(
            "for (i in 1:200000) progress(i / 2e5, 'x'); 'done'",
            Duration::from_secs(300),
        ),
    );
    ran.assert_status(ExecStatus::Succeeded);
    let progress: Vec<(f64, &str)> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Progress { fraction, message } => Some((*fraction, message.as_str())),
            _ => None,
        })
        .collect();
    let allowed = (took.as_secs_f64() / PROGRESS_INTERVAL.as_secs_f64()).ceil() as usize + 2;
    eprintln!(
        "2e5 progress() calls in {took:?}: {} progress events",
        progress.len()
    );
    assert!(
        !progress.is_empty() && progress.len() <= allowed,
        "{} progress events in {took:?} (at most {allowed})",
        progress.len()
    );
    assert_eq!(
        progress.last().map(|p| p.0),
        Some(1.0),
        "the last value is kept"
    );

    let mut req = hostile(
        ".C('hostile_progress_flood', n = 200000L, len = 1024L); 'after'",
        Duration::from_secs(60),
    );
    req.output_limit = 4 << 20;
    let (ran, _) = timed(&tp, req);
    ran.assert_status(ExecStatus::OutputLimit);
    tp.finish();
}

/// Output events come out at a bounded rate: a print every millisecond for a second is
/// merged into far fewer events than prints, none lost.
#[test]
fn chatty_output_is_merged_at_a_bounded_rate() {
    let tp = r_pool(1);
    let (ran, took) = timed(
        &tp,
        request("for (i in 1:1000) { cat(i, '\\n'); Sys.sleep(0.001) }"),
    );
    ran.assert_status(ExecStatus::Succeeded);
    let n = ran
        .events
        .iter()
        .filter(|e| matches!(e, Event::Stdout { .. }))
        .count();
    let allowed = (took.as_secs_f64() / OUTPUT_INTERVAL.as_secs_f64()).ceil() as usize + 2;
    assert!(
        n <= allowed,
        "{n} stdout events in {took:?} (at most {allowed})"
    );
    let numbers: Vec<u32> = ran
        .stdout()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers, (1..=1000).collect::<Vec<u32>>());
    tp.finish();
}

/// Bytes that are not UTF-8 come out exactly as written.
#[test]
fn output_bytes_are_carried_exactly() {
    let tp = r_pool(1);
    let ran = tp.run_code(
        "cat(rawToChar(as.raw(c(0x61, 0xff, 0x62, 0xc3, 0xa9, 0x0a)))); \
         system('printf \"\\\\376\\\\n\"'); invisible(NULL)",
    );
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(
        ran.stdout_bytes(),
        b"a\xffb\xc3\xa9\n\xfe\n",
        "{}",
        ran.describe()
    );
    tp.finish();
}

/// Runs R code in a sandbox that stays alive until told (it waits for `go` in its own
/// loop), printing `ready` once set up; returns the execution.
fn hold_open(tp: &TestPool, setup: &str, report: &str) -> hatchery_sandbox::pool::Execution {
    let code = format!("{setup}\ncat('ready\\n')\nSys.sleep(4)\n{report}");
    tp.pool
        .claim(hostile(&code, Duration::from_secs(60)))
        .expect("claim")
}

fn wait_ready(exec: &hatchery_sandbox::pool::Execution) -> Vec<Event> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = exec
            .events()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no `ready` from the holding sandbox: {seen:?}"));
        let ready =
            matches!(&e, Event::Stdout { data } if String::from_utf8_lossy(data).contains("ready"));
        if let Event::Finished(r) = &e {
            panic!("the holding sandbox ended before `ready`: {r:?}\n{seen:?}");
        }
        seen.push(e);
        if ready {
            return seen;
        }
    }
}

/// R: `seen` = how many processes of this sandbox's /proc have `token` on their
/// command line (to be formatted with `token` in scope).
macro_rules! scan {
    () => {
        "seen <- 0; for (d in list.files('/proc', pattern = '^[0-9]+$', full.names = TRUE)) \
         if (any(grepl(token, tryCatch(readLines(file.path(d, 'cmdline'), warn = FALSE), \
         error = function(e) '')))) seen <- seen + 1"
    };
}

/// Two sandboxes running at the same time cannot reach each other: a lock one holds on
/// an image file does not stop the other taking it, an inotify watch of one sees nothing
/// of the other's opens, the other cannot connect to its abstract socket, cannot signal
/// (or even address) any process but its own, and sees none of its processes in /proc.
#[test]
fn two_running_sandboxes_cannot_reach_each_other() {
    let tp = r_pool(2);
    let token = unique_token("hatchery-xs");
    let file = "/usr/lib/R/etc/Renviron";
    const SCAN: &str = scan!();
    let holder = hold_open(
        &tp,
        &format!(
            "token <- '{token}'\n\
             stopifnot(.C('xs_hold_lock', '{file}', r = integer(1))$r == 0)\n\
             stopifnot(.C('xs_listen_abstract', '{token}', r = integer(1))$r == 0)\n\
             stopifnot(.C('xs_watch', '{file}', r = integer(1))$r == 0)\n\
             invisible(.C('xs_watch_count', r = integer(1)))\n\
             system(\"bash -c 'exec -a {token} sleep 30' &\")\n\
             {SCAN}"
        ),
        &format!(
            "token <- '{token}'\n\
             cat('watch-events', .C('xs_watch_count', r = integer(1))$r, '\\n')\n\
             {SCAN}\ncat('self-proc', seen, '\\n')"
        ),
    );
    let mut events = wait_ready(&holder);
    // The marked process is the one whose argv[0] is the token, once `exec -a` is done:
    // until then the shells that start it carry the token further along their command
    // lines, and a process's command line reads empty while it execs.
    let marked = || {
        host_processes_with(&token)
            .iter()
            .filter(|(_, cmdline)| cmdline.split(' ').next() == Some(token.as_str()))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while marked() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        marked(),
        1,
        "the holding sandbox's marked process runs: {:?}",
        host_processes_with(&token)
    );
    let visitor = tp.run(hostile(
        &format!(
            "token <- '{token}'\ncat('lock', .C('xs_try_lock', '{file}', r = integer(1))$r, '\\n')\n\
             cat('connect', .C('xs_connect_abstract', '{token}', r = integer(1))$r, '\\n')\n\
             invisible(.C('xs_touch', '{file}', n = 20L))\n\
             cat('signals', .C('xs_signal_scan', r = integer(1))$r, '\\n')\n\
             {SCAN}\n\
             cat('proc', seen, '\\n')"
        ),
        Duration::from_secs(60),
    ));
    visitor.assert_status(ExecStatus::Succeeded);
    let out = visitor.stdout();
    let field = |key: &str| -> i64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} line\n{}", visitor.describe()))
    };
    assert_eq!(
        field("lock"),
        0,
        "the lock held by the other sandbox is visible"
    );
    assert_eq!(
        field("connect"),
        -(libc::ECONNREFUSED as i64),
        "the other sandbox's abstract socket is reachable"
    );
    assert_eq!(field("signals"), 0, "another process can be signalled");
    assert_eq!(field("proc"), 0, "the other sandbox's process is in /proc");
    let (rest, result) = holder.wait();
    events.extend(rest);
    let held = tp.finish_execution((events, result));
    held.assert_status(ExecStatus::Succeeded);
    assert!(
        held.stdout().contains("watch-events 0"),
        "the watch saw the other sandbox's opens\n{}",
        held.describe()
    );
    // The same /proc scan finds the marked process in its own sandbox.
    assert!(
        held.stdout().contains("self-proc 1"),
        "the /proc scan does not find what it looks for\n{}",
        held.describe()
    );
    assert!(
        host_processes_with(&token).is_empty(),
        "the marked process outlived its sandbox"
    );
    tp.finish();
}

/// One sandbox exhausting its inotify instances does not stop another: each has its own
/// uid, and each uid of the zygote's namespace its own cap.
#[test]
fn inotify_exhaustion_stays_in_its_own_sandbox() {
    let tp = r_pool(2);
    let report = "r <- .C('xs_inotify_exhaust', n = integer(1), e = integer(1)); \
                  cat('inotify', r$n, r$e, '\\n')";
    let greedy = hold_open(&tp, report, "invisible(NULL)");
    let mut events = wait_ready(&greedy);
    let other = tp.run(hostile(report, Duration::from_secs(60)));
    other.assert_status(ExecStatus::Succeeded);
    let (rest, result) = greedy.wait();
    events.extend(rest);
    let greedy = tp.finish_execution((events, result));
    greedy.assert_status(ExecStatus::Succeeded);
    let parse = |ran: &Ran| -> (u32, i32) {
        let line = ran
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("inotify ").map(str::to_string))
            .unwrap_or_else(|| panic!("no inotify line\n{}", ran.describe()));
        let mut it = line.split_whitespace();
        (
            it.next().unwrap().parse().unwrap(),
            it.next().unwrap().parse().unwrap(),
        )
    };
    let (a, a_err) = parse(&greedy);
    let (b, b_err) = parse(&other);
    let cap = hatchery_sandbox::pool::PoolConfig::new(
        hatchery_sandbox::zygote::server::Language::R { packages: vec![] },
        "/".into(),
    )
    .inotify_instances as u32;
    assert_eq!(
        (a, a_err),
        (cap, libc::EMFILE),
        "the first sandbox's instances"
    );
    assert_eq!(
        (b, b_err),
        (cap, libc::EMFILE),
        "the second sandbox, while the first holds all of its own"
    );
    tp.finish();
}

/// A pooled sandbox's view of its mounts names no path of the host: not the image's
/// directory, not the staging directories, not the zygote's binary.
#[test]
fn no_host_path_in_a_pooled_sandboxs_mountinfo() {
    let tp = r_pool(1);
    let ran = tp.run_code("cat(readLines('/proc/self/mountinfo'), sep = '\\n')");
    ran.assert_status(ExecStatus::Succeeded);
    let mountinfo = ran.stdout();
    let image = std::fs::canonicalize(hatchery_tests::rootfs()).expect("the image");
    let zygote = hatchery_tests::target_profile_dir().join("hatchery-zygote");
    for host_path in [
        image.display().to_string(),
        "/var/lib/hatchery".to_string(),
        "/run/hatchery".to_string(),
        zygote.display().to_string(),
        hatchery_tests::target_profile_dir().display().to_string(),
    ] {
        assert!(
            !mountinfo.contains(&host_path),
            "{host_path} appears in the sandbox's mountinfo:\n{mountinfo}"
        );
    }
    // The root is the sandbox's own overlay.
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(root.contains(" - overlay "), "{root}");
    tp.finish();
}
