//! The corner of libR that `libR-sys` 0.7's bundled R 4.2 bindings leave out, and the
//! few helpers every call into R needs (protection, strings, evaluation that cannot
//! longjmp into Rust).
//!
//! Everything here must be called on the thread that initialised R, after `init`.

use std::ffi::{c_char, c_int, c_void, CStr};

use libR_sys::{
    ParseStatus, R_NilValue, R_ParseVector, R_tryEvalSilent, Rf_allocVector, Rf_install, Rf_isNull,
    Rf_isString, Rf_mkCharLenCE, Rf_protect, Rf_unprotect, Rf_xlength, R_CHAR, SET_STRING_ELT,
    SEXP, SEXPTYPE, STRING_ELT, VECTOR_ELT,
};

/// `SA_TYPE` of `R_ext/RStartup.h` (an enum, passed as an int).
pub type SaType = c_int;

// Globals and hooks of libR (declared in Rinterface.h / Rembedded.h) that the bundled
// bindings lack. Their types follow R 4.2's headers.
extern "C" {
    /// Whether R installs its own signal handlers (SIGINT, SIGSEGV, SIGPIPE...).
    pub static mut R_SignalHandlers: c_int;
    /// Whether R believes a person is at the console (`interactive()`).
    pub static mut R_Interactive: c_int;
    /// `FILE*` R writes console output to when set; NULL routes it through the callbacks.
    pub static mut R_Outputfile: *mut c_void;
    /// `FILE*` R writes console errors to when set; NULL routes it through the callbacks.
    pub static mut R_Consolefile: *mut c_void;
    /// R's session temp dir, as returned by `tempdir()` and used by `tempfile()`.
    pub static mut R_TempDir: *mut c_char;
    pub static mut ptr_R_WriteConsole: Option<unsafe extern "C" fn(*const c_char, c_int)>;
    pub static mut ptr_R_WriteConsoleEx: Option<unsafe extern "C" fn(*const c_char, c_int, c_int)>;
    pub static mut ptr_R_ReadConsole:
        Option<unsafe extern "C" fn(*const c_char, *mut u8, c_int, c_int) -> c_int>;
    pub static mut ptr_R_CleanUp: Option<unsafe extern "C" fn(SaType, c_int, c_int)>;
}

/// Protects SEXPs for as long as the scope lives and unprotects them all on drop.
///
/// R's protection stack is LIFO: scopes must be dropped in reverse order of creation,
/// which Rust's drop order guarantees for scopes declared in nested blocks. Nothing in
/// this module longjmps past a scope (every evaluation goes through `R_tryEvalSilent`).
pub struct ProtectScope {
    count: c_int,
}

impl ProtectScope {
    pub fn new() -> Self {
        ProtectScope { count: 0 }
    }

    /// Protects `x` until the scope is dropped and returns it.
    pub fn protect(&mut self, x: SEXP) -> SEXP {
        // SAFETY: R is initialised and we are on its thread (module contract); the
        // matching Rf_unprotect happens in Drop.
        unsafe { Rf_protect(x) };
        self.count += 1;
        x
    }
}

impl Drop for ProtectScope {
    fn drop(&mut self) {
        if self.count > 0 {
            // SAFETY: pops exactly the entries this scope pushed; scopes are LIFO.
            unsafe { Rf_unprotect(self.count) };
        }
    }
}

/// A UTF-8 `CHARSXP` for `s` (unprotected: protect it or store it at once).
pub fn mk_char(s: &str) -> SEXP {
    let len = c_int::try_from(s.len()).unwrap_or(c_int::MAX);
    // SAFETY: `s` points at `len` readable bytes; R copies them into a new CHARSXP.
    unsafe { Rf_mkCharLenCE(s.as_ptr().cast(), len, libR_sys::cetype_t::CE_UTF8) }
}

/// A length-one character vector holding `s` in UTF-8 (unprotected).
pub fn mk_string(s: &str) -> SEXP {
    let mut scope = ProtectScope::new();
    // SAFETY: allocation on R's thread; the vector is protected while the CHARSXP is
    // allocated and stored into it.
    unsafe {
        let v = scope.protect(Rf_allocVector(SEXPTYPE::STRSXP, 1));
        SET_STRING_ELT(v, 0, mk_char(s));
        v
    }
}

/// An R symbol (symbols are never collected, so the result needs no protection).
pub fn symbol(name: &CStr) -> SEXP {
    // SAFETY: `name` is NUL-terminated; Rf_install interns it.
    unsafe { Rf_install(name.as_ptr()) }
}

/// The strings of a character vector (NA becomes `None`); empty for anything else.
pub fn strings(x: SEXP) -> Vec<Option<String>> {
    // SAFETY: `x` is a live SEXP owned by the caller; we only read it, and check its
    // type before treating it as a character vector.
    unsafe {
        if Rf_isString(x) == libR_sys::Rboolean::FALSE {
            return Vec::new();
        }
        let n = Rf_xlength(x);
        (0..n)
            .map(|i| {
                let c = STRING_ELT(x, i);
                if c == libR_sys::R_NaString {
                    None
                } else {
                    Some(CStr::from_ptr(R_CHAR(c)).to_string_lossy().into_owned())
                }
            })
            .collect()
    }
}

/// The first string of a character vector, unless it is NA or the vector is empty.
pub fn first_string(x: SEXP) -> Option<String> {
    strings(x).into_iter().next().flatten()
}

/// Element `i` of a list (R_NilValue when out of range).
pub fn list_elt(x: SEXP, i: isize) -> SEXP {
    // SAFETY: bounds are checked against the vector's length before reading.
    unsafe {
        if Rf_isNull(x) == libR_sys::Rboolean::TRUE || i >= Rf_xlength(x) {
            R_NilValue
        } else {
            VECTOR_ELT(x, i)
        }
    }
}

/// Evaluates `expr` in `env` without ever letting an R error longjmp into Rust.
/// The error message (`geterrmessage()`) is returned on failure. The result is
/// unprotected: protect it before the next allocation.
pub fn try_eval(expr: SEXP, env: SEXP) -> Result<SEXP, String> {
    let mut failed: c_int = 0;
    // SAFETY: R_tryEvalSilent runs the evaluation under R_ToplevelExec, which catches
    // every R-level jump; `expr` and `env` are live SEXPs protected by the caller.
    let value = unsafe { R_tryEvalSilent(expr, env, &mut failed) };
    if failed == 0 {
        return Ok(value);
    }
    Err(last_error_message())
}

/// `geterrmessage()`, trimmed; used after a failed `R_tryEvalSilent`.
fn last_error_message() -> String {
    // SAFETY: builds and evaluates a constant call on R's thread, protected while used.
    unsafe {
        let mut scope = ProtectScope::new();
        let call = scope.protect(libR_sys::Rf_lang1(symbol(c"geterrmessage")));
        let mut failed: c_int = 0;
        let msg = R_tryEvalSilent(call, libR_sys::R_BaseEnv, &mut failed);
        if failed != 0 {
            return "unknown R error".to_string();
        }
        let text = first_string(msg).unwrap_or_default();
        let text = text.trim_end();
        text.strip_prefix("Error: ")
            .or_else(|| text.strip_prefix("Error in "))
            .unwrap_or(text)
            .to_string()
    }
}

/// Parses R source that Hatchery itself ships (never user code) into an expression
/// vector. The result is unprotected.
pub fn parse(source: &str) -> Result<SEXP, String> {
    let mut scope = ProtectScope::new();
    let text = scope.protect(mk_string(source));
    let mut status = ParseStatus::PARSE_NULL;
    // SAFETY: `text` is a protected character vector; R_ParseVector reports syntax
    // errors through `status` rather than longjmp-ing.
    let exprs = unsafe { R_ParseVector(text, -1, &mut status, R_NilValue) };
    if status != ParseStatus::PARSE_OK {
        return Err(format!("cannot parse built-in R code ({status:?})"));
    }
    Ok(exprs)
}

/// Parses and evaluates Hatchery's own R code in `env`, expression by expression;
/// returns the last value (unprotected).
pub fn eval_source(source: &str, env: SEXP) -> Result<SEXP, String> {
    let mut scope = ProtectScope::new();
    let exprs = scope.protect(parse(source)?);
    // SAFETY: R_NilValue is a constant of the initialised R.
    let mut last = unsafe { R_NilValue };
    // SAFETY: reading the length of a protected expression vector.
    let n = unsafe { Rf_xlength(exprs) };
    for i in 0..n {
        // SAFETY: `i` is within the expression vector's bounds.
        let expr = unsafe { VECTOR_ELT(exprs, i) };
        last = try_eval(expr, env)?;
    }
    Ok(last)
}
