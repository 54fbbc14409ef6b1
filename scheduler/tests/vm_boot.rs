//! Boots a real VM (about 10 s under TCG) and checks that the guest is a pure cgroup v2
//! host that runs the host's own binaries, and that the command's exit status and output
//! come back. Needs qemu-system-x86, linux-image-amd64 and busybox-static
//! (`scripts/vm-test.sh` installs them).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hatchery_scheduler::provider::vm::guest::CGROUP_CHECK_SCRIPT;
use hatchery_scheduler::provider::vm::{
    run_in_guest, CgroupCheck, GuestCommand, GuestExit, GuestOptions,
};

/// The VMs of this file boot one at a time: the check that qemu was reaped looks at every
/// child of this process, so another test's qemu must not be running then.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether this process still has children (qemu must have been reaped).
fn children_of_this_process() -> Vec<String> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(list.split_whitespace().map(str::to_owned));
            }
        }
    }
    children
}

/// A guest of 300 s at most, on the accelerator `HATCHERY_VM_ACCEL` asks for.
fn options(network: bool) -> GuestOptions {
    let mut options = GuestOptions {
        timeout: Duration::from_secs(300),
        network,
        ..GuestOptions::default()
    };
    if let Ok(accel) = std::env::var("HATCHERY_VM_ACCEL") {
        options.accel = accel
            .parse()
            .expect("HATCHERY_VM_ACCEL is auto, kvm or tcg");
    }
    options
}

#[test]
fn guest_is_pure_cgroup_v2_and_returns_exit_status_and_output() {
    let _alone = one_vm_at_a_time();
    let cwd = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The host's dash and coreutils run the probe: dynamically linked host binaries work.
    let script =
        format!("{CGROUP_CHECK_SCRIPT}\necho \"cwd: $PWD env: $HATCHERY_VM_TEST\"\nexit 3\n");
    let command = GuestCommand {
        argv: vec!["/bin/sh".into(), "-c".into(), script],
        cwd: cwd.clone(),
        env: vec![("HATCHERY_VM_TEST".into(), "it's here".into())],
    };
    let options = options(false);

    let outcome = run_in_guest(&command, &options, &AtomicBool::new(false), &mut |_| {})
        .unwrap_or_else(|e| {
            panic!(
                "the vm did not run: {e} (it needs qemu-system-x86, linux-image-amd64 and \
                 busybox-static; scripts/vm-test.sh installs them)"
            )
        });
    eprintln!(
        "accel {} ({:?}), boot to init {:?}, vm {:?}, total {:?}",
        outcome.accel, outcome.why_not_kvm, outcome.boot_to_init, outcome.vm_time, outcome.total
    );
    assert_eq!(
        outcome.exit,
        GuestExit::Exited(3),
        "console tail:\n{}",
        outcome.log_tail
    );

    let output = String::from_utf8_lossy(&outcome.output);
    let check = CgroupCheck::parse(&output);
    assert_eq!(
        check.problems(),
        Vec::<String>::new(),
        "guest output:\n{output}"
    );
    assert!(
        output.contains(&format!("cwd: {} env: it's here", cwd.display())),
        "guest output:\n{output}"
    );
    assert_eq!(outcome.root.as_deref(), Some("overlay"));
    assert!(outcome.boot_to_init.is_some());
    assert_eq!(
        children_of_this_process(),
        Vec::<String>::new(),
        "qemu was reaped"
    );
}

/// With a network, the guest reaches a service on the host's loopback at
/// `USER_NET_HOST` (how a VM host reaches the cluster's PostgreSQL, Redis and S3): a
/// line sent from the guest arrives, and the guest reads the host's answer.
#[test]
fn a_guest_with_a_network_reaches_a_host_loopback_service() {
    let _alone = one_vm_at_a_time();
    use hatchery_scheduler::provider::vm::qemu::USER_NET_HOST;
    use std::io::{BufRead, BufReader, Write};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (stream, peer) = listener.accept().expect("the guest connects");
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(b"hello guest\n").unwrap();
        (line, peer)
    });
    // bash's /dev/tcp: a host binary, no nc needed.
    let script = format!(
        "exec 3<>/dev/tcp/{USER_NET_HOST}/{port} && echo \"hello host\" >&3 && read -r answer <&3 && echo \"got: $answer\""
    );
    let command = GuestCommand {
        argv: vec!["/bin/bash".into(), "-c".into(), script],
        cwd: PathBuf::from("/"),
        env: Vec::new(),
    };
    let options = options(true);
    let outcome = run_in_guest(&command, &options, &AtomicBool::new(false), &mut |_| {})
        .unwrap_or_else(|e| panic!("the vm did not run: {e}"));
    let output = String::from_utf8_lossy(&outcome.output);
    assert_eq!(
        outcome.exit,
        GuestExit::Exited(0),
        "guest output:\n{output}\nconsole tail:\n{}",
        outcome.log_tail
    );
    assert!(
        output.contains("got: hello guest"),
        "guest output:\n{output}"
    );
    let (line, peer) = server.join().expect("the server thread");
    assert_eq!(line, "hello host\n");
    assert!(peer.ip().is_loopback(), "{peer}");
}
