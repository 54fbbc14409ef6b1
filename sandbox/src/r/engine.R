# Hatchery's R side of the embedded engine (sandbox/src/r/mod.rs).
#
# Sourced once at start-up into a private environment whose parent is baseenv(), so
# nothing here can be reached or masked through the global environment. Rust fills in
# `native` (registered .Call routines) before any of these functions run.
#
# Every function here is called from Rust through R_tryEval; each one traps its own
# errors and returns data, so an R error never unwinds into Rust.

# Values whose object.size() is larger than this are not serialised to JSON: the JSON
# of a large value costs seconds and megabytes in a sandbox that asked for neither.
value_json_limit <- 1e6

# Set by init(): TRUE when jsonlite's namespace could be loaded in the zygote.
have_jsonlite <- FALSE

# The .Call routines registered by Rust, filled in by init().
native <- NULL

# A one-off's JIT level for user code (init() sets it; NULL in a zygote): there the
# engine's own functions run uncompiled — compiling them would cost more than running
# them once — and R's JIT is switched on only while user code runs.
user_jit <- NULL

# `for_forks`: this R will fork many children (a zygote), so everything they share is
# prepared once here; FALSE for a one-off, which prepares nothing it would use once.
init <- function(native_routines, for_forks = TRUE) {
  native <<- native_routines
  have_jsonlite <<- isTRUE(suppressWarnings(suppressPackageStartupMessages(
    requireNamespace("jsonlite", quietly = TRUE))))
  env <- parent.env(environment())
  if (for_forks) {
    # Byte-compile everything here now, in the zygote: otherwise R's JIT compiles
    # evaluate() during the first evaluation of every forked child (~30-60 ms each).
    # A one-off leaves it to the JIT, which compiles only what the execution calls.
    for (name in ls(env, all.names = TRUE)) {
      f <- get(name, envir = env, inherits = FALSE)
      if (is.function(f)) assign(name, compiler::cmpfun(f), envir = env)
    }
  } else {
    user_jit <<- compiler::enableJIT(0)
  }
  # Graphics: when code draws without opening a device, pages go to PNG files that come
  # back as artifacts (plot_device()).
  options(device = plot_device)
  hatchery <- attach(NULL, name = "hatchery")
  assign("progress", get("progress", envir = env), envir = hatchery)
  lockEnvironment(hatchery, bindings = TRUE)
  if (for_forks) {
    # Run the evaluator once so whatever it touches on first use is loaded before fork.
    evaluate <- get("evaluate", envir = env)
    evaluate("invisible(NULL)")
    evaluate("stop('warm-up')")
    # Draw one page, so cairo and fontconfig (fonts found, caches read) are ready before
    # fork: a child's first plot costs the drawing only.
    warm_up_graphics()
  }
  invisible(NULL)
}

# Where plot pages go (crate::spec::PLOT_DIR in Rust), one PNG file per page.
plot_dir <- "/tmp/.hatchery-plots"

# The device a plot opens when none is open: PNG pages of 800 x 600 pixels at 96 dpi.
plot_device <- function(...) {
  dir.create(plot_dir, showWarnings = FALSE)
  grDevices::png(file.path(plot_dir, "plot-%03d.png"), width = 800, height = 600,
                 res = 96, type = "cairo")
}

# Closes every device (writes the last page of each); returns NULL.
close_plots <- function() {
  tryCatch(grDevices::graphics.off(), error = function(e) NULL)
  invisible(NULL)
}

warm_up_graphics <- function() {
  file <- tempfile(fileext = ".png")
  tryCatch({
    grDevices::png(file, width = 800, height = 600, res = 96, type = "cairo")
    graphics::plot(1:10, main = "warm-up")
    grDevices::dev.off()
  }, error = function(e) NULL)
  unlink(file)
  invisible(NULL)
}

# The user-facing progress(value, message) function, attached as "hatchery".
progress <- function(value, message = "") {
  if (!is.numeric(value) || length(value) != 1L || is.na(value) ||
      value < 0 || value > 1)
    stop("progress value must be a single number between 0 and 1")
  message <- as.character(message)
  if (length(message) != 1L || is.na(message))
    stop("progress message must be a single string")
  failure <- .Call(native$progress, as.double(value), enc2utf8(message))
  if (!is.null(failure)) stop(failure)
  invisible(NULL)
}

# library() one package; returns NULL or the error message.
preload <- function(package) {
  tryCatch({
    suppressWarnings(suppressPackageStartupMessages(
      library(package, character.only = TRUE)))
    NULL
  }, error = function(e) enc2utf8(conditionMessage(e)))
}

# Forked child: forget the zygote's random state and draw a new one from `ints`
# (kernel-random integers chosen by Rust). set.seed() sets up the generator kinds; the
# Mersenne-Twister state (624 words) is then replaced wholesale, so the child's stream
# carries the kernel's full entropy rather than a 32-bit seed.
reseed <- function(ints) {
  genv <- globalenv()
  if (exists(".Random.seed", envir = genv, inherits = FALSE))
    rm(".Random.seed", envir = genv)
  set.seed(ints[1L])
  seed <- get(".Random.seed", envir = genv, inherits = FALSE)
  if (length(seed) == 626L && seed[1L] %% 100L == 3L && length(ints) >= 625L) {
    seed[3:626] <- ints[2:625]
    seed[2L] <- 624L # position = N: the next draw regenerates from the new state
    assign(".Random.seed", seed, envir = genv)
  }
  invisible(NULL)
}

json_string <- function(x) {
  if (!length(x)) return(character())
  x <- enc2utf8(as.character(x))
  x <- gsub("\\", "\\\\", x, fixed = TRUE)
  x <- gsub("\"", "\\\"", x, fixed = TRUE)
  x <- gsub("\n", "\\n", x, fixed = TRUE)
  x <- gsub("\r", "\\r", x, fixed = TRUE)
  x <- gsub("\t", "\\t", x, fixed = TRUE)
  x <- gsub("\b", "\\b", x, fixed = TRUE)
  x <- gsub("\f", "\\f", x, fixed = TRUE)
  if (any(grepl("[\001-\037]", x, useBytes = TRUE))) {
    for (code in c(1:7, 11, 14:31))
      x <- gsub(intToUtf8(code), sprintf("\\u%04x", code), x, fixed = TRUE, useBytes = TRUE)
  }
  out <- paste0("\"", x, "\"")
  out[is.na(x)] <- "null"
  out
}

# JSON of each element of an atomic vector (no brackets).
json_atoms <- function(x) {
  if (is.factor(x)) x <- as.character(x)
  if (inherits(x, c("Date", "POSIXt"))) x <- format(x)
  if (is.object(x)) stop("unsupported class")
  switch(typeof(x),
    logical = ifelse(is.na(x), "null", ifelse(x, "true", "false")),
    integer = ifelse(is.na(x), "null", as.character(x)),
    double = {
      out <- sprintf("%.15g", x)
      out[is.na(x)] <- "null"
      out[is.nan(x)] <- "\"NaN\""
      out[!is.na(x) & x == Inf] <- "\"Inf\""
      out[!is.na(x) & x == -Inf] <- "\"-Inf\""
      out
    },
    character = json_string(x),
    complex = json_string(as.character(x)),
    raw = as.character(as.integer(x)),
    stop("unsupported type"))
}

json_array <- function(items) paste0("[", paste(items, collapse = ","), "]")

json_object <- function(keys, items)
  paste0("{", paste(json_string(keys), items, sep = ":", collapse = ","), "}")

# A small JSON encoder used when jsonlite is not installed; it follows jsonlite's
# toJSON(auto_unbox = TRUE) for plain data (scalars, vectors, named and unnamed lists,
# matrices, data frames by row) and gives up (error) on anything else.
to_json <- function(x, depth = 0L) {
  if (depth > 50L) stop("nested too deeply")
  if (is.null(x)) return("null")
  if (is.data.frame(x)) {
    cols <- lapply(x, json_atoms)
    rows <- vapply(seq_len(nrow(x)), function(i)
      json_object(names(x), vapply(cols, `[`, "", i)), "")
    return(json_array(rows))
  }
  if (is.atomic(x)) {
    d <- dim(x)
    if (length(d) == 2L) {
      atoms <- matrix(json_atoms(as.vector(x)), nrow = d[1L])
      return(json_array(apply(atoms, 1L, json_array)))
    }
    if (length(d) > 2L) stop("unsupported array")
    atoms <- json_atoms(x)
    if (length(atoms) == 1L) return(atoms)
    return(json_array(atoms))
  }
  if (is.list(x) && !is.object(x)) {
    items <- vapply(x, to_json, "", depth = depth + 1L)
    keys <- names(x)
    if (!is.null(keys) && length(x) > 0L && all(!is.na(keys) & nzchar(keys)))
      return(json_object(keys, items))
    return(json_array(items))
  }
  stop("unsupported value")
}

# JSON of a plain atomic vector (logical, integer, double or character, no attributes
# but names, at most 10,000 elements), exactly as jsonlite writes it (NA numbers as the
# string "NA", as jsonlite's default); NULL for any other value. The common value of an
# execution is one of these, and encoding it here costs a fraction of jsonlite's S4
# dispatch, whose every call writes to objects shared with the zygote (copy-on-write:
# ~1.5 ms in a fresh sandbox for one number).
plain_json <- function(x) {
  if (!is.atomic(x) || is.null(x) || length(x) > 10000L) return(NULL)
  a <- attributes(x)
  if (!is.null(a) && !identical(names(a), "names")) return(NULL)
  type <- typeof(x)
  if (!(type %in% c("logical", "integer", "double", "character"))) return(NULL)
  if (!length(x)) return("[]")
  atoms <- json_atoms(unname(x))
  if (type == "integer" || type == "double") atoms[is.na(x) & !is.nan(x)] <- "\"NA\""
  if (length(atoms) == 1L) atoms else json_array(atoms)
}

value_to_json <- function(x) {
  if (is.null(x)) return("null")
  plain <- plain_json(x)
  if (!is.null(plain)) return(plain)
  if (as.numeric(utils::object.size(x)) > value_json_limit) return(NA_character_)
  json <- tryCatch(
    if (have_jsonlite)
      as.character(jsonlite::toJSON(x, auto_unbox = TRUE, force = TRUE, digits = NA,
                                    null = "null"))
    else
      to_json(x),
    error = function(e) NULL)
  if (is.character(json) && length(json) == 1L && !is.na(json)) return(json)
  tryCatch(
    json_string(paste(deparse(x, width.cutoff = 500L, nlines = 20L), collapse = "\n")),
    error = function(e) NA_character_)
}

# The top-level call a condition carries is our own eval() when the user's code
# signalled it from its top level: report no call then, as Rscript does.
user_call <- function(call) {
  if (is.null(call) || identical(call, quote(eval(expr, env)))) return(NA_character_)
  enc2utf8(paste(deparse(call, nlines = 1L), collapse = ""))
}

# Evaluates user code like Rscript: each top-level expression in turn, printing visible
# values; stops at the first error. Returns the outcome as a list that Rust reads.
evaluate <- function(code) {
  .Internal(seterrmessage("")) # so an abort past our handlers is not given a stale message
  warnings <- character()
  out <- list(ok = FALSE, value_json = NA_character_, value_class = character(),
              error_message = NA_character_, error_call = NA_character_,
              error_kind = NA_character_, warnings = character())
  exprs <- tryCatch(parse(text = code, keep.source = FALSE, encoding = "UTF-8"),
                    error = function(e) e)
  if (inherits(exprs, "error")) {
    out$error_kind <- "parse"
    out$error_message <- enc2utf8(conditionMessage(exprs))
    return(out)
  }
  env <- new.env(parent = globalenv())
  last <- NULL
  failure <- NULL
  # Warnings are collected and muffled, except as options(warn =) says otherwise:
  # warn >= 2 lets R turn them into errors, warn < 0 drops them.
  on_warning <- function(w) {
    warn <- getOption("warn", 0)
    if (is.numeric(warn) && length(warn) == 1L && !is.na(warn) && warn >= 2) return()
    if (!(is.numeric(warn) && length(warn) == 1L && !is.na(warn) && warn < 0))
      warnings <<- c(warnings, enc2utf8(conditionMessage(w)))
    invokeRestart("muffleWarning")
  }
  # Printing runs in a frame whose parent is the user's environment, so S3 methods the
  # user defined are found (as Rscript's top level finds them in the global environment).
  print_value <- function(value) {
    penv <- new.env(parent = env)
    assign(".hatchery_value", value, envir = penv)
    fun <- if (isS4(value)) methods::show else base::print
    eval(as.call(list(fun, quote(.hatchery_value))), penv)
  }
  if (!is.null(user_jit)) compiler::enableJIT(user_jit)
  for (i in seq_along(exprs)) {
    if (i == 1L) .Call(native$mark_started)
    expr <- exprs[[i]]
    tryCatch(withCallingHandlers({
      result <- withVisible(eval(expr, env))
      if (result$visible) print_value(result$value)
      last <- result$value
    }, warning = on_warning), error = function(e) failure <<- e)
    if (!is.null(failure)) break
  }
  if (!is.null(user_jit)) compiler::enableJIT(0)
  out$warnings <- warnings
  if (!is.null(failure)) {
    out$error_kind <- "runtime"
    out$error_message <- enc2utf8(conditionMessage(failure))
    out$error_call <- user_call(conditionCall(failure))
    return(out)
  }
  out$ok <- TRUE
  out$value_class <- enc2utf8(class(last))
  out$value_json <- value_to_json(last)
  out
}
