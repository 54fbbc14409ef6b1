//! The embedded R engine (`hatchery_sandbox::r`), end to end.
//!
//! R starts once per process and tests run in threads, so each test runs the
//! `r-engine-check` helper binary with one scenario and asserts on the JSON it prints.

use std::process::Command;

use serde_json::Value;

fn check(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_r-engine-check"))
        .args(args)
        .output()
        .expect("run r-engine-check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "r-engine-check {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

/// Evaluates each piece of code, in order, in one initialised R.
fn eval_all(codes: &[&str]) -> Vec<Value> {
    let mut args = vec!["eval"];
    args.extend_from_slice(codes);
    check(&args)["results"].as_array().unwrap().clone()
}

fn eval_one(code: &str) -> Value {
    eval_all(&[code]).remove(0)
}

#[test]
fn sum_prints_and_returns_its_value_as_json() {
    let r = eval_one("sum(1:10)");
    assert_eq!(r["stdout"], "[1] 55\n");
    assert_eq!(r["stderr"], "");
    let o = &r["outcome"];
    assert_eq!(o["ok"], true);
    assert_eq!(o["value_json"], "55");
    assert_eq!(o["value_class"], serde_json::json!(["integer"]));
    assert!(o["error"].is_null());
    assert!(o["first_statement_after_us"].is_u64());
}

#[test]
fn invisible_values_are_not_printed() {
    let r = eval_all(&["x <- 5", "invisible(3)", "(y <- 7)"]);
    assert_eq!(r[0]["stdout"], "");
    assert_eq!(r[0]["outcome"]["value_json"], "5");
    assert_eq!(r[1]["stdout"], "");
    assert_eq!(r[1]["outcome"]["value_json"], "3");
    assert_eq!(r[2]["stdout"], "[1] 7\n");
}

#[test]
fn expressions_run_and_print_in_order() {
    let r = eval_one("1; \"a\"\ncat('b\\n'); print(2); message('m')\nNULL");
    assert_eq!(r["stdout"], "[1] 1\n[1] \"a\"\nb\n[1] 2\nNULL\n");
    assert_eq!(r["stderr"], "m\n");
    assert_eq!(r["outcome"]["value_json"], "null");
}

#[test]
fn each_evaluation_gets_a_fresh_environment() {
    let r = eval_all(&["x <- 1", "exists('x')"]);
    assert_eq!(r[1]["outcome"]["value_json"], "false");
}

#[test]
fn runtime_error_stops_evaluation_and_keeps_earlier_output() {
    let r = eval_all(&[
        "cat('a\\n'); stop('boom'); cat('never\\n')",
        "f <- function() stop('inner'); f()",
    ]);
    assert_eq!(r[0]["stdout"], "a\n");
    let o = &r[0]["outcome"];
    assert_eq!(o["ok"], false);
    assert!(o["value_json"].is_null());
    assert_eq!(o["error"]["message"], "boom");
    assert_eq!(o["error"]["kind"], "runtime");
    assert!(o["error"]["call"].is_null());
    assert_eq!(r[1]["outcome"]["error"]["call"], "f()");
}

#[test]
fn parse_error_runs_nothing() {
    let r = eval_one("cat('x')\n1 +");
    assert_eq!(r["stdout"], "");
    let o = &r["outcome"];
    assert_eq!(o["ok"], false);
    assert_eq!(o["error"]["kind"], "parse");
    assert!(o["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unexpected"));
    assert!(o["first_statement_after_us"].is_null());
}

#[test]
fn errors_that_escape_handlers_are_reported_not_fatal() {
    let r = eval_all(&[
        "f <- function(n) f(n + 1); f(1)",
        "invokeRestart('abort')",
        "options(warn = 2); warning('w')",
        "1",
        // Runaway C recursion: R's C stack check turns it into an error, not a crash.
        "l <- list(); for (i in 1:1e6) l <- list(l); length(serialize(l, NULL))",
    ]);
    let msg = r[0]["outcome"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("nested too deeply"), "{msg}");
    let msg = r[4]["outcome"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("C stack usage"), "{msg}");
    assert_eq!(r[1]["outcome"]["ok"], false);
    assert_eq!(r[1]["outcome"]["error"]["message"], "execution aborted");
    assert_eq!(
        r[2]["outcome"]["error"]["message"],
        "(converted from warning) w"
    );
    assert_eq!(r[3]["outcome"]["value_json"], "1");
}

#[test]
fn warnings_are_collected_and_not_printed() {
    let r = eval_one("warning('w1'); x <- as.integer('x'); 2");
    assert_eq!(r["stderr"], "");
    assert_eq!(r["stdout"], "[1] 2\n");
    let o = &r["outcome"];
    assert_eq!(o["ok"], true);
    assert_eq!(
        o["warnings"],
        serde_json::json!(["w1", "NAs introduced by coercion"])
    );
}

#[test]
fn progress_reaches_the_hook_and_is_validated() {
    let r = eval_all(&[
        "progress(0.5, 'half'); progress(1L)",
        "progress(2)",
        "progress(-0.1)",
        "progress(NA_real_)",
        "progress(0.1, c('a', 'b'))",
        // Survives clearing the global environment: it lives on the search path.
        "rm(list = ls(globalenv(), all.names = TRUE), envir = globalenv()); progress(0.9, 'ü')",
    ]);
    assert_eq!(
        r[0]["progress"],
        serde_json::json!([{"value": 0.5, "message": "half"}, {"value": 1.0, "message": ""}])
    );
    assert_eq!(r[0]["outcome"]["ok"], true);
    for bad in &r[1..5] {
        assert_eq!(bad["outcome"]["ok"], false, "{bad}");
        assert_eq!(bad["progress"], serde_json::json!([]));
    }
    assert_eq!(r[1]["outcome"]["error"]["call"], "progress(2)");
    assert_eq!(
        r[5]["progress"],
        serde_json::json!([{"value": 0.9, "message": "ü"}])
    );
}

#[test]
fn values_become_json() {
    let r = eval_all(&[
        "list(a = 1, b = 'x\"y', c = c(TRUE, NA), d = NULL)",
        "head(cars, 2)",
        "matrix(1:4, 2)",
        "c(1.5, Inf, NaN)",
        "structure(1, class = 'foo')",
        "'héllo'",
        "x <- rnorm(2e5)",
        "requireNamespace('jsonlite', quietly = TRUE)",
        "c(a = 1L, b = NA)",
        "character(0)",
        "'a\\bb\\fc\\001'",
        "c(0.1 + 0.2, 1e-20, 100000, NA, -Inf)",
        "NA_character_",
    ]);
    let json = |i: usize| r[i]["outcome"]["value_json"].as_str().map(str::to_string);
    let parsed = |i: usize| serde_json::from_str::<Value>(&json(i).unwrap()).unwrap();
    assert_eq!(
        parsed(0),
        serde_json::json!({"a": 1, "b": "x\"y", "c": [true, null], "d": null})
    );
    assert_eq!(
        parsed(1),
        serde_json::json!([{"speed": 4, "dist": 2}, {"speed": 4, "dist": 10}])
    );
    assert_eq!(parsed(2), serde_json::json!([[1, 3], [2, 4]]));
    assert_eq!(parsed(3), serde_json::json!([1.5, "Inf", "NaN"]));
    // Without jsonlite, a class Hatchery's encoder does not know becomes its deparse()
    // as a JSON string; with jsonlite, whatever toJSON(force = TRUE) makes of it.
    if r[7]["outcome"]["value_json"] == "false" {
        assert_eq!(
            parsed(4),
            serde_json::json!("structure(1, class = \"foo\")")
        );
    } else {
        parsed(4);
    }
    assert_eq!(parsed(5), serde_json::json!("héllo"));
    // Plain vectors are encoded by Hatchery itself, exactly as jsonlite would: names
    // dropped, NA numbers as the string "NA", one element unboxed.
    assert_eq!(json(8).unwrap(), "[1,\"NA\"]");
    assert_eq!(json(9).unwrap(), "[]");
    assert_eq!(json(10).unwrap(), "\"a\\bb\\fc\\u0001\"");
    assert_eq!(json(11).unwrap(), "[0.3,1e-20,100000,\"NA\",\"-Inf\"]");
    assert_eq!(json(12).unwrap(), "null");
    assert_eq!(r[5]["stdout"], "[1] \"héllo\"\n");
    // Too large to serialise: no JSON, but the class is known.
    assert!(r[6]["outcome"]["value_json"].is_null());
    assert_eq!(
        r[6]["outcome"]["value_class"],
        serde_json::json!(["numeric"])
    );
}

#[test]
fn preloaded_packages_are_usable_and_start_no_threads() {
    let v = check(&[
        "preload",
        "MASS",
        "Matrix",
        "--",
        "fit <- lm(dist ~ speed, cars); print(summary(fit)); \
         invisible(MASS::fractions(0.5)); nnzero(Diagonal(3))",
    ]);
    assert_eq!(v["threads_after_preload"], 1, "{v}");
    let r = &v["result"];
    assert_eq!(r["outcome"]["ok"], true, "{r}");
    assert!(r["stdout"]
        .as_str()
        .unwrap()
        .contains("Residual standard error"));
    assert_eq!(r["outcome"]["value_json"], "3");
}

#[test]
fn a_missing_package_is_named_in_the_error() {
    let v = check(&["preload", "MASS", "noSuchPackageHere", "--", "1"]);
    let err = v["error"].as_str().expect("an error");
    assert!(err.contains("noSuchPackageHere"), "{err}");
}

#[test]
fn a_package_that_starts_threads_is_refused() {
    // tcltk starts Tcl's notifier thread when it loads: a zygote must not fork with it.
    // The refusal is the thread check's, not a load failure ("cannot load R package").
    let v = check(&["preload", "tcltk", "--", "1"]);
    let err = v["error"].as_str().expect("an error");
    let counts = err
        .strip_prefix("R package \"tcltk\" started threads (")
        .and_then(|rest| rest.strip_suffix(" before): it is not fork-safe"))
        .unwrap_or_else(|| panic!("tcltk was not refused for starting threads: {err}"));
    let (now, before) = counts
        .split_once(" now, ")
        .unwrap_or_else(|| panic!("no thread counts in the refusal: {err}"));
    let now: usize = now.parse().expect("thread count now");
    let before: usize = before.parse().expect("thread count before");
    assert!(
        now > before,
        "refused with {now} threads now and {before} before: {err}"
    );
    assert_eq!(before, 1, "R started with more than one thread: {err}");
}

#[test]
fn forked_children_are_independent_sessions() {
    let v = check(&["fork"]);
    let children = v["children"].as_array().unwrap();
    let mut numbers = Vec::new();
    for child in &children[..2] {
        assert_eq!(child["exit"], 0, "{child}");
        let r = &child["result"];
        assert!(r["prepared"].is_null(), "{r}");
        assert_eq!(r["outcome"]["ok"], true, "{r}");
        let stdout = r["stdout"].as_str().unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        numbers.push(lines[0].to_string());
        // Each child's tempdir() is its own directory, created for it.
        assert_eq!(lines[1], child["dir"].as_str().unwrap());
        assert_eq!(lines[2], "TRUE");
    }
    assert_ne!(
        numbers[0], numbers[1],
        "children drew the same random number"
    );
    assert_ne!(
        children[0]["result"]["pid"], children[1]["result"]["pid"],
        "children must be distinct processes"
    );
    // A global assigned in one child is absent in the next and in the zygote.
    assert_eq!(
        children[2]["result"]["outcome"]["value_json"],
        "[false,false]"
    );
    assert_eq!(
        v["zygote_after"]["outcome"]["value_json"],
        "[false,false,true]"
    );
    // q() in a child ends it with its status and without R's clean-up, so the zygote's
    // temp dir survives every child's exit.
    assert_eq!(v["quit_exit"], 3);
    assert_eq!(v["zygote_tempdir_exists"], true);
    assert!(v["zygote_prepare_error"]
        .as_str()
        .unwrap()
        .contains("forked child"));
}

#[test]
fn parallel_forks_and_system_work_inside_a_child() {
    // The check binary's zygote ignores SIGCHLD here, as a zygote that lets the kernel
    // reap its children would; prepare_child must give R its default back.
    let v = check(&[
        "fork-eval",
        "parallel",
        "--",
        "p <- unlist(parallel::mclapply(1:4, function(i) Sys.getpid(), mc.cores = 2)); \
         c(length(unique(p)), Sys.getpid() %in% p, system('exit 3'))",
    ]);
    assert_eq!(v["result"]["outcome"]["value_json"], "[2,0,3]", "{v}");
    assert_eq!(v["result"]["outcome"]["warnings"], serde_json::json!([]));
    assert_eq!(v["zygote_threads_after_child"], 1);
}

#[test]
fn timings_are_reported_and_ordered() {
    let v = check(&["timings", "7"]);
    println!("r engine timings: {v:#}");
    assert_eq!(v["threads_after_preload"], 1);
    assert_eq!(v["runs"], 7);
    let ms = |key: &str| -> f64 {
        let t = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no timing {key}: {v}"));
        assert!(t.is_finite() && t > 0.0, "timing {key} is {t}: {v}");
        t
    };
    for key in ["init_ms", "preload_mass_matrix_survival_gc_ms"] {
        ms(key);
    }
    // Relations between the medians, never absolute times: each run's first output comes
    // before its exit, a child forked and prepared in advance answers "go" faster than a
    // fork plus prepare does, and fitting a model takes longer than summing ten numbers.
    let first_output = ms("median_fork_to_first_output_sum_ms");
    let exit = ms("median_fork_to_exit_sum_ms");
    assert!(
        first_output <= exit,
        "first output ({first_output} ms) after the child's exit ({exit} ms): {v}"
    );
    let go = ms("median_prepared_child_go_to_first_output_sum_ms");
    let fork_prepare = ms("median_fork_prepare_to_first_output_sum_ms");
    assert!(
        go < fork_prepare,
        "a prepared child took {go} ms from go to first output, a fresh fork and \
         prepare {fork_prepare} ms: {v}"
    );
    let lm = ms("median_fork_prepare_to_first_output_lm_ms");
    assert!(
        lm > fork_prepare,
        "lm() answered in {lm} ms, no slower than sum(1:10) in {fork_prepare} ms: {v}"
    );
    // The zygote's heap leaves room before the next collection: used below the trigger
    // for both cons cells and vector cells.
    let gc: Vec<f64> = v["zygote_gc_used_and_trigger"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .map(|n| n.parse().expect("a gc() count"))
        .collect();
    assert_eq!(gc.len(), 4, "gc() reported {gc:?}: {v}");
    assert!(
        gc[0] < gc[2] && gc[1] < gc[3],
        "the zygote is at its GC trigger (used {:?}, trigger {:?}): {v}",
        &gc[..2],
        &gc[2..]
    );
}
