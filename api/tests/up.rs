//! What is particular to `hatchery up`, the one-machine platform: its configuration and
//! CLI (a policy that admits nothing, roles without the cluster's engines, tokens from
//! one config), its data directory on disk (sealed at rest, key rotation) and the
//! OpenAPI document it serves. The behaviour every platform shares — on `hatchery up` and
//! on a cluster — is in `e2e.rs` (run on a cluster by the `e2e_cluster` target).
//!
//! Needs root, the root filesystem (`/var/lib/hatchery/rootfs/r`, or `HATCHERY_ROOTFS`)
//! and the sandbox binaries built in the same profile (`cargo build -p hatchery-sandbox`).

mod harness;
use harness::*;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[test]
fn the_openapi_document_matches_the_routes() {
    e2e(async {
        let file: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
        assert_eq!(file["openapi"], "3.1.0");
        let documented: BTreeSet<(String, String)> = file["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                    .map(move |m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = hatchery_api::routes::ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        // Every documented path parameter is declared, and every $ref resolves.
        for (path, ops) in file["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                for name in path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                {
                    let declared = op["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["name"] == name && p["in"] == "path")
                    });
                    assert!(
                        declared,
                        "{method} {path}: path parameter {name} undeclared"
                    );
                }
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}"
                );
            }
        }
        let text = include_str!("../openapi.json");
        for piece in text.split("\"$ref\": \"#/").skip(1) {
            let target = &piece[..piece.find('"').unwrap()];
            let mut node = &file;
            for part in target.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref #/{target}");
        }
        // The error codes the API answers are the documented ones.
        let codes: BTreeSet<&str> = file["components"]["schemas"]["Error"]["properties"]["error"]
            ["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let known: BTreeSet<&str> = hatchery_api::error::ERROR_CODES.iter().copied().collect();
        assert_eq!(codes, known);

        // Served as written, and every route is really served (no 404/405 from the router).
        let h = Hatchery::started(Setup::default()).await;
        let r = http(&h, "GET", "/v1/openapi.json", None, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), file);
        let root = h.token("hatchery", "root", "superadmin");
        for route in hatchery_api::routes::ROUTES {
            let path = route
                .path
                .replace("{id}", "x")
                .replace("{org}", "acme")
                .replace("{user}", "ann")
                .replace("{file}", "app.js");
            let r = http(&h, route.method, &path, Some(&root), None).await;
            let code = if r.status >= 400 {
                r.code()
            } else {
                String::new()
            };
            assert!(
                code != "unknown_route" && code != "method_not_allowed",
                "{} {} is documented but answers {code}",
                route.method,
                route.path
            );
        }
    });
}

#[test]
fn up_refuses_a_default_policy_that_admits_nothing() {
    // Serial: should the refusal regress, this starts a real platform.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("h.toml");
    let data = dir.path().join("data");
    let cgroup_parent = format!("hatchery/e2e-{}-refuse", std::process::id());
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nrootfs = \"{}\"\n\
             [agent]\npool_size = 1\ncgroup_parent = \"{cgroup_parent}\"\n\
             [platform]\nlanguages = [\"r\"]\n",
            data.display(),
            rootfs().display()
        ),
    )
    .unwrap();
    for (setting, value, names) in [
        (
            "HATCHERY_MAX_PARALLEL",
            "0",
            &[
                "platform.default_policy.max_parallel",
                "HATCHERY_MAX_PARALLEL",
            ][..],
        ),
        (
            "HATCHERY_MAX_PARALLEL",
            "-2",
            &["HATCHERY_MAX_PARALLEL", "negative"][..],
        ),
        (
            "HATCHERY_MAX_QUEUED",
            "0",
            &["platform.max_queued", "HATCHERY_MAX_QUEUED"][..],
        ),
    ] {
        let mut cmd = Command::new(HATCHERY);
        for (var, _) in hatchery_api::config::ENV_VARS {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .arg("up")
            .arg("--config")
            .arg(&config)
            .env(setting, value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
                remove_cgroup_parent(&cgroup_parent);
                panic!("`{setting}={value} hatchery up` is still running after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{setting}={value}: {status}");
        for name in names {
            assert!(err.contains(name), "{setting}={value}: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).is_empty(),
            "nothing was started"
        );
        assert!(!data.exists(), "nothing was created");
    }
}

#[test]
fn split_roles_without_the_cluster_engines_say_what_they_need() {
    for role in ["api", "scheduler", "agent"] {
        let mut cmd = Command::new(HATCHERY);
        for (var, _) in hatchery_api::config::ENV_VARS {
            cmd.env_remove(var);
        }
        let out = cmd
            .arg(role)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{role}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("store.postgres_url")
                && err.contains("store.redis_url")
                && err.contains("hatchery up"),
            "{role}: {err}"
        );
    }
}

#[test]
fn tokens_from_the_same_config_share_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("h.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.path().join("data").display()),
    )
    .unwrap();
    let mint = |role: &str| {
        let out = Command::new(HATCHERY)
            .args([
                "token", "create", "--org", "acme", "--user", "ann", "--role", role, "--ttl", "1h",
            ])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    let (ok, token) = mint("org_admin");
    assert!(ok);
    assert_eq!(token.split('.').count(), 3);
    let keys = hatchery_api::config::Keys::read(&dir.path().join("data/keys.toml")).unwrap();
    let p = hatchery_api::auth::Auth::new(&keys.signing_key)
        .verify(&token)
        .unwrap();
    assert_eq!((p.org.as_str(), p.user.as_str()), ("acme", "ann"));
    let (ok, _) = mint("king");
    assert!(!ok);
}

// ---------------------------------------------------------------- sealed at rest (R15)

/// The marker as bytes and in base64 at each of the 3 alignments (without the characters
/// that also depend on neighbouring bytes), in both alphabets.
fn marker_forms(marker: &str) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use base64::Engine as _;
    let mut forms = vec![marker.as_bytes().to_vec()];
    for pad in 0..3 {
        let bytes = [&vec![0u8; pad][..], marker.as_bytes()].concat();
        for engine in [STANDARD, URL_SAFE] {
            let text = engine.encode(&bytes);
            forms.push(text.as_bytes()[4..text.len() - 4].to_vec());
        }
    }
    forms
}

/// Every file and every folder under `dir` (`dir` included among the folders).
fn tree(dir: &std::path::Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut dirs) = (Vec::new(), vec![dir.to_path_buf()]);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
                stack.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    (files, dirs)
}

/// No file under the data dir holds the marker in any form; files are 0600, folders 0700.
fn assert_sealed_and_private(data: &std::path::Path, marker: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let forms = marker_forms(marker);
    let (files, dirs) = tree(data);
    // At least the keys and an execution's log.
    assert!(
        files.iter().any(|f| f.ends_with("keys.toml"))
            && files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "log")),
        "{files:?}"
    );
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        for form in &forms {
            assert!(
                !raw.windows(form.len()).any(|w| w == form.as_slice()),
                "{} holds {:?}",
                f.display(),
                String::from_utf8_lossy(form)
            );
        }
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
}

/// The key ids in the headers of everything stored for execution `id`: each line of its
/// log (small code travels in its record, a small result in its `finished` event), and
/// the code and result objects where they were large enough to be objects.
fn key_ids_of_execution(data: &std::path::Path, id: &str) -> BTreeSet<u32> {
    use base64::Engine as _;
    use hatchery_scheduler::seal::key_id_of;
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut ids = BTreeSet::new();
    for object in [
        format!("objects/code/{id}"),
        format!("objects/results/{id}"),
    ] {
        let path = data.join(object);
        if path.exists() {
            ids.insert(key_id_of(&read(path)).unwrap());
        }
    }
    let log = read(data.join(format!("store/executions/{id}.log")));
    for line in String::from_utf8(log).unwrap().lines() {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(line)
            .unwrap();
        ids.insert(key_id_of(&blob).unwrap());
    }
    ids
}

fn assert_marker_everywhere(events: &[Value], v: &Value, marker: &str) {
    let has = |e: &Value, field: &str| e[field].as_str().is_some_and(|s| s.contains(marker));
    for kind in ["stdout", "stderr"] {
        assert!(
            events.iter().any(|e| e["type"] == kind && has(e, "data")),
            "no {kind} with the marker: {events:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "progress" && e["message"] == marker),
        "{events:?}"
    );
    let fin = events.last().unwrap();
    assert_eq!(fin["type"], "finished");
    assert_eq!(
        fin["value_json"],
        json!(serde_json::to_string(marker).unwrap())
    );
    assert!(
        fin["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains(marker)),
        "{fin}"
    );
    assert_eq!(state(v), "succeeded", "{v}");
    assert_eq!(
        v["result"]["value_json"],
        json!(serde_json::to_string(marker).unwrap())
    );
}

#[test]
fn what_a_user_produced_is_sealed_at_rest_and_survives_a_key_rotation() {
    e2e(async {
        let marker = format!("MARKER-{}-SEALED", uuid::Uuid::new_v4().simple());
        let code =
            format!("x <- \"{marker}\"; cat(x); message(x); progress(0.5, x); warning(x); x");
        let mut h = Hatchery::started(Setup::default()).await;
        let data = h.dir.join("data");
        let t = h.token("acme", "ann", "user");

        // The API gives everything back in the clear.
        let old = run_r(&h, &t, &code).await;
        let v = wait_terminal(&h, &t, &old).await;
        let events = all_events(&h, &t, &old).await;
        assert_marker_everywhere(&events, &v, &marker);

        // On disk: nothing of it, all of it sealed with key 1, every file private.
        h.stop_with(libc::SIGTERM);
        assert_sealed_and_private(&data, &marker);
        assert_eq!(key_ids_of_execution(&data, &old), BTreeSet::from([1]));

        // Rotate: key 2 becomes current, key 1 stays.
        let out = Command::new(HATCHERY)
            .args(["admin", "rotate-key", "--config"])
            .arg(&h.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("encryption key 2"), "{said}");
        let keys = hatchery_api::config::Keys::read(&data.join("keys.toml")).unwrap();
        assert_eq!(keys.current_key, 2);
        assert_eq!(keys.encryption_keys.len(), 2);

        // After a restart the old execution reads back the same; new work uses key 2.
        h.spawn();
        h.ready().await;
        let again = execution(&h, &t, &old).await;
        assert_eq!(again["result"], v["result"]);
        assert_eq!(all_events(&h, &t, &old).await, events);
        let new = run_r(&h, &t, &code).await;
        let v = wait_terminal(&h, &t, &new).await;
        let events = all_events(&h, &t, &new).await;
        assert_marker_everywhere(&events, &v, &marker);
        h.stop_with(libc::SIGTERM);
        assert_sealed_and_private(&data, &marker);
        assert_eq!(key_ids_of_execution(&data, &old), BTreeSet::from([1]));
        assert_eq!(key_ids_of_execution(&data, &new), BTreeSet::from([2]));
    });
}
