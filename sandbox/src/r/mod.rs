//! The embedded R engine of the zygote: R initialised once in this process through
//! libR, packages preloaded, then forked children that each evaluate one user's code.
//!
//! This module owns R's process-global state: start-up ([`REngine::init`]), the console
//! (output to an [`OutputHook`] or unbuffered to fd 1/2, see [`console`]), the
//! `progress()` function user code calls (attached to the search path as `hatchery`,
//! reaching Rust through a registered `.Call` routine and a [`ProgressHook`]), turning a
//! forked child into a fresh session ([`REngine::prepare_child`]: RNG from the kernel,
//! own temp dir) and the evaluation of user code ([`REngine::eval`]).
//!
//! What it must never do:
//! - let an R error `longjmp` into Rust: every evaluation goes through
//!   `R_tryEvalSilent`, and R code of its own traps errors and returns data;
//! - start a thread, or let R start one (BLAS/OpenMP are pinned to one thread before
//!   R starts, and [`REngine::preload`] refuses a package that started threads): the
//!   zygote forks, and a fork copies only the calling thread;
//! - run R's clean-up in a forked child (`Rf_endEmbeddedR`, `R_CleanUp`): it deletes
//!   the temp dir R made at start-up, which belongs to the zygote. Children leave
//!   through [`exit_child`]; `q()` in user code is routed there too;
//! - be used from two threads: [`REngine`] is neither `Send` nor `Sync`, and
//!   [`REngine::init`] succeeds once per process.

mod console;
mod ffi;

use std::cell::Cell;
use std::ffi::{c_char, c_int, CString};
use std::marker::PhantomData;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use libR_sys::{
    R_BaseEnv, R_CStackLimit, R_CallMethodDef, R_FlushConsole, R_GlobalEnv, R_NilValue,
    R_PreserveObject, R_ReleaseObject, R_getEmbeddingDllInfo, R_registerRoutines, Rf_ScalarLogical,
    Rf_allocVector, Rf_asLogical, Rf_findVarInFrame, Rf_initialize_R, Rf_isFunction, Rf_lang1,
    Rf_lang2, Rf_lang3, Rf_mkString, Rf_xlength, DL_FUNC, INTEGER, REAL, SEXP, SEXPTYPE,
};

pub use console::{
    in_forked_child, set_output_hook, set_progress_hook, write_fd, OutputHook, OutputStream,
    ProgressHook,
};

use ffi::ProtectScope;

/// Hatchery's R code: the evaluator, `progress()`, the child's reseeding, JSON.
const ENGINE_R: &str = include_str!("engine.R");

/// Set once the first `init` starts: R cannot be initialised twice in one process.
static INITIALISED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// When the first top-level expression of the current `eval` started.
    static FIRST_STATEMENT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Errors of the R engine. Errors inside user code are not errors here: they are data
/// in an [`EvalOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum RError {
    #[error("R is already initialised in this process")]
    AlreadyInitialised,
    #[error("R home {path:?} is unusable: {reason}")]
    RHome { path: PathBuf, reason: String },
    #[error("R start-up failed: {0}")]
    Startup(String),
    #[error("cannot load R package {package:?}: {message}")]
    Package { package: String, message: String },
    #[error("R package {package:?} started threads ({threads} now, {baseline} before): it is not fork-safe")]
    ThreadsStarted {
        package: String,
        threads: usize,
        baseline: usize,
    },
    #[error("prepare_child must run in a forked child, not in the process that initialised R")]
    NotInChild,
    #[error("cannot create the child's temp dir {path:?}: {source}")]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read random bytes from the kernel: {0}")]
    Random(std::io::Error),
    #[error("R evaluation failed: {0}")]
    Eval(String),
}

/// The lowest point R's garbage collector may set its triggers to (R's `--min-nsize`
/// and `--min-vsize`). R collects when the cons cells or vector heap in use reach the
/// trigger, and after a collection never lowers a trigger below this floor nor leaves
/// less than a fifth of it free. A forked child therefore allocates at least
/// `max(floor - in_use, floor / 5)` before its first collection, where `in_use` is what
/// the zygote's preload left alive; a collection in a child is what breaks copy-on-write
/// across the zygote's heap (~250 ms with Matrix loaded).
///
/// R's triggers cannot be moved after start-up, so this is the one knob. A bigger floor
/// means short executions never collect, but also that garbage grows towards the floor
/// before R collects: keep it well under the smallest memory limit a claim may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcTriggerFloor {
    /// Cons cells (56 bytes each on 64-bit).
    pub nodes: u64,
    /// Bytes of vector heap.
    pub vector_bytes: u64,
}

impl Default for GcTriggerFloor {
    fn default() -> Self {
        // Measured on R 4.2 after a full GC: base alone leaves ~340k cells and ~5 MiB of
        // vectors alive, so a child gets ~650k cells (~37 MiB) and ~59 MiB of vectors
        // before its first collection (R's defaults: 350k cells, 6 MiB). With
        // MASS+Matrix+survival (~1.5M cells, ~20 MiB alive) R's own growth puts the
        // cell trigger at ~2.6M: ~1M cells and ~44 MiB of vectors of headroom.
        GcTriggerFloor {
            nodes: 1_000_000,
            vector_bytes: 64 << 20,
        }
    }
}

/// How to start R.
#[derive(Debug, Clone)]
pub struct REngineOptions {
    /// R's home (`R RHOME`): holds `library/base` and `etc/Renviron`.
    pub r_home: PathBuf,
    /// Packages [`REngine::start`] preloads (attaches with `library()`).
    pub packages: Vec<String>,
    /// The floor of R's GC triggers; `None` keeps R's defaults (350k cells, 6 MiB).
    pub gc_trigger_floor: Option<GcTriggerFloor>,
    /// This R will fork many children (a zygote): the evaluator is byte-compiled and
    /// warmed up once, for all of them. `false` for a one-off, which would pay for that
    /// preparation and use it once.
    pub for_forks: bool,
}

impl Default for REngineOptions {
    fn default() -> Self {
        REngineOptions {
            r_home: default_r_home(),
            packages: Vec::new(),
            gc_trigger_floor: Some(GcTriggerFloor::default()),
            for_forks: true,
        }
    }
}

/// `$R_HOME`, else what `R RHOME` prints, else `/usr/lib/R`.
pub fn default_r_home() -> PathBuf {
    if let Some(home) = std::env::var_os("R_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    std::process::Command::new("R")
        .arg("RHOME")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.join("library/base").is_dir())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/R"))
}

/// What kind of failure ended an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The code did not parse; nothing ran.
    Parse,
    /// An expression signalled an error (or aborted); the ones before it ran.
    Runtime,
}

/// An error of user code, as data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RErrorInfo {
    /// `conditionMessage()` of the error (for a parse error, R's message with position).
    pub message: String,
    /// The call the error came from (`deparse(conditionCall())`), if any; `None` for an
    /// error signalled at the top level, which Rscript shows as `Error: ...`.
    pub call: Option<String>,
    pub kind: ErrorKind,
}

/// The result of evaluating one piece of user code. Printed output is not here: it went
/// to the console (output hook or fd 1/2) while the code ran.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    /// False on a parse or runtime error.
    pub ok: bool,
    /// The last top-level value as JSON (jsonlite's `toJSON(auto_unbox = TRUE)` when
    /// jsonlite is installed, else Hatchery's encoder for plain data; other values are
    /// their `deparse()` as a JSON string). `None` after an error, or when the value is
    /// larger than 1 MB (`object.size`).
    pub value_json: Option<String>,
    /// `class()` of the last value; `None` after an error.
    pub value_class: Option<Vec<String>>,
    pub error: Option<RErrorInfo>,
    /// Every warning's message, in order. Warnings are muffled: never printed.
    pub warnings: Vec<String>,
    /// When the first top-level expression started evaluating (after parsing).
    pub first_statement_at: Option<Instant>,
}

/// The R interpreter of this process. Neither `Send` nor `Sync`: R is single-threaded
/// and its state is process-global.
pub struct REngine {
    /// Hatchery's private environment (parent: base), preserved from the GC.
    private_env: SEXP,
    /// Threads of the process right after R started.
    baseline_threads: usize,
    _not_send: PhantomData<*mut ()>,
}

impl REngine {
    /// Initialises R in this process, once. Sets `R_HOME` (and the share/include/doc
    /// dirs Debian moves out of it), pins BLAS/OpenMP to one thread, picks a UTF-8
    /// locale if none is set, disables R's signal handlers (and its C stack check when
    /// not called on the main thread), routes the console through [`console`], starts R
    /// (`--vanilla --quiet --no-echo`), installs `progress()`, and byte-compiles and
    /// warms up the evaluator so children do not pay for R's JIT.
    ///
    /// Changes environment variables: call it before starting any thread, preferably
    /// on the main thread.
    pub fn init(opts: &REngineOptions) -> Result<REngine, RError> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(RError::AlreadyInitialised);
        }
        let r_home = check_r_home(&opts.r_home)?;
        set_startup_env(&r_home);

        let mut args = vec![
            "R".to_string(),
            "--vanilla".to_string(),
            "--quiet".to_string(),
            "--no-echo".to_string(),
            "--no-readline".to_string(),
        ];
        if let Some(floor) = opts.gc_trigger_floor {
            args.push(format!("--min-nsize={}", floor.nodes));
            args.push(format!("--min-vsize={}", floor.vector_bytes));
        }
        // R keeps pointers into argv (commandArgs()): leak them for the process' life.
        let mut argv: Vec<*mut c_char> = args
            .iter()
            .map(|a| CString::new(a.as_str()).map(CString::into_raw))
            .collect::<Result<_, _>>()
            .map_err(|e| RError::Startup(e.to_string()))?;
        let argc = c_int::try_from(argv.len()).unwrap_or(0);
        argv.push(std::ptr::null_mut());
        let argv = argv.leak();

        // SAFETY: R has not been initialised in this process (INITIALISED above) and we
        // are on the thread that will own it. The order is R's embedding recipe:
        // signal handlers off before Rf_initialize_R; stack limit, console and hooks
        // after it (it sets them) and before setup_Rmainloop (which first prints).
        unsafe {
            ffi::R_SignalHandlers = 0;
            if Rf_initialize_R(argc, argv.as_mut_ptr()) != 0 {
                return Err(RError::Startup("Rf_initialize_R failed".into()));
            }
            // R measures the C stack of the process' main thread. There its check is
            // right and turns runaway C recursion (serialize() of a deeply nested list)
            // into an R error instead of a crash, so keep it. On any other thread the
            // measurement is wrong ("C stack usage is too close to the limit" on valid
            // code): switch the check off.
            if libc::gettid() != libc::getpid() {
                R_CStackLimit = usize::MAX;
            }
            ffi::R_Interactive = 0;
            ffi::R_Outputfile = std::ptr::null_mut();
            ffi::R_Consolefile = std::ptr::null_mut();
            ffi::ptr_R_WriteConsole = None;
            ffi::ptr_R_WriteConsoleEx = Some(console::write_console_ex);
            ffi::ptr_R_ReadConsole = Some(console::read_console);
            if let Some(original) = ffi::ptr_R_CleanUp {
                let _ = console::ORIGINAL_CLEANUP.set(original);
            }
            ffi::ptr_R_CleanUp = Some(console::clean_up);
            console::ZYGOTE_PID.store(libc::getpid(), Ordering::Relaxed);
            libR_sys::setup_Rmainloop();
        }
        register_routines();

        let private_env = {
            // SAFETY: R is initialised; R_GlobalEnv is valid.
            let env = ffi::eval_source("new.env(parent = baseenv())", unsafe { R_GlobalEnv })
                .map_err(RError::Startup)?;
            // SAFETY: preserved for the life of the process (released in Drop).
            unsafe { R_PreserveObject(env) };
            env
        };
        let engine = REngine {
            private_env,
            baseline_threads: thread_count(),
            _not_send: PhantomData,
        };
        ffi::eval_source(ENGINE_R, private_env).map_err(RError::Startup)?;
        let mut scope = ProtectScope::new();
        let native = scope.protect(
            ffi::eval_source(
                "list(progress = getNativeSymbolInfo(\"hatchery_progress\"),
                      mark_started = getNativeSymbolInfo(\"hatchery_mark_started\"))",
                // SAFETY: R is initialised; R_BaseEnv is valid.
                unsafe { R_BaseEnv },
            )
            .map_err(RError::Startup)?,
        );
        // SAFETY: R is initialised; the new vector is protected at once.
        let for_forks = scope.protect(unsafe { Rf_ScalarLogical(c_int::from(opts.for_forks)) });
        engine
            .call_private(c"init", &[native, for_forks])
            .map_err(RError::Startup)?;
        Ok(engine)
    }

    /// [`init`](Self::init), then [`preload`](Self::preload) `opts.packages`, then
    /// [`full_gc`](Self::full_gc): a zygote ready to fork.
    pub fn start(opts: &REngineOptions) -> Result<REngine, RError> {
        let engine = REngine::init(opts)?;
        engine.preload(&opts.packages)?;
        engine.full_gc();
        Ok(engine)
    }

    /// Attaches each package with `library()`, in order, startup messages suppressed.
    /// Fails on the first package that does not load, or that left the process with
    /// more threads than R started with (such a package is not fork-safe).
    pub fn preload(&self, packages: &[String]) -> Result<(), RError> {
        for package in packages {
            let mut scope = ProtectScope::new();
            let name = scope.protect(ffi::mk_string(package));
            let failure =
                self.call_private(c"preload", &[name])
                    .map_err(|message| RError::Package {
                        package: package.clone(),
                        message,
                    })?;
            if let Some(message) = ffi::first_string(failure) {
                return Err(RError::Package {
                    package: package.clone(),
                    message,
                });
            }
            let threads = thread_count();
            if threads > self.baseline_threads {
                return Err(RError::ThreadsStarted {
                    package: package.clone(),
                    threads,
                    baseline: self.baseline_threads,
                });
            }
        }
        Ok(())
    }

    /// Two full collections (`gc(full = TRUE)`, finalizers run in between), so the heap
    /// children inherit holds only live objects and no child needs to collect soon; then
    /// the C heap is settled ([`settle_malloc`]).
    pub fn full_gc(&self) {
        // SAFETY: R is initialised; R_BaseEnv is valid.
        let base = unsafe { R_BaseEnv };
        let _ = ffi::eval_source(
            "invisible(gc(full = TRUE)); invisible(gc(full = TRUE))",
            base,
        );
        settle_malloc();
    }

    /// Makes a forked child its own R session, before any user code: removes the
    /// inherited `.Random.seed` and draws a new random state from the kernel (the full
    /// Mersenne-Twister state, not a 32-bit seed), reseeds C's `rand()`, points
    /// `tempdir()`/`tempfile()` and `TMPDIR` at `tmpdir` (created, mode 0700),
    /// restores the default SIGCHLD disposition (R waits for the processes it starts),
    /// then runs the evaluator once on nothing so its copy-on-write faults are paid
    /// before the claim rather than after it (~0.3 ms from claim to first output).
    /// Run it after the child's private `/tmp` is mounted when `tmpdir` is under it.
    ///
    /// R's GC triggers cannot be changed after start-up: how long a child goes without
    /// collecting is set in the zygote by [`REngineOptions::gc_trigger_floor`].
    pub fn prepare_child(&self, tmpdir: &Path) -> Result<(), RError> {
        if !in_forked_child() {
            return Err(RError::NotInChild);
        }
        let tmpdir = std::path::absolute(tmpdir).map_err(|source| RError::TempDir {
            path: tmpdir.to_path_buf(),
            source,
        })?;
        let temp_err = |source| RError::TempDir {
            path: tmpdir.clone(),
            source,
        };
        std::fs::create_dir_all(&tmpdir).map_err(temp_err)?;
        std::fs::set_permissions(&tmpdir, std::fs::Permissions::from_mode(0o700))
            .map_err(temp_err)?;
        let c_tmpdir =
            CString::new(tmpdir.as_os_str().as_bytes()).map_err(|e| RError::TempDir {
                path: tmpdir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        // SAFETY: R reads R_TempDir as a NUL-terminated string for the rest of the
        // process; the CString is leaked so it stays valid. The zygote's old string is
        // left alone (R_CleanTempDir deletes R's start-up dir through its own copy).
        unsafe { ffi::R_TempDir = c_tmpdir.into_raw() };
        std::env::set_var("TMPDIR", &tmpdir);

        // 625 kernel-random ints: one for set.seed(), 624 for the Mersenne-Twister state.
        let mut random = [0u8; 625 * 4];
        fill_random(&mut random).map_err(RError::Random)?;
        let mut scope = ProtectScope::new();
        // SAFETY: allocation on R's thread, protected at once; INTEGER points at 625
        // writable ints of the new vector.
        let ints = unsafe {
            let v = scope.protect(Rf_allocVector(SEXPTYPE::INTSXP, 625));
            let out = std::slice::from_raw_parts_mut(INTEGER(v), 625);
            for (slot, chunk) in out.iter_mut().zip(random.chunks_exact(4)) {
                let x = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                *slot = if x == i32::MIN { 0 } else { x }; // i32::MIN is R's NA
            }
            v
        };
        self.call_private(c"reseed", &[ints])
            .map_err(RError::Eval)?;
        // A zygote may let the kernel reap its children (SIGCHLD ignored); the child must
        // not inherit that, or R's system() and parallel's forks lose their children's
        // exit status ("system call failed: No child processes").
        // SAFETY: restores the default disposition of one signal; no handler involved.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
        // SAFETY: srand has no preconditions; C's rand() drives R's temp file names.
        unsafe {
            libc::srand(u32::from_ne_bytes([
                random[0], random[5], random[10], random[15],
            ]))
        };
        // Run the evaluator once on nothing, so the copy-on-write faults of its first
        // pass through R's heap happen now, before the claim, not after it.
        let nothing = scope.protect(ffi::mk_string("invisible(NULL)"));
        self.call_private(c"evaluate", &[nothing])
            .map_err(RError::Eval)?;
        Ok(())
    }

    /// Closes every graphics device, so the last page of a plot is written out (see
    /// `plot_device` in engine.R: pages go to [`crate::spec::PLOT_DIR`]).
    pub fn close_graphics(&self) {
        let _ = self.call_private(c"close_plots", &[]);
    }

    /// Evaluates user code in a fresh environment (child of the global environment),
    /// top-level expression by expression like Rscript: visible values are printed,
    /// warnings are collected (not printed), the first error stops it. Output goes to the
    /// console while it runs; the outcome is returned as data.
    pub fn eval(&self, code: &str) -> EvalOutcome {
        FIRST_STATEMENT.with(|c| c.set(None));
        let mut scope = ProtectScope::new();
        let code = scope.protect(ffi::mk_string(code));
        let result = self.call_private(c"evaluate", &[code]);
        let first_statement_at = FIRST_STATEMENT.with(|c| c.get());
        let result = match result {
            Ok(r) => scope.protect(r),
            Err(message) => {
                // Only a jump past the evaluator's own handlers (invokeRestart("abort"),
                // an error while handling an error) gets here.
                let message = if message.is_empty() {
                    "execution aborted".to_string()
                } else {
                    message
                };
                return EvalOutcome {
                    ok: false,
                    value_json: None,
                    value_class: None,
                    error: Some(RErrorInfo {
                        message,
                        call: None,
                        kind: ErrorKind::Runtime,
                    }),
                    warnings: Vec::new(),
                    first_statement_at,
                };
            }
        };
        // The list `evaluate` returns, by position (see engine.R):
        // ok, value_json, value_class, error_message, error_call, error_kind, warnings.
        // SAFETY: `result` is protected; Rf_asLogical reads a logical scalar.
        let ok = unsafe { Rf_asLogical(ffi::list_elt(result, 0)) } == 1;
        let warnings = ffi::strings(ffi::list_elt(result, 6))
            .into_iter()
            .flatten()
            .collect();
        if ok {
            return EvalOutcome {
                ok,
                value_json: ffi::first_string(ffi::list_elt(result, 1)),
                value_class: Some(
                    ffi::strings(ffi::list_elt(result, 2))
                        .into_iter()
                        .flatten()
                        .collect(),
                ),
                error: None,
                warnings,
                first_statement_at,
            };
        }
        let kind = match ffi::first_string(ffi::list_elt(result, 5)).as_deref() {
            Some("parse") => ErrorKind::Parse,
            _ => ErrorKind::Runtime,
        };
        EvalOutcome {
            ok,
            value_json: None,
            value_class: None,
            error: Some(RErrorInfo {
                message: ffi::first_string(ffi::list_elt(result, 3)).unwrap_or_default(),
                call: ffi::first_string(ffi::list_elt(result, 4)),
                kind,
            }),
            warnings,
            first_statement_at,
        }
    }

    /// Calls the function `name` of the private environment with up to two arguments.
    /// The result is unprotected.
    fn call_private(&self, name: &std::ffi::CStr, args: &[SEXP]) -> Result<SEXP, String> {
        let mut scope = ProtectScope::new();
        // SAFETY: the private environment is preserved; the looked-up function is
        // reachable from it; the call is protected while evaluated.
        unsafe {
            let fun = Rf_findVarInFrame(self.private_env, ffi::symbol(name));
            if Rf_isFunction(fun) == libR_sys::Rboolean::FALSE {
                return Err(format!("internal R function {name:?} is missing"));
            }
            let call = match *args {
                [] => scope.protect(Rf_lang1(fun)),
                [a] => scope.protect(Rf_lang2(fun, a)),
                [a, b] => scope.protect(Rf_lang3(fun, a, b)),
                _ => return Err(format!("internal R function {name:?}: too many arguments")),
            };
            ffi::try_eval(call, self.private_env)
        }
    }
}

impl Drop for REngine {
    /// In the process that initialised R, ends R (`Rf_endEmbeddedR`: finalizers, temp
    /// dir removed). In a forked child it does nothing: children leave by
    /// [`exit_child`].
    fn drop(&mut self) {
        if in_forked_child() {
            return;
        }
        // SAFETY: R is initialised on this thread; after this no R call is made (the
        // engine is gone and INITIALISED stays set).
        unsafe {
            R_ReleaseObject(self.private_env);
            libR_sys::Rf_endEmbeddedR(0);
        }
    }
}

/// Leaves the C heap (glibc's malloc) as a forked child should inherit it: free memory
/// returned to the kernel (`malloc_trim`), and the free chunks R's collections released
/// sorted into malloc's bins. glibc sorts its "unsorted" free list on the first
/// allocation that no cache serves, writing to every chunk on it: in a child, that first
/// allocation (any vector over 128 bytes) would otherwise copy-on-write pages across the
/// whole heap — measured as a third of a sandbox's own CPU before its claim, and pages
/// every idle sandbox holds privately. One allocation of that kind here sorts the list
/// once, in memory the children share.
fn settle_malloc() {
    // SAFETY: malloc_trim, malloc and free have no preconditions here; the block is freed
    // at once and never used (64 KiB: served from the heap, below glibc's mmap threshold).
    unsafe {
        libc::malloc_trim(0);
        // black_box: the compiler may otherwise drop an allocation that is never used.
        let block = std::hint::black_box(libc::malloc(64 << 10));
        libc::free(block);
    }
}

/// Ends a forked child: flushes R's console and C's stdio, then `_exit(code)`, without
/// atexit handlers or R's clean-up (which would delete the zygote's temp dir).
pub fn exit_child(code: i32) -> ! {
    // SAFETY: R_FlushConsole calls R's console flush hook; fflush(NULL) flushes every C
    // stream; _exit ends the process without running any clean-up of the zygote's.
    unsafe {
        if console::ZYGOTE_PID.load(Ordering::Relaxed) != 0 {
            R_FlushConsole();
        }
        libc::fflush(std::ptr::null_mut());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: see above.
    unsafe { libc::_exit(code) }
}

/// The number of threads of this process (`num_threads` of `/proc/self/stat`; 0 if it
/// cannot be read). Not a directory listing: `opendir` allocates with C's malloc, in the
/// heap a zygote shares with its sandboxes, between every two forks.
pub fn thread_count() -> usize {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may contain anything.
    stat.rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn check_r_home(r_home: &Path) -> Result<PathBuf, RError> {
    let bad = |reason: &str| RError::RHome {
        path: r_home.to_path_buf(),
        reason: reason.to_string(),
    };
    let r_home = std::path::absolute(r_home).map_err(|e| bad(&e.to_string()))?;
    if !r_home.join("library/base").is_dir() {
        return Err(bad("no library/base in it"));
    }
    Ok(r_home)
}

/// The environment R's front-end script would have set up, plus Hatchery's pins.
fn set_startup_env(r_home: &Path) {
    std::env::set_var("R_HOME", r_home);
    // Debian moves share/, include/ and doc/ out of R_HOME and tells R where through
    // the `R` script, which an embedding process never runs: read them from it.
    let script = std::fs::read_to_string(r_home.join("bin/R")).unwrap_or_default();
    for var in ["R_SHARE_DIR", "R_INCLUDE_DIR", "R_DOC_DIR"] {
        if std::env::var_os(var).is_some() {
            continue;
        }
        let prefix = format!("{var}=");
        let value = script
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&prefix))
            .find(|v| !v.contains('$') && !v.is_empty());
        if let Some(value) = value {
            std::env::set_var(var, value.trim_matches(|c| c == '"' || c == '\''));
        }
    }
    // Also set in a zygote's environment from its start; here for R embedded elsewhere.
    for (var, value) in crate::spec::SINGLE_THREAD_ENV {
        std::env::set_var(var, value);
    }
    let has_locale = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if !has_locale {
        // R reads its code and prints in the locale's encoding: make it UTF-8.
        std::env::set_var("LANG", "C.UTF-8");
    }
}

pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the live buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Registers the `.Call` routines engine.R uses with R's embedding DLL.
fn register_routines() {
    // SAFETY: each routine is an `extern "C"` function taking and returning SEXPs, as
    // `.Call` expects; R stores the pointer as the untyped DL_FUNC and calls it back
    // with exactly `numArgs` SEXP arguments.
    let progress: DL_FUNC = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn(SEXP, SEXP) -> SEXP,
            unsafe extern "C" fn() -> *mut std::ffi::c_void,
        >(hatchery_progress))
    };
    // SAFETY: as above, with no arguments.
    let mark_started: DL_FUNC = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn() -> SEXP,
            unsafe extern "C" fn() -> *mut std::ffi::c_void,
        >(hatchery_mark_started))
    };
    let routines = [
        R_CallMethodDef {
            name: c"hatchery_progress".as_ptr(),
            fun: progress,
            numArgs: 2,
        },
        R_CallMethodDef {
            name: c"hatchery_mark_started".as_ptr(),
            fun: mark_started,
            numArgs: 0,
        },
        R_CallMethodDef {
            name: std::ptr::null(),
            fun: None,
            numArgs: 0,
        },
    ];
    // SAFETY: the table is NULL-terminated; R copies the names and pointers it needs.
    unsafe {
        R_registerRoutines(
            R_getEmbeddingDllInfo(),
            std::ptr::null(),
            routines.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        );
    }
}

/// `.Call(progress, value, message)`: validates its arguments (user code can reach
/// the routine directly) and calls the progress hook. Returns NULL, or an error
/// message for the R side to `stop()` with: it never raises an R error itself.
unsafe extern "C" fn hatchery_progress(value: SEXP, message: SEXP) -> SEXP {
    // SAFETY: R passes live SEXPs; their type and length are checked before reading.
    let value = unsafe {
        if libR_sys::Rf_isReal(value) == libR_sys::Rboolean::TRUE && Rf_xlength(value) == 1 {
            Some(*REAL(value))
        } else {
            None
        }
    };
    let fail = |msg: &std::ffi::CStr| {
        // SAFETY: allocates a character vector returned straight to R.
        unsafe { Rf_mkString(msg.as_ptr()) }
    };
    let Some(value) = value.filter(|v| (0.0..=1.0).contains(v)) else {
        return fail(c"progress value must be a single number between 0 and 1");
    };
    let strings = ffi::strings(message);
    let [Some(message)] = strings.as_slice() else {
        return fail(c"progress message must be a single string");
    };
    if let Some(hook) = console::progress_hook() {
        let message = message.as_str();
        if std::panic::catch_unwind(|| hook(value, message)).is_err() {
            return fail(c"progress could not be reported");
        }
    }
    // SAFETY: R_NilValue is a constant of the initialised R.
    unsafe { R_NilValue }
}

/// `.Call(mark_started)`: the evaluator is about to run the first user expression.
unsafe extern "C" fn hatchery_mark_started() -> SEXP {
    FIRST_STATEMENT.with(|c| c.set(Some(Instant::now())));
    // SAFETY: R_NilValue is a constant of the initialised R.
    unsafe { R_NilValue }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_count_counts_this_process_threads() {
        // Other tests start and end threads meanwhile: compare with a listing of
        // /proc/self/task taken just before and just after, when the two agree.
        let listed = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let _parked = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        for _ in 0..100 {
            let (before, counted, after) = (listed(), super::thread_count(), listed());
            if before == after {
                assert!(counted >= 2);
                assert_eq!(counted, before);
                return;
            }
        }
        panic!("the thread count never held still");
    }
}
