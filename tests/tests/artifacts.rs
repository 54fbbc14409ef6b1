//! Artifacts: the plot pages and the files an execution leaves in `/work/out` come back
//! to the pool owner as `Event::Artifact`s before the result, within the limits the run
//! asked for; what does not fit is left out and said so on stderr, never a failure.
//! (Forged artifact frames are attacked in the channel suite.)
//!
//! Needs root, `cargo build -p hatchery-sandbox --bins` and the R root filesystem (with
//! Python for the Python case). Run: `cargo test -p hatchery-tests --test artifacts`.

use hatchery_sandbox::pool::{ArtifactLimits, Event, ExecRequest, ExecStatus};

mod pools;
use pools::*;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

fn with_artifacts(code: &str, max_count: u32, max_bytes: u64) -> ExecRequest {
    let mut req = request(code);
    req.artifacts = Some(ArtifactLimits {
        max_count,
        max_bytes,
    });
    req
}

/// The artifacts of a run, in order: name and bytes.
fn artifacts(ran: &Ran) -> Vec<(String, Vec<u8>)> {
    ran.events
        .iter()
        .filter_map(|e| match e {
            Event::Artifact { name, data } => Some((name.clone(), data.clone())),
            _ => None,
        })
        .collect()
}

fn names(ran: &Ran) -> Vec<String> {
    artifacts(ran).into_iter().map(|(n, _)| n).collect()
}

/// Two plots (base graphics, two pages) and a CSV written to /work/out come back: PNG
/// pages of the device's size, the file's exact bytes, before `Finished`, listed in the
/// result with their sizes; without artifact limits nothing comes back.
#[test]
fn plots_and_output_files_come_back_as_artifacts() {
    let tp = r_pool(2);
    let code = "plot(1:10, main = 'a line'); hist(c(1, 2, 2, 3, 3, 3)); \
                writeLines(c('a,b', '1,2'), '/work/out/data.csv'); cat('done\\n')";
    let ran = tp.run(with_artifacts(code, 20, 16 << 20));
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(ran.stdout(), "done\n", "{}", ran.describe());
    let got = artifacts(&ran);
    assert_eq!(
        names(&ran),
        ["plot-001.png", "plot-002.png", "data.csv"],
        "{}",
        ran.describe()
    );
    for (name, data) in &got[..2] {
        assert!(data.starts_with(PNG_MAGIC), "{name} is not a PNG");
        // The IHDR chunk: width and height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes(data[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(data[20..24].try_into().unwrap());
        assert_eq!((width, height), (800, 600), "{name}");
    }
    assert_eq!(got[2].1, b"a,b\n1,2\n");
    // Every artifact arrived before the result, which lists them.
    let last_artifact = ran
        .events
        .iter()
        .rposition(|e| matches!(e, Event::Artifact { .. }))
        .unwrap();
    assert!(last_artifact < ran.events.len() - 1);
    let listed: Vec<(String, u64)> = got
        .iter()
        .map(|(n, d)| (n.clone(), d.len() as u64))
        .collect();
    assert_eq!(ran.result.artifacts, listed);

    // The same code without limits: no artifact, the same success.
    let ran = tp.run(request(code));
    ran.assert_status(ExecStatus::Succeeded);
    assert!(names(&ran).is_empty(), "{}", ran.describe());
    assert!(ran.result.artifacts.is_empty());
    tp.finish();
}

/// What cannot come back is left out with a note on stderr and the run still succeeds:
/// names an artifact cannot have, links, folders, and whatever passes the count or the
/// total size (in name order: plots first, then /work/out).
#[test]
fn what_does_not_fit_is_left_out_and_said_so() {
    let tp = r_pool(2);
    let code = "\
        for (f in c('a.txt', 'b.txt', 'c.txt')) writeLines(f, file.path('/work/out', f)); \
        writeLines('x', '/work/out/with space.txt'); \
        file.symlink('/etc/passwd', '/work/out/link.txt'); \
        dir.create('/work/out/sub'); \
        cat('ok\\n')";
    let ran = tp.run(with_artifacts(code, 2, 1 << 20));
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(names(&ran), ["a.txt", "b.txt"], "{}", ran.describe());
    let stderr = ran.stderr();
    for (file, why) in [
        ("out/c.txt", "number of artifacts"),
        ("out/with space.txt", "a name may only have"),
        ("out/link.txt", "not a regular file"),
        ("out/sub", "not a regular file"),
    ] {
        assert!(
            stderr.contains(&format!("{file} was not returned: "))
                && stderr
                    .lines()
                    .any(|l| l.contains(&format!("{file} was not returned")) && l.contains(why)),
            "no note for {file} ({why}) in stderr:\n{stderr}"
        );
    }

    // The total size: a file that would pass it is left out, a smaller later one fits.
    let code = "writeBin(as.raw(rep(1, 5000)), '/work/out/a-big.bin'); \
                writeBin(as.raw(rep(2, 100)), '/work/out/b-small.bin')";
    let ran = tp.run(with_artifacts(code, 10, 1000));
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(names(&ran), ["b-small.bin"], "{}", ran.describe());
    assert!(
        ran.stderr()
            .contains("out/a-big.bin was not returned: the limit on the artifacts' total size"),
        "{}",
        ran.describe()
    );
    tp.finish();
}

/// A plot made with matplotlib and a file written by a shell come back the same way.
#[test]
fn python_figures_and_shell_files_come_back_too() {
    let tp = python_pool(1);
    let ran = tp.run(with_artifacts(
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n\
         plt.plot([1, 2, 3], [3, 1, 2])\nplt.figure()\nplt.bar(['a', 'b'], [1, 2])\n\
         open('/work/out/notes.txt', 'w').write('hi')\nprint('done')",
        10,
        16 << 20,
    ));
    ran.assert_status(ExecStatus::Succeeded);
    let got = artifacts(&ran);
    assert_eq!(
        names(&ran),
        ["plot-001.png", "plot-002.png", "notes.txt"],
        "{}",
        ran.describe()
    );
    assert!(got[0].1.starts_with(PNG_MAGIC) && got[1].1.starts_with(PNG_MAGIC));
    assert_eq!(got[2].1, b"hi");
    tp.finish();

    let tp = bash_pool(1);
    let ran = tp.run(with_artifacts(
        "printf 'x\\ny\\n' > /work/out/lines.txt; echo done",
        10,
        1 << 20,
    ));
    ran.assert_status(ExecStatus::Succeeded);
    assert_eq!(
        artifacts(&ran),
        [("lines.txt".to_string(), b"x\ny\n".to_vec())]
    );
    tp.finish();
}

/// `sandbox serve` (JSON lines) returns artifacts when a request asks for them, with
/// their bytes in base64.
#[test]
fn sandbox_serve_returns_artifacts_in_base64() {
    use base64::Engine as _;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    hatchery_tests::require_root();
    let cgroups = CgroupParent::new();
    let mut serve = Command::new(hatchery_tests::target_profile_dir().join("sandbox"))
        .arg("serve")
        .arg("--rootfs")
        .arg(hatchery_tests::rootfs())
        .args(["--packages", "", "--pool-size", "1", "--cgroup-parent"])
        .arg(&cgroups.rel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sandbox serve");
    let mut stdin = serve.stdin.take().unwrap();
    let stdout = serve.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a line of sandbox serve");
        serde_json::from_str(&line).expect("a JSON line")
    };
    assert_eq!(next()["ok"], true, "the pool is ready");
    writeln!(
        stdin,
        "{}",
        serde_json::json!({"id": "a", "code": "writeLines('hi', '/work/out/x.txt')",
                           "artifacts": {"max_count": 5, "max_bytes": 1000}})
    )
    .unwrap();
    let mut artifacts = Vec::new();
    loop {
        let e = next();
        match e["event"].as_str() {
            Some("artifact") => artifacts.push(e),
            Some("finished") => {
                assert_eq!(e["status"], "succeeded", "{e}");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert_eq!(artifacts[0]["name"], "x.txt");
    assert_eq!(artifacts[0]["bytes"], 3);
    let data = base64::engine::general_purpose::STANDARD
        .decode(artifacts[0]["data_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, b"hi\n");
    drop(stdin);
    let _ = serve.wait();
    cgroups.assert_empty("after sandbox serve ended");
}
