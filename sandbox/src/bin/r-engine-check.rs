//! `r-engine-check`: drives the embedded R engine (`hatchery_sandbox::r`) for the tests in
//! `sandbox/tests/r_engine.rs`, one scenario per subcommand, and prints one JSON document
//! on stdout. R can start only once per process, so each test runs this binary.
//!
//! ```text
//! r-engine-check eval CODE...            init, then evaluate each CODE in this process
//! r-engine-check preload PKG... -- CODE  init, preload PKGs, report threads, evaluate CODE
//! r-engine-check fork                    zygote with MASS+Matrix, children evaluate code
//! r-engine-check fork-eval PKG... -- CODE  zygote with PKGs, one child evaluates CODE
//! r-engine-check timings [N]             init / preload / fork-to-first-output timings
//! ```
//!
//! This binary is single-threaded (the zygote must be to fork safely).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hatchery_sandbox::r::{self, EvalOutcome, OutputStream, REngine, REngineOptions};
use serde_json::{json, Value};

/// Console output captured by the output hook, in order.
static OUTPUT: Mutex<Vec<(OutputStream, Vec<u8>)>> = Mutex::new(Vec::new());
/// Progress calls captured by the progress hook.
static PROGRESS: Mutex<Vec<(f64, String)>> = Mutex::new(Vec::new());
/// In a timing child: the pipe output is written to.
static PIPE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn capture_output(stream: OutputStream, bytes: &[u8]) {
    let mut out = OUTPUT.lock().unwrap_or_else(|e| e.into_inner());
    out.push((stream, bytes.to_vec()));
}

fn capture_progress(value: f64, message: &str) {
    let mut p = PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
    p.push((value, message.to_string()));
}

fn pipe_output(_stream: OutputStream, bytes: &[u8]) {
    let fd = PIPE_FD.load(std::sync::atomic::Ordering::Relaxed);
    r::write_fd(fd, bytes);
}

/// Takes what the hooks captured since the last call.
fn take_captured() -> Value {
    let out = std::mem::take(&mut *OUTPUT.lock().unwrap_or_else(|e| e.into_inner()));
    let progress = std::mem::take(&mut *PROGRESS.lock().unwrap_or_else(|e| e.into_inner()));
    let text = |want: OutputStream| {
        let bytes: Vec<u8> = out
            .iter()
            .filter(|(s, _)| *s == want)
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    json!({
        "stdout": text(OutputStream::Stdout),
        "stderr": text(OutputStream::Stderr),
        "progress": progress.iter().map(|(v, m)| json!({"value": v, "message": m})).collect::<Vec<_>>(),
    })
}

fn outcome_json(o: &EvalOutcome, started: Instant) -> Value {
    json!({
        "ok": o.ok,
        "value_json": o.value_json,
        "value_class": o.value_class,
        "error": o.error,
        "warnings": o.warnings,
        "first_statement_after_us": o.first_statement_at.map(|t| t.duration_since(started).as_micros() as u64),
    })
}

/// Evaluates `code` and returns the outcome with the output it printed.
fn eval_captured(engine: &REngine, code: &str) -> Value {
    let started = Instant::now();
    let outcome = engine.eval(code);
    let mut v = take_captured();
    v["outcome"] = outcome_json(&outcome, started);
    v
}

fn start_engine(packages: &[&str]) -> Result<(REngine, Duration, Duration)> {
    let opts = REngineOptions {
        packages: packages.iter().map(|s| s.to_string()).collect(),
        ..REngineOptions::default()
    };
    r::set_output_hook(Some(capture_output));
    r::set_progress_hook(Some(capture_progress));
    let t = Instant::now();
    let engine = REngine::init(&opts)?;
    let init = t.elapsed();
    let t = Instant::now();
    engine.preload(&opts.packages)?;
    engine.full_gc();
    let preload = t.elapsed();
    Ok((engine, init, preload))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        bail!("usage: r-engine-check eval|preload|fork|timings ...");
    };
    let report = match command.as_str() {
        "eval" => cmd_eval(&args[1..])?,
        "preload" => cmd_preload(&args[1..])?,
        "fork" => cmd_fork()?,
        "fork-eval" => cmd_fork_eval(&args[1..])?,
        "timings" => cmd_timings(args.get(1).map(|n| n.parse()).transpose()?.unwrap_or(20))?,
        other => bail!("unknown subcommand {other:?}"),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn cmd_eval(codes: &[String]) -> Result<Value> {
    let (engine, _, _) = start_engine(&[])?;
    take_captured();
    let results: Vec<Value> = codes.iter().map(|c| eval_captured(&engine, c)).collect();
    Ok(json!({ "results": results }))
}

fn cmd_preload(args: &[String]) -> Result<Value> {
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let packages: Vec<&str> = args[..split].iter().map(String::as_str).collect();
    let code = args.get(split + 1).map(String::as_str).unwrap_or("NULL");
    let threads_before = r::thread_count();
    match start_engine(&packages) {
        Ok((engine, init, preload)) => {
            take_captured();
            let threads = r::thread_count();
            let result = eval_captured(&engine, code);
            Ok(json!({
                "threads_before_init": threads_before,
                "threads_after_preload": threads,
                "init_ms": init.as_secs_f64() * 1e3,
                "preload_ms": preload.as_secs_f64() * 1e3,
                "result": result,
            }))
        }
        Err(e) => Ok(json!({ "error": e.to_string(), "threads_before_init": threads_before })),
    }
}

/// Forks a child that runs `child` with the engine, returns its exit code and the JSON
/// line it wrote to the pipe.
fn run_child(engine: &REngine, child: impl FnOnce(&REngine) -> Value) -> Result<(i32, Value)> {
    let (read, write) = pipe()?;
    // SAFETY: this process is single-threaded (checked by the caller's thread count),
    // so the child owns a consistent copy of every lock and of R.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(read);
        let mut line = serde_json::to_vec(&child(engine)).unwrap_or_default();
        line.push(b'\n');
        r::write_fd(write.as_raw_fd(), &line);
        r::exit_child(0);
    }
    drop(write);
    let mut text = String::new();
    std::fs::File::from(read).read_to_string(&mut text)?;
    let code = wait(pid)?;
    let value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    Ok((code, value))
}

fn wait(pid: libc::pid_t) -> Result<i32> {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            return Ok(-1); // SIGCHLD is ignored: the kernel reaped it, status unknown
        }
        bail!("waitpid: {err}");
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn child_eval(engine: &REngine, tmpdir: &Path, code: &str) -> Value {
    take_captured();
    let prepared = engine.prepare_child(tmpdir).map_err(|e| e.to_string());
    let mut v = eval_captured(engine, code);
    v["prepared"] = json!(prepared.err());
    v["pid"] = json!(std::process::id());
    v
}

fn cmd_fork() -> Result<Value> {
    let (engine, init, preload) = start_engine(&["MASS", "Matrix"])?;
    let threads = r::thread_count();
    if threads != 1 {
        bail!("zygote has {threads} threads; it cannot fork safely");
    }
    take_captured();
    let zygote_tempdir = eval_captured(&engine, "cat(tempdir())")["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let base = std::env::temp_dir().join(format!("r-engine-check-{}", std::process::id()));
    let dirs: Vec<PathBuf> = (0..3).map(|i| base.join(format!("child{i}"))).collect();

    let code = "cat(runif(1)); cat('\\n'); cat(tempdir()); cat('\\n'); \
                cat(file.exists(tempdir())); x <- 1; assign('g', 1, envir = globalenv()); \
                invisible(file.create(tempfile()))";
    let (code1, child1) = run_child(&engine, |e| child_eval(e, &dirs[0], code))?;
    let (code2, child2) = run_child(&engine, |e| child_eval(e, &dirs[1], code))?;
    let (code3, child3) = run_child(&engine, |e| {
        child_eval(e, &dirs[2], "c(exists('x'), exists('g'))")
    })?;
    // A child that quits through R: R's own clean-up would delete the zygote's temp dir.
    let (quit_code, _) = run_child(&engine, |e| {
        child_eval(e, &base.join("quitter"), "cat('bye\\n'); q(status = 3)")
    })?;
    // prepare_child refuses to run in the zygote itself.
    let zygote_prepare = engine
        .prepare_child(&base.join("zygote"))
        .err()
        .map(|e| e.to_string());
    let zygote_after = eval_captured(
        &engine,
        "c(exists('x'), exists('g'), file.exists(tempdir()))",
    );
    let zygote_tempdir_exists = Path::new(&zygote_tempdir).is_dir();
    let _ = std::fs::remove_dir_all(&base);
    Ok(json!({
        "init_ms": init.as_secs_f64() * 1e3,
        "preload_ms": preload.as_secs_f64() * 1e3,
        "zygote_tempdir": zygote_tempdir,
        "zygote_tempdir_exists": zygote_tempdir_exists,
        "children": [
            {"exit": code1, "dir": dirs[0], "result": child1},
            {"exit": code2, "dir": dirs[1], "result": child2},
            {"exit": code3, "dir": dirs[2], "result": child3},
        ],
        "quit_exit": quit_code,
        "zygote_prepare_error": zygote_prepare,
        "zygote_after": zygote_after,
    }))
}

fn cmd_fork_eval(args: &[String]) -> Result<Value> {
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let packages: Vec<&str> = args[..split].iter().map(String::as_str).collect();
    let code = args.get(split + 1).map(String::as_str).unwrap_or("NULL");
    let (engine, _, _) = start_engine(&packages)?;
    let threads = r::thread_count();
    if threads != 1 {
        bail!("zygote has {threads} threads; it cannot fork safely");
    }
    take_captured();
    // Like a zygote that lets the kernel reap its children: the child must undo it
    // (prepare_child) or R's system() and parallel's forks cannot wait for theirs.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let dir = std::env::temp_dir().join(format!("r-engine-fork-eval-{}", std::process::id()));
    let (exit, result) = run_child(&engine, |e| child_eval(e, &dir, code))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "zygote_threads_after_child": r::thread_count(),
        "exit": exit,
        "result": result,
    }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn cmd_timings(n: usize) -> Result<Value> {
    let (engine, init, preload) = start_engine(&["MASS", "Matrix", "survival"])?;
    let threads = r::thread_count();
    if threads != 1 {
        bail!("zygote has {threads} threads; it cannot fork safely");
    }
    take_captured();
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()));
    let gc = eval_captured(&engine, "g <- gc(); cat(g[, 1], g[, 3], '\\n')");
    let base = std::env::temp_dir().join(format!("r-engine-timings-{}", std::process::id()));

    let mut first_output = Vec::new();
    let mut whole = Vec::new();
    let mut first_output_prepared = Vec::new();
    let mut lm_first_output = Vec::new();
    for i in 0..n {
        for (prepare, code, out) in [
            (false, "sum(1:10)", &mut first_output),
            (true, "sum(1:10)", &mut first_output_prepared),
            (
                true,
                "summary(lm(dist ~ speed, cars))$r.squared",
                &mut lm_first_output,
            ),
        ] {
            let dir = base.join(format!("{i}-{prepare}-{}", code.len()));
            let (read, write) = pipe()?;
            let t0 = Instant::now();
            // SAFETY: single-threaded (checked above).
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                bail!("fork: {}", std::io::Error::last_os_error());
            }
            if pid == 0 {
                drop(read);
                PIPE_FD.store(write.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
                r::set_output_hook(Some(pipe_output));
                if prepare && engine.prepare_child(&dir).is_err() {
                    r::exit_child(1);
                }
                engine.eval(code);
                r::exit_child(0);
            }
            drop(write);
            let mut file = std::fs::File::from(read);
            let mut buf = [0u8; 4096];
            let n = file.read(&mut buf)?;
            let t_first = t0.elapsed();
            if n == 0 {
                bail!("child printed nothing");
            }
            let mut rest = Vec::new();
            file.read_to_end(&mut rest)?;
            wait(pid)?;
            out.push(t_first.as_secs_f64() * 1e3);
            if !prepare {
                whole.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let mut go_to_first_output = Vec::new();
    for i in 0..n {
        go_to_first_output.push(prepared_go_to_first_output(
            &engine,
            &base.join(format!("go{i}")),
        )?);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(json!({
        "runs": n,
        "median_prepared_child_go_to_first_output_sum_ms": median(go_to_first_output),
        "init_ms": init.as_secs_f64() * 1e3,
        "preload_mass_matrix_survival_gc_ms": preload.as_secs_f64() * 1e3,
        "zygote_rss": rss_kb,
        "zygote_gc_used_and_trigger": gc["stdout"],
        "threads_after_preload": threads,
        "median_fork_to_first_output_sum_ms": median(first_output),
        "median_fork_to_exit_sum_ms": median(whole),
        "median_fork_prepare_to_first_output_sum_ms": median(first_output_prepared),
        "median_fork_prepare_to_first_output_lm_ms": median(lm_first_output),
    }))
}

/// The claim path without cgroups: a child forked and prepared in advance waits on a
/// pipe; the time from the parent's "go" byte to the child's first output.
fn prepared_go_to_first_output(engine: &REngine, dir: &Path) -> Result<f64> {
    let (out_read, out_write) = pipe()?;
    let (go_read, go_write) = pipe()?;
    // SAFETY: single-threaded (checked by the caller).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(out_read);
        drop(go_write);
        PIPE_FD.store(out_write.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
        r::set_output_hook(Some(pipe_output));
        if engine.prepare_child(dir).is_err() {
            r::exit_child(1);
        }
        r::write_fd(out_write.as_raw_fd(), b"R");
        let mut byte = [0u8; 1];
        let _ = std::fs::File::from(go_read).read(&mut byte);
        engine.eval("sum(1:10)");
        r::exit_child(0);
    }
    drop(out_write);
    drop(go_read);
    let mut out = std::fs::File::from(out_read);
    let mut buf = [0u8; 4096];
    if out.read(&mut buf)? != 1 {
        bail!("child did not get ready");
    }
    let t0 = Instant::now();
    r::write_fd(go_write.as_raw_fd(), b"G");
    if out.read(&mut buf)? == 0 {
        bail!("child printed nothing");
    }
    let elapsed = t0.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    wait(pid)?;
    Ok(elapsed)
}
