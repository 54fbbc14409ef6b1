//! Python embedded in the zygote (CPython through `pyo3`, the system's libpython — the
//! same one the sandboxes' image carries).
//!
//! The interpreter starts once, imports the packages to preload, runs the evaluator
//! ([`engine.py`](engine.py)) over common values, collects and freezes its heap
//! (`gc.freeze()`: children's collections never write to the pages they share with the
//! zygote), and then forks. Fork safety is enforced, not assumed:
//! - no thread is alive at a fork: BLAS/OpenMP pools are pinned to one thread from the
//!   zygote's start, a preload that leaves a thread behind is refused (naming the
//!   threads), and the zygote checks the thread count again before every fork, whatever
//!   its language;
//! - the fork goes through `PyOS_BeforeFork` / `PyOS_AfterFork_Parent` /
//!   `PyOS_AfterFork_Child`, so interpreter locks are reinitialised and
//!   `os.register_at_fork` hooks run as they would for `os.fork()`;
//! - each child draws its own random state from the kernel (`random`, and numpy's global
//!   state, which does not reseed itself) and forgets the zygote's temp dir.
//!
//! Everything here runs on the zygote's (or the sandbox's) only thread.

use std::ffi::CString;
use std::path::Path;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyModule};

use crate::zygote::protocol::{ErrorInfo, Outcome};

/// The evaluator, loaded into the interpreter as `_hatchery_engine`.
const ENGINE: &str = include_str!("engine.py");

/// Environment that keeps Python off the disk and the display. (Numeric libraries are
/// pinned to one thread by the zygote's environment from its start:
/// [`SINGLE_THREAD_ENV`](crate::spec::SINGLE_THREAD_ENV).)
const STARTUP_ENV: [(&str, &str); 5] = [
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONNOUSERSITE", "1"),
    ("PYTHONUNBUFFERED", "1"),
    ("MPLBACKEND", "Agg"),
    ("MPLCONFIGDIR", "/tmp/matplotlib"),
];

/// Failures of the embedded interpreter's set-up.
#[derive(Debug, thiserror::Error)]
pub enum PyError {
    #[error("Python is already initialised in this process")]
    AlreadyInitialised,
    #[error("the evaluator failed to load: {0}")]
    Engine(String),
    #[error("cannot import {package}: {message}")]
    Preload { package: String, message: String },
    #[error("{} threads are running ({}): a zygote forks only with one (numeric libraries must stay single-threaded)", .names.len(), .names.join(", "))]
    Threads { names: Vec<String> },
    #[error("not in a child forked from the zygote")]
    NotInChild,
    #[error("reading random bytes from the kernel: {0}")]
    Random(std::io::Error),
    #[error("{0}")]
    Python(String),
}

/// Receives a sandbox's output, in the order it was written (the same hook type as R's).
pub type OutputHook = crate::r::OutputHook;
/// Receives `hatchery.progress(fraction, message)` calls, with `0 <= fraction <= 1`.
pub type ProgressHook = fn(f64, &str);

static OUTPUT_HOOK: Mutex<Option<OutputHook>> = Mutex::new(None);
static PROGRESS_HOOK: Mutex<Option<ProgressHook>> = Mutex::new(None);

/// Where `sys.stdout` / `sys.stderr` writes go (`None`: fd 1/2).
pub fn set_output_hook(hook: Option<OutputHook>) {
    *OUTPUT_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// Where `hatchery.progress()` goes (`None`: accepted and dropped).
pub fn set_progress_hook(hook: Option<ProgressHook>) {
    *PROGRESS_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// The native half of the evaluator: what Python code calls to leave the sandbox.
#[pymodule]
mod _hatchery {
    use pyo3::prelude::*;

    /// Writes `data` to stream 1 (stdout) or 2 (stderr), as bytes: text that is not
    /// UTF-8 is carried exactly.
    #[pyfunction]
    fn write(stream: u8, data: &[u8]) {
        let stream = match stream {
            2 => crate::r::OutputStream::Stderr,
            _ => crate::r::OutputStream::Stdout,
        };
        let hook = *super::OUTPUT_HOOK.lock().unwrap_or_else(|e| e.into_inner());
        match hook {
            Some(h) => h(stream, data),
            None => crate::r::write_fd(stream.fd(), data),
        }
    }

    /// Sends a progress report (validated by the Python side).
    #[pyfunction]
    fn progress(fraction: f64, message: &str) {
        let hook = *super::PROGRESS_HOOK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hook {
            h(fraction, message);
        }
    }
}

/// The Python interpreter of this process. Not `Send`: CPython's state is
/// process-global and the zygote drives it from one thread.
pub struct PyEngine {
    engine: Py<PyModule>,
    zygote_pid: i32,
    _not_send: std::marker::PhantomData<*mut ()>,
}

static INITIALISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl PyEngine {
    /// Starts CPython in this process, once, with numeric libraries pinned to one thread,
    /// and loads the evaluator (`sys.stdout`/`sys.stderr` through the output hook,
    /// `import hatchery` for user code).
    ///
    /// Changes environment variables: call it before any thread starts.
    pub fn init() -> Result<PyEngine, PyError> {
        if INITIALISED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(PyError::AlreadyInitialised);
        }
        for (k, v) in crate::spec::SINGLE_THREAD_ENV
            .iter()
            .chain(STARTUP_ENV.iter())
        {
            std::env::set_var(k, v);
        }
        pyo3::append_to_inittab!(_hatchery);
        Python::initialize();
        let engine = Python::attach(|py| -> Result<Py<PyModule>, PyError> {
            let code = CString::new(ENGINE).map_err(|e| PyError::Engine(e.to_string()))?;
            let module = PyModule::from_code(py, &code, c"<hatchery engine>", c"_hatchery_engine")
                .map_err(|e| PyError::Engine(e.to_string()))?;
            module
                .call_method0("setup")
                .map_err(|e| PyError::Engine(e.to_string()))?;
            Ok(module.unbind())
        })?;
        Ok(PyEngine {
            engine,
            // SAFETY: getpid has no preconditions.
            zygote_pid: unsafe { libc::getpid() },
            _not_send: std::marker::PhantomData,
        })
    }

    /// Imports each package (`numpy`, `pandas`, ...), in order, and checks that none
    /// left a thread running.
    pub fn preload(&self, packages: &[String]) -> Result<(), PyError> {
        Python::attach(|py| {
            let engine = self.engine.bind(py);
            for package in packages.iter().filter(|p| !p.is_empty()) {
                let failure = engine
                    .call_method1("preload", (package.as_str(),))
                    .map_err(|e| PyError::Python(e.to_string()))?;
                if !failure.is_none() {
                    return Err(PyError::Preload {
                        package: package.clone(),
                        message: failure.to_string(),
                    });
                }
            }
            Ok(())
        })?;
        single_threaded()
    }

    /// Runs the evaluator over common values (so its lazily filled state is shared by
    /// every child), then collects and freezes the heap. The last step before forking.
    pub fn settle(&self) -> Result<(), PyError> {
        Python::attach(|py| {
            let engine = self.engine.bind(py);
            engine
                .call_method0("warm_up")
                .and_then(|_| engine.call_method0("collect"))
                .map(|_| ())
                .map_err(|e| PyError::Python(e.to_string()))
        })
    }

    /// Called right before the zygote forks (which it does only with one thread):
    /// CPython's own pre-fork step (`os.register_at_fork(before=...)` hooks).
    pub fn before_fork(&self) {
        // SAFETY: the interpreter is initialised; attach holds the GIL for the call.
        Python::attach(|_| unsafe { pyo3::ffi::PyOS_BeforeFork() });
    }

    /// In the zygote, right after a fork (or a failed one).
    pub fn after_fork_parent(&self) {
        // SAFETY: pairs with `before_fork`'s PyOS_BeforeFork, GIL held by attach.
        Python::attach(|_| unsafe { pyo3::ffi::PyOS_AfterFork_Parent() });
    }

    /// In the child, first thing after the fork: CPython's post-fork step (locks
    /// reinitialised, `os.register_at_fork(after_in_child=...)` hooks run).
    pub fn after_fork_child(&self) {
        // SAFETY: pairs with `before_fork`'s PyOS_BeforeFork, in the child's only
        // thread, GIL held by attach.
        Python::attach(|_| unsafe { pyo3::ffi::PyOS_AfterFork_Child() });
    }

    /// In a forked sandbox before it is frozen: its own random state from the kernel, a
    /// fresh temp dir, the evaluator's first run.
    pub fn prepare_child(&self) -> Result<(), PyError> {
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } == self.zygote_pid {
            return Err(PyError::NotInChild);
        }
        let mut random = [0u8; 64];
        crate::r::fill_random(&mut random).map_err(PyError::Random)?;
        Python::attach(|py| {
            self.engine
                .bind(py)
                .call_method1("prepare_child", (PyBytes::new(py, &random),))
                .map(|_| ())
                .map_err(|e| PyError::Python(e.to_string()))
        })
    }

    /// Saves every open matplotlib figure as a PNG page in `dir` (`plot-001.png`, ...),
    /// in figure-number order; nothing when matplotlib was not used.
    pub fn save_figures(&self, dir: &Path) {
        Python::attach(|py| {
            let _ = self
                .engine
                .bind(py)
                .call_method1("save_figures", (dir.to_string_lossy().as_ref(),));
        })
    }

    /// Runs `code` once and returns its outcome (output went through the hook).
    pub fn eval(&self, code: &str) -> Outcome {
        Python::attach(|py| {
            let result = self.engine.bind(py).call_method1("run", (code,));
            match result {
                Ok(r) => outcome_of(&r).unwrap_or_else(|e| internal(e.to_string())),
                Err(e) => internal(e.to_string()),
            }
        })
    }
}

/// Ok when this process runs one thread; else the names of its threads.
fn single_threaded() -> Result<(), PyError> {
    if crate::r::thread_count() <= 1 {
        return Ok(());
    }
    let names = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| t.ok())
                .map(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .map(|c| c.trim().to_string())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    Err(PyError::Threads { names })
}

/// A failure of the evaluator itself (not of user code) as an outcome.
fn internal(message: String) -> Outcome {
    Outcome {
        ok: false,
        error: Some(ErrorInfo {
            message: format!("the Python evaluator failed: {message}"),
            call: None,
            kind: "runtime".into(),
        }),
        ..Default::default()
    }
}

fn outcome_of(r: &Bound<'_, PyAny>) -> PyResult<Outcome> {
    let d = r.cast::<PyDict>()?;
    let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(d.get_item(k)?.filter(|v| !v.is_none()))
    };
    let error = match get("error")? {
        Some(e) => {
            let e = e.cast::<PyDict>()?;
            let field = |k: &str| -> PyResult<Option<String>> {
                e.get_item(k)?
                    .filter(|v| !v.is_none())
                    .map(|v| v.extract::<String>())
                    .transpose()
            };
            Some(ErrorInfo {
                message: field("message")?.unwrap_or_default(),
                call: field("call")?,
                kind: field("kind")?.unwrap_or_else(|| "runtime".into()),
            })
        }
        None => None,
    };
    Ok(Outcome {
        ok: get("ok")?
            .map(|v| v.is_truthy())
            .transpose()?
            .unwrap_or(false),
        value_json: get("value_json")?.map(|v| v.extract()).transpose()?,
        value_class: get("value_class")?.map(|v| v.extract()).transpose()?,
        error,
        warnings: get("warnings")?
            .map(|v| v.extract())
            .transpose()?
            .unwrap_or_default(),
        exit_code: get("exit_code")?.map(|v| v.extract()).transpose()?,
        signal: None,
    })
}
