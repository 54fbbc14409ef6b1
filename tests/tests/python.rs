//! Python through the warm pool: a zygote with CPython embedded and numpy + pandas
//! imported forks single-use sandboxes with the same contract as R's — output, progress
//! and warnings in order, the last expression's value as JSON, exceptions as data with a
//! traceback of the user's code only — and fork safety shown, not assumed: no thread in
//! the zygote or a child, a random state of its own in every child, nothing of one
//! child's imports in the next. The hostile-channel attacks run from Python too.
//!
//! Needs root, `cargo build -p hatchery-sandbox --bins` and the root filesystem.
//! Run: `cargo test -p hatchery-tests --test python`.

use std::time::{Duration, Instant};

use hatchery_sandbox::pool::{Event, ExecRequest, ExecStatus};

mod pools;
use pools::*;

#[test]
fn code_runs_and_streams_output_progress_and_warnings_in_order() {
    let tp = python_pool(1);
    let ran = tp.run_code(
        "import sys, warnings, hatchery\n\
         print('one')\n\
         hatchery.progress(0.5, 'half way')\n\
         print('two', file=sys.stderr)\n\
         warnings.warn('careful')\n\
         import numpy as np\n\
         np.arange(5).sum()",
    );
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(ran.stdout(), "one\n", "{}", ran.describe());
    assert_eq!(ran.stderr(), "two\n", "{}", ran.describe());
    assert_eq!(ran.value(), serde_json::json!(10));
    assert_eq!(
        ran.result.outcome.value_class,
        Some(vec!["numpy.int64".to_string()])
    );
    assert_eq!(ran.result.outcome.warnings, vec!["UserWarning: careful"]);
    // Output is line-buffered, like a terminal: a line written in pieces over time is one
    // event, and a partial line goes out before anything written after it to the other
    // stream.
    let pieces = tp.run_code("import time\nprint('a', end='')\ntime.sleep(0.2)\nprint('b')");
    let stdout_events: Vec<String> = pieces
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Stdout { data } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout_events, ["ab\n"], "{}", pieces.describe());
    let mixed = tp.run_code(
        "import sys\nsys.stdout.write('a')\nsys.stderr.write('b\\n')\nsys.stdout.write('c\\n')\nsys.stdout.write('tail')",
    );
    // Adjacent pieces of one stream joined (the pool may or may not merge them).
    let mut pieces: Vec<(bool, String)> = Vec::new();
    for e in &mixed.events {
        let (out, data) = match e {
            Event::Stdout { data } => (true, data),
            Event::Stderr { data } => (false, data),
            _ => continue,
        };
        let text = String::from_utf8_lossy(data);
        match pieces.last_mut() {
            Some((last, joined)) if *last == out => joined.push_str(&text),
            _ => pieces.push((out, text.into_owned())),
        }
    }
    assert_eq!(
        pieces,
        [
            (true, "a".to_string()),
            (false, "b\n".to_string()),
            (true, "c\ntail".to_string())
        ],
        "{}",
        mixed.describe()
    );
    // Bytes that are not UTF-8 are carried exactly, through sys.stdout.buffer too.
    let ran2 =
        tp.run_code("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok\\n')\nprint('caf\\u00e9')");
    ran2.assert_status(ExecStatus::Succeeded);
    assert_eq!(
        ran2.stdout_bytes(),
        b"\xff\xfeok\ncaf\xc3\xa9\n",
        "{}",
        ran2.describe()
    );
    // Order: started, stdout "one", the progress, stderr "two".
    let order: Vec<&str> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Started { .. } => Some("started"),
            Event::Stdout { .. } => Some("stdout"),
            Event::Stderr { .. } => Some("stderr"),
            Event::Progress { fraction, message } => {
                assert_eq!((*fraction, message.as_str()), (0.5, "half way"));
                Some("progress")
            }
            _ => None,
        })
        .collect();
    let mut deduped = order.clone();
    deduped.dedup();
    assert_eq!(
        deduped,
        ["started", "stdout", "progress", "stderr"],
        "{}",
        ran.describe()
    );
    tp.finish();
}

#[test]
fn values_become_json_and_frames_become_records() {
    let tp = python_pool(2);
    for (code, want) in [
        ("1 + 1", serde_json::json!(2)),
        ("x = 3", serde_json::Value::Null),
        ("{'a': [1, 2.5, None], 'b': (True, 'x')}", serde_json::json!({"a": [1, 2.5, null], "b": [true, "x"]})),
        ("float('nan'), float('inf')", serde_json::json!([null, "Infinity"])),
        (
            "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})",
            serde_json::json!([{"a": 1, "b": "x"}, {"a": 2, "b": null}]),
        ),
        (
            "import pandas as pd\npd.DataFrame({'v': [1.5, float('nan')]}, index=pd.Index(['p', 'q'], name='k'))",
            serde_json::json!([{"k": "p", "v": 1.5}, {"k": "q", "v": null}]),
        ),
        ("import numpy as np\nnp.eye(2)", serde_json::json!([[1.0, 0.0], [0.0, 1.0]])),
        ("import datetime\ndatetime.date(2026, 12, 2)", serde_json::json!("2026-12-02")),
    ] {
        let ran = tp.run_code(code);
        ran.assert_status(ExecStatus::Succeeded);
        if want.is_null() {
            // A last statement that is not an expression has no value.
            assert_eq!(ran.result.outcome.value_json, None, "{code}");
        } else {
            assert_eq!(ran.value(), want, "{code}\n{}", ran.describe());
        }
    }
    tp.finish();
}

#[test]
fn errors_are_data_with_a_traceback_of_the_users_code_only() {
    let tp = python_pool(2);
    let ran = tp.run_code("print('before')\ndef f(x):\n    return 1 / x\nf(0)\nprint('after')");
    ran.assert_status(ExecStatus::Failed);
    assert_eq!(ran.stdout(), "before\n", "{}", ran.describe());
    let error = ran.result.outcome.error.clone().expect("an error");
    assert_eq!(error.kind, "runtime");
    assert_eq!(error.message, "ZeroDivisionError: division by zero");
    let tb = error.call.expect("a traceback");
    assert!(
        tb.contains("line 4, in <module>") && tb.contains("line 3, in f"),
        "{tb}"
    );
    assert!(
        tb.contains("return 1 / x"),
        "the source line is shown: {tb}"
    );
    assert!(
        !tb.contains("engine") && !tb.contains(".py\""),
        "only the user's frames: {tb}"
    );

    // A syntax error runs nothing, not even the lines before it.
    let ran = tp.run_code("print('never')\ndef broken(:\n");
    ran.assert_status(ExecStatus::Failed);
    assert_eq!(ran.stdout(), "", "{}", ran.describe());
    let error = ran.result.outcome.error.clone().expect("an error");
    assert_eq!(error.kind, "parse");
    assert!(error.message.contains("SyntaxError"), "{}", error.message);

    // sys.exit: 0 succeeds, anything else fails with its code.
    let ran = tp.run_code("import sys\nsys.exit(0)");
    ran.assert_status(ExecStatus::Succeeded);
    let ran = tp.run_code("import sys\nsys.exit(3)");
    ran.assert_status(ExecStatus::Failed);
    assert_eq!(ran.result.outcome.exit_code, Some(3));
    tp.finish();
}

/// The zygote's process (the first process running the zygote binary in the pool's
/// cgroups; its forked sandboxes come after it).
fn zygote_pid(tp: &TestPool) -> u32 {
    tp.cgroups
        .processes()
        .into_iter()
        .filter(|(_, _, cmd)| cmd.starts_with(hatchery_sandbox::pool::ZYGOTE_PATH_INSIDE))
        .map(|(pid, _, _)| pid)
        .min()
        .expect("the zygote runs")
}

#[test]
fn forked_children_are_independent_and_single_threaded() {
    let tp = python_pool(2);
    let zygote = zygote_pid(&tp);
    let tasks = std::fs::read_dir(format!("/proc/{zygote}/task"))
        .expect("the zygote's threads")
        .count();
    assert_eq!(tasks, 1, "the zygote runs one thread");

    let probe = "import os, sys, random, threading, tempfile, numpy\n\
                 seen = 'hatchery_marker' in sys.modules\n\
                 sys.modules['hatchery_marker'] = object()\n\
                 import fractions\n\
                 {'random': random.random(), 'numpy': float(numpy.random.rand()),\n\
                  'threads': threading.active_count(),\n\
                  'tasks': len(os.listdir('/proc/self/task')),\n\
                  'blas': os.environ.get('OPENBLAS_NUM_THREADS'),\n\
                  'marker_seen': seen, 'tmp': tempfile.gettempdir(),\n\
                  'tmp_entries': len(os.listdir(tempfile.gettempdir()))}";
    let a = tp.run_code(probe);
    let b = tp.run_code(probe);
    for r in [&a, &b] {
        r.assert_status(ExecStatus::Succeeded);
        let v = r.value();
        assert_eq!(v["threads"], 1, "{v}");
        assert_eq!(v["tasks"], 1, "{v}");
        assert_eq!(v["blas"], "1", "{v}");
        assert_eq!(
            v["marker_seen"], false,
            "one child's modules never reach the next"
        );
        assert_eq!(v["tmp"], "/tmp", "{v}");
        assert_eq!(v["tmp_entries"], 0, "a temp dir of its own, empty: {v}");
    }
    let (va, vb) = (a.value(), b.value());
    assert_ne!(
        va["random"], vb["random"],
        "random's state is the child's own"
    );
    assert_ne!(
        va["numpy"], vb["numpy"],
        "numpy's global state is the child's own"
    );
    assert_eq!(
        std::fs::read_dir(format!("/proc/{zygote}/task"))
            .expect("the zygote's threads")
            .count(),
        1,
        "the zygote still runs one thread"
    );
    tp.finish();
}

fn with_limit(code: &str, limit: Duration) -> ExecRequest {
    let mut req = ExecRequest::new(code);
    req.timeout = Some(limit);
    req
}

/// The sandbox's end of its channel: its only socket besides nothing (stdio are pipes).
const CHANNEL_FD: &str = "import os\n\
    def channel():\n\
    \x20   for name in os.listdir('/proc/self/fd'):\n\
    \x20       try:\n\
    \x20           if os.readlink(f'/proc/self/fd/{name}').startswith('socket:'):\n\
    \x20               return int(name)\n\
    \x20       except OSError:\n\
    \x20           pass\n\
    fd = channel()\n";

/// The run ended `protocol_violation`, long before the 30 s sleep that follows its attack.
fn assert_violation_before_its_sleep(ran: &Ran) {
    ran.assert_status(ExecStatus::ProtocolViolation);
    assert!(
        ran.result.timings.total_ms < 20_000.0,
        "the violation ended the run before its sleep: {}",
        ran.describe()
    );
}

#[test]
fn the_channel_is_as_hostile_from_python_as_from_r() {
    let tp = python_pool(2);
    // Garbage on the channel ends the run at once, as a protocol violation.
    let ran = tp.run(with_limit(
        &format!("{CHANNEL_FD}os.write(fd, b'\\xff\\xff\\xff\\x7fnot a frame')\nimport time\ntime.sleep(30)"),
        Duration::from_secs(60),
    ));
    assert_violation_before_its_sleep(&ran);

    // Half a frame header, then a spin: the time limit still holds.
    let limit = Duration::from_secs(4);
    let started = Instant::now();
    let ran = tp.run(with_limit(
        &format!("{CHANNEL_FD}print('attacking', flush=True)\nos.write(fd, b'\\x10\\x00')\nwhile True:\n    pass"),
        limit,
    ));
    let took = started.elapsed();
    ran.assert_status(ExecStatus::TimedOut);
    assert!(ran.stdout().contains("attacking"), "{}", ran.describe());
    assert!(
        took >= limit && took < limit + Duration::from_millis(1500),
        "the result came {took:?} after the claim for a {limit:?} limit"
    );

    // A result forged on the channel ends the run: what the code does after it never
    // arrives, and the status, timings and usage stay the owner's.
    let frame = "import json, struct\n\
                 def frame(kind, body):\n\
                 \x20   return struct.pack('<IB', len(body) + 1, kind) + body\n";
    let ran = tp.run(with_limit(
        &format!(
            "{CHANNEL_FD}{frame}print('before', flush=True)\n\
             os.write(fd, frame(7, b'\"forged\"') + frame(8, json.dumps({{'ok': True}}).encode()))\n\
             print('after', flush=True)\n'real'"
        ),
        Duration::from_secs(60),
    ));
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(
        ran.value(),
        serde_json::json!("forged"),
        "{}",
        ran.describe()
    );
    assert!(ran.stdout().contains("before"), "{}", ran.describe());
    assert!(!ran.stdout().contains("after"), "{}", ran.describe());
    assert!(
        ran.result.usage.memory_peak_bytes > 1 << 20,
        "usage from the cgroup: {:?}",
        ran.result.usage
    );

    // A frame carrying a descriptor (SCM_RIGHTS through Python's socket module, no native
    // code needed) is a protocol violation.
    let ran = tp.run(with_limit(
        &format!(
            "{CHANNEL_FD}{frame}import socket, time\n\
             s = socket.socket(fileno=os.dup(fd))\n\
             r, w = os.pipe()\n\
             s.sendmsg([frame(4, b'x')], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack('i', r))])\n\
             time.sleep(30)"
        ),
        Duration::from_secs(60),
    ));
    assert_violation_before_its_sleep(&ran);

    // A run after the attacks is untouched by them.
    let ran = tp.run_code("sum(range(10))");
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(ran.value(), serde_json::json!(45));
    tp.finish();
}
