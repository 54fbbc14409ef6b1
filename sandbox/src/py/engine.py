# Hatchery's Python evaluator, loaded once into the zygote's interpreter as the module
# `_hatchery_engine`. Rust (sandbox/src/py/mod.rs) calls `setup()` once, `warm_up()`
# before the zygote's final collection, `prepare_child()` in each forked sandbox and
# `run(code)` once per sandbox. `_hatchery` is the native module the zygote registers:
# `write(stream, text)` puts output on the sandbox's channel (in order with progress and
# the result), `progress(fraction, message)` sends a progress frame.

import ast
import builtins
import datetime
import decimal
import gc
import io
import json
import linecache
import math
import os
import sys
import tempfile
import traceback
import types
import warnings

import _hatchery

# The file name user code is compiled under: tracebacks keep only its frames.
USER_FILE = "<code>"
# The largest value returned as JSON; a larger one is left out of the result.
MAX_VALUE_BYTES = 1 << 20
# Deepest nesting a value is converted to.
MAX_DEPTH = 64


# Text written but not yet sent: (stream, [bytes, ...]). One buffer for both streams, so
# that what goes out keeps the order it was written in across stdout and stderr.
_pending_stream = 0
_pending = []
_pending_size = 0
# A buffer this large is sent even without a newline.
_MAX_PENDING = 64 * 1024


def _flush_pending():
    global _pending, _pending_size
    if _pending:
        _hatchery.write(_pending_stream, b"".join(_pending))
        _pending = []
        _pending_size = 0


def _write_text(stream, data, line_end):
    """Line-buffered, like a terminal: sent at a newline, a flush, a progress report,
    a write to the other stream, a full buffer, or the end of the run."""
    global _pending_stream, _pending_size
    if _pending and _pending_stream != stream:
        _flush_pending()
    _pending_stream = stream
    _pending.append(data)
    _pending_size += len(data)
    if line_end or _pending_size >= _MAX_PENDING:
        _flush_pending()


class _Binary(io.RawIOBase):
    """sys.stdout.buffer / sys.stderr.buffer: bytes go to the channel exactly."""

    def __init__(self, stream, fd):
        self._stream = stream
        self._fd = fd

    def writable(self):
        return True

    def fileno(self):
        return self._fd

    def write(self, b):
        data = bytes(b)
        if data:
            _flush_pending()
            _hatchery.write(self._stream, data)
        return len(data)


class _Output(io.TextIOBase):
    """sys.stdout / sys.stderr of a sandbox: every write goes to the channel at once."""

    def __init__(self, stream, fd, name):
        self._stream = stream
        self._fd = fd
        self._name = name
        self._buffer = _Binary(stream, fd)

    @property
    def buffer(self):
        return self._buffer

    @property
    def name(self):
        return self._name

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "surrogateescape"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            try:
                data = s.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                data = s.encode("utf-8", "backslashreplace")
            _write_text(self._stream, data, "\n" in s)
        return len(s)

    def flush(self):
        _flush_pending()


def progress(fraction, message=""):
    """Reports how far the code has come: `fraction` between 0 and 1, and a message."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            raise ValueError("progress fraction must be a number between 0 and 1") from None
    fraction = float(fraction)
    if not (0.0 <= fraction <= 1.0):
        raise ValueError("progress fraction must be a number between 0 and 1")
    if not isinstance(message, str):
        raise TypeError("progress message must be a string")
    _flush_pending()
    _hatchery.progress(fraction, message)


def setup():
    """Once, in the zygote: output through the channel, `import hatchery` for users."""
    module = types.ModuleType("hatchery", "Hatchery's helpers for code in a sandbox.")
    module.progress = progress
    sys.modules["hatchery"] = module
    sys.stdout = _Output(1, 1, "<stdout>")
    sys.stderr = _Output(2, 2, "<stderr>")
    sys.stdin = io.StringIO("")


def preload(name):
    """Imports one package; returns None or the error's text."""
    try:
        __import__(name)
        return None
    except BaseException as e:  # noqa: BLE001 - any failure is the zygote's to report
        return "".join(traceback.format_exception_only(type(e), e)).strip()


def warm_up():
    """Runs the evaluation path on common values so that what it fills lazily (method
    caches, imports of the converter) is in memory every sandbox shares."""
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        for code in (
            "55",
            "2.5",
            "'x'",
            "[1, 2.5, 'a', None, True]",
            "{'a': 1, 'b': [1, 2]}",
            "print('x'); 1",
            "import warnings; warnings.warn('w'); 1",
            "1/0",
            "def f(:",
            "float('nan')",
        ):
            run(code)
        if "numpy" in sys.modules:
            run("import numpy as np; np.arange(3)")
            run("import numpy as np; np.float64(1.5)")
        if "pandas" in sys.modules:
            run("import pandas as pd; pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
            run("import pandas as pd; pd.Series([1.0, 2.0])")
        if "matplotlib.pyplot" in sys.modules:
            # The font cache and the Agg renderer, built once here rather than in
            # every sandbox that plots (~1 s each).
            run(
                "import io, matplotlib.pyplot as plt\n"
                "fig = plt.figure(figsize=(2, 2)); plt.plot([1, 2]); plt.title('x')\n"
                "fig.savefig(io.BytesIO(), format='png'); plt.close('all')"
            )
    finally:
        sys.stdout, sys.stderr = saved


def save_figures(directory):
    """After the code ran: every figure still open becomes a PNG page (at the figure's own
    size, 96 dpi), returned as an artifact."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        numbers = plt.get_fignums()
    except Exception:  # noqa: BLE001 - the user's code may have broken pyplot
        return
    if numbers:
        os.makedirs(directory, exist_ok=True)
    for i, number in enumerate(numbers, start=1):
        try:
            plt.figure(number).savefig(
                "%s/plot-%03d.png" % (directory, i), format="png", dpi=96
            )
        except Exception:  # noqa: BLE001 - a figure that cannot be drawn is left out
            pass


def prepare_child(random_bytes):
    """In each forked sandbox, before it is frozen: a random state of its own (Python's
    `random` reseeds itself after a fork; numpy's global state does not), a fresh temp
    dir, and the evaluator run once so its first copy-on-write faults happen now."""
    import random

    random.seed(random_bytes)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        words = [int.from_bytes(random_bytes[i : i + 4], "little") for i in range(0, 32, 4)]
        numpy.random.seed(words)
    tempfile.tempdir = None
    run("None")


def _json_float(x):
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _plain(v, depth=0):
    """A JSON-ready copy of `v`: containers and numbers as themselves, numpy values as
    Python ones, pandas frames as records (a non-default index becomes columns), dates
    in ISO 8601, NaN as null, infinities as strings, anything else as its repr()."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return _json_float(float(v))
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return repr(bytes(v))
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        if isinstance(v, pandas.DataFrame):
            frame = v
            if not isinstance(frame.index, pandas.RangeIndex):
                frame = frame.reset_index()
            return [_plain(r, depth + 1) for r in frame.to_dict(orient="records")]
        if isinstance(v, pandas.Series):
            if isinstance(v.index, pandas.RangeIndex):
                return [_plain(x, depth + 1) for x in v.tolist()]
            return {str(k): _plain(x, depth + 1) for k, x in v.items()}
        if isinstance(v, pandas.Timestamp):
            return None if pandas.isna(v) else v.isoformat()
        if v is pandas.NaT or v is getattr(pandas, "NA", object()):
            return None
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(v, numpy.ndarray):
            return _plain(v.tolist(), depth + 1)
        if isinstance(v, numpy.generic):
            return _plain(v.item(), depth + 1)
    return repr(v)


def _class_of(v):
    """The value's type, as Python names it (`int`, `pandas.core.frame.DataFrame`)."""
    t = type(v)
    module = t.__module__
    return [t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"]


def _value(v):
    """(value_json, value_class) of the last expression's value."""
    try:
        text = json.dumps(_plain(v), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        text = json.dumps(f"<{type(v).__name__}: not converted to JSON: {e}>")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        text = None
    return text, _class_of(v)


def _user_traceback(e):
    """The traceback of `e` limited to the frames of user code, or None."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == USER_FILE]
    if not frames:
        return None
    lines = ["Traceback (most recent call last):\n"]
    lines.extend(traceback.StackSummary.from_list(frames).format())
    return "".join(lines).rstrip("\n")


def _error(kind, e):
    message = "".join(traceback.format_exception_only(type(e), e)).strip()
    return {"kind": kind, "message": message, "call": _user_traceback(e)}


def run(code):
    """Runs `code` as a module's top level; the value of a last expression statement is
    the result's value. Returns a dict: ok, value_json, value_class, error, warnings,
    exit_code."""
    out = {
        "ok": True,
        "value_json": None,
        "value_class": None,
        "error": None,
        "warnings": [],
        "exit_code": None,
    }
    collected = out["warnings"]
    linecache.cache[USER_FILE] = (len(code), None, code.splitlines(True), USER_FILE)
    try:
        tree = ast.parse(code, USER_FILE, "exec")
    except (SyntaxError, ValueError) as e:
        out["ok"] = False
        out["error"] = {
            "kind": "parse",
            "message": "".join(traceback.format_exception_only(type(e), e)).strip(),
            "call": None,
        }
        return out
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    saved_main = sys.modules.get("__main__")
    sys.modules["__main__"] = main

    def show(message, category, filename, lineno, file=None, line=None):
        collected.append(f"{category.__name__}: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        try:
            exec(compile(tree, USER_FILE, "exec"), main.__dict__)
            if last is not None:
                value = eval(compile(last, USER_FILE, "eval"), main.__dict__)
                out["value_json"], out["value_class"] = _value(value)
        except SystemExit as e:
            code_ = e.code
            if code_ is None or code_ == 0:
                out["exit_code"] = 0
            elif isinstance(code_, int):
                out["ok"] = False
                out["exit_code"] = code_
            else:
                sys.stderr.write(f"{code_}\n")
                out["ok"] = False
                out["exit_code"] = 1
        except BaseException as e:  # noqa: BLE001 - user errors are data
            out["ok"] = False
            out["error"] = _error("runtime", e)
        finally:
            _flush_pending()
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
    return out


def collect():
    """The zygote's last step before it forks: a full collection, then every object
    moved to the permanent generation, so that no child's collector writes to (and
    copies) the pages it shares with the zygote."""
    gc.collect()
    gc.freeze()
