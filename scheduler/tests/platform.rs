//! The platform front door without an agent: validation, policy resolution and refusal
//! of limits above policy, admission through the store (tab supersede, parallelism cap),
//! visibility (another user's execution is `NotFound`), admin rights, cancel, follow,
//! and retention (objects before records).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hatchery_scheduler::bus::{BusEvent, Received};
use hatchery_scheduler::embedded::{EmbeddedBus, EmbeddedStore};
use hatchery_scheduler::encrypted::{generate_key, EncryptedObjects};
use hatchery_scheduler::model::{
    artifact_content_type, ArtifactInfo, CancelReason, EventBody, ExecState, Policy, Principal,
    RequestedLimits, ResultSummary, Role, INLINE_CODE_MAX,
};
use hatchery_scheduler::objects::{ObjectError, Objects};
use hatchery_scheduler::platform::{
    ListQuery, Platform, PlatformConfig, PlatformError, SubmitRequest,
};
use hatchery_scheduler::seal::Keyring;
use hatchery_scheduler::store::Store;

struct Fixture {
    platform: Platform,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::single(generate_key());
    let store = EmbeddedStore::open(&dir.path().join("store"), keyring.clone()).unwrap();
    let objects = EncryptedObjects::local(&dir.path().join("objects"), keyring).unwrap();
    let platform = Platform {
        config: Arc::new(PlatformConfig::default()),
        store: Arc::new(store),
        bus: Arc::new(EmbeddedBus::new()),
        objects: Arc::new(objects),
    };
    Fixture {
        platform,
        _dir: dir,
    }
}

fn who(org: &str, user: &str, role: Role) -> Principal {
    Principal {
        org: org.into(),
        user: user.into(),
        role,
    }
}

fn req(code: &str, tab: Option<&str>) -> SubmitRequest {
    SubmitRequest {
        language: "r".into(),
        code: code.into(),
        tab_id: tab.map(String::from),
        model_id: None,
        limits: None,
    }
}

#[tokio::test]
async fn submit_stores_encrypted_code_and_queues_with_policy_limits() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let rec = f
        .platform
        .submit(&alice, req("secret_model <- 42", None))
        .await
        .unwrap();
    assert_eq!(rec.state, ExecState::Queued);
    assert_eq!(rec.limits.memory_bytes, 512 << 20, "platform default");
    // Small code travels in the (sealed) record, which the API never shows with it.
    assert_eq!(rec.code, None, "the API's copy carries no code");
    assert_eq!(rec.code_key, "");
    let stored = f.platform.store.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(stored.code.as_deref(), Some("secret_model <- 42"));
    let view = f.platform.get(&alice, &rec.id).await.unwrap();
    assert_eq!(view.record.id, rec.id);
    assert_eq!(view.record.code, None);
    assert!(view.result.is_none());
    let listed = f
        .platform
        .list(&alice, &ListQuery::default())
        .await
        .unwrap();
    assert!(listed.iter().all(|r| r.code.is_none()), "{listed:?}");
    // The scheduler was told.
    assert_eq!(
        f.platform.bus.next_submitted().await.unwrap(),
        hatchery_scheduler::bus::submission(&rec.id, &rec.language, rec.limits.resources())
    );

    // Larger code is an object of its own, sealed.
    let large = format!("x <- '{}'", "a".repeat(INLINE_CODE_MAX));
    let rec = f.platform.submit(&alice, req(&large, None)).await.unwrap();
    assert_eq!(rec.code_key, format!("code/{}", rec.id));
    let stored = f.platform.store.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(stored.code, None);
    let code = f.platform.objects.get(&rec.code_key).await.unwrap();
    assert_eq!(code, large.as_bytes());

    // Once an execution is over its record drops the code.
    let first = f
        .platform
        .list(&alice, &ListQuery::default())
        .await
        .unwrap();
    let small = first
        .iter()
        .find(|r| r.code_key.is_empty())
        .unwrap()
        .id
        .clone();
    f.platform.cancel(&alice, &small).await.unwrap();
    let stored = f.platform.store.get(&small).await.unwrap().unwrap();
    assert_eq!(stored.state, ExecState::Cancelled);
    assert_eq!(stored.code, None);
    // Its result is what its `finished` event says (no result object).
    let view = f.platform.get(&alice, &small).await.unwrap();
    assert_eq!(view.record.result_key, None);
    let result = view.result.expect("a terminal execution shows its result");
    assert_eq!(result.state, ExecState::Cancelled);
    assert_eq!(
        result.error_code.as_deref(),
        Some("cancelled"),
        "{result:?}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_their_codes() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let mut r = req("1", None);
    r.language = "cobol".into();
    let e = f.platform.submit(&alice, r).await.unwrap_err();
    assert_eq!(e.code(), "unknown_language");

    let big = "x".repeat(f.platform.config.max_code_bytes + 1);
    let e = f
        .platform
        .submit(&alice, req(&big, None))
        .await
        .unwrap_err();
    assert!(matches!(e, PlatformError::CodeTooLarge { .. }));

    for limits in [
        RequestedLimits {
            memory_bytes: Some(1 << 40),
            ..Default::default()
        },
        RequestedLimits {
            cpus: Some(-1.0),
            ..Default::default()
        },
        RequestedLimits {
            time_limit_ms: Some(0),
            ..Default::default()
        },
    ] {
        let mut r = req("1", None);
        r.limits = Some(limits.clone());
        let e = f.platform.submit(&alice, r).await.unwrap_err();
        assert_eq!(e.code(), "invalid_limits", "{limits:?}: {e}");
    }
    let mut r = req("1", Some(""));
    r.tab_id = Some(String::new());
    assert_eq!(
        f.platform.submit(&alice, r).await.unwrap_err().code(),
        "invalid_request"
    );
    // Nothing was stored by the refusals.
    assert!(f
        .platform
        .list(&alice, &ListQuery::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn policy_user_over_org_over_default_applies_to_the_next_submit() {
    let f = fixture();
    let root = who("hatchery", "root", Role::Superadmin);
    let alice = who("acme", "alice", Role::User);
    f.platform
        .put_org_policy(
            &root,
            "acme",
            Policy {
                memory_bytes: Some(2 << 30),
                max_parallel: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    f.platform
        .put_user_policy(
            &root,
            "acme",
            "alice",
            Policy {
                memory_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let eff = f.platform.effective_policy("acme", "alice").await.unwrap();
    assert_eq!(eff.memory_bytes, 1 << 30);
    assert_eq!(eff.max_parallel, 3);
    let bob_eff = f.platform.effective_policy("acme", "bob").await.unwrap();
    assert_eq!(bob_eff.memory_bytes, 2 << 30);
    let rec = f.platform.submit(&alice, req("1", None)).await.unwrap();
    assert_eq!(rec.limits.memory_bytes, 1 << 30);
    // Asking above the policy is refused, at the policy is fine.
    let mut r = req("1", None);
    r.limits = Some(RequestedLimits {
        memory_bytes: Some((1 << 30) + 1),
        ..Default::default()
    });
    assert_eq!(
        f.platform.submit(&alice, r).await.unwrap_err().code(),
        "invalid_limits"
    );
    // Absurd policies are refused too.
    let e = f
        .platform
        .put_org_policy(
            &root,
            "acme",
            Policy {
                cpus: Some(0.0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_limits");
}

#[tokio::test]
async fn only_a_superadmin_sets_org_policy_and_org_admins_only_their_orgs_overrides() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let admin = who("acme", "boss", Role::OrgAdmin);
    let root = who("hatchery", "root", Role::Superadmin);
    let p = Policy {
        pids: Some(64),
        ..Default::default()
    };
    for caller in [&alice, &admin] {
        let e = f
            .platform
            .put_org_policy(caller, "acme", p.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "forbidden", "{caller:?}");
    }
    // An org admin cannot raise its own org either, however modestly.
    let e = f
        .platform
        .put_org_policy(
            &admin,
            "acme",
            Policy {
                memory_bytes: Some(16 << 40),
                max_parallel: Some(1000),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, PlatformError::Forbidden(_)), "{e:?}");
    assert_eq!(f.platform.store.get_org_policy("acme").await.unwrap(), None);
    f.platform
        .put_org_policy(&root, "acme", p.clone())
        .await
        .unwrap();
    // The org admin still reads its own org's policy, not another's.
    assert_eq!(f.platform.get_org_policy(&admin, "acme").await.unwrap(), p);
    assert_eq!(
        f.platform
            .get_org_policy(&admin, "globex")
            .await
            .unwrap_err()
            .code(),
        "forbidden"
    );
    assert_eq!(
        f.platform
            .get_org_policy(&alice, "acme")
            .await
            .unwrap_err()
            .code(),
        "forbidden"
    );
    // User overrides: in its own org only.
    f.platform
        .put_user_policy(&admin, "acme", "alice", p.clone())
        .await
        .unwrap();
    for (caller, org) in [(&admin, "globex"), (&alice, "acme")] {
        assert_eq!(
            f.platform
                .put_user_policy(caller, org, "alice", p.clone())
                .await
                .unwrap_err()
                .code(),
            "forbidden"
        );
    }
    assert_eq!(
        f.platform.running(&alice).await.unwrap_err().code(),
        "forbidden"
    );
    match f.platform.monitor(&alice).await {
        Err(PlatformError::Forbidden(_)) => {}
        Err(e) => panic!("a user opening the monitor got {e:?}, not forbidden"),
        Ok(_) => panic!("a user opened the monitor"),
    }
}

#[tokio::test]
async fn org_admin_overrides_stay_within_the_org_and_a_superadmin_may_set_any() {
    let f = fixture();
    let admin = who("acme", "boss", Role::OrgAdmin);
    let root = who("hatchery", "root", Role::Superadmin);
    let d = f.platform.config.default_policy.clone();
    f.platform
        .put_org_policy(
            &root,
            "acme",
            Policy {
                memory_bytes: Some(1 << 30),
                cpus: Some(2.0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Above the org's policy, field by field: refused with every field, value and
    // allowance; nothing is stored.
    let e = f
        .platform
        .put_user_policy(
            &admin,
            "acme",
            "alice",
            Policy {
                memory_bytes: Some(2 << 30),
                cpus: Some(1.5),
                max_parallel: Some(d.max_parallel + 1),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "policy_exceeds_org");
    let PlatformError::PolicyExceedsOrg(errors) = &e else {
        panic!("{e:?}")
    };
    let fields: Vec<&str> = errors
        .0
        .iter()
        .filter_map(|e| e.field().map(|f| f.name()))
        .collect();
    assert_eq!(fields, vec!["memory_bytes", "max_parallel"], "{e}");
    let text = e.to_string();
    assert!(
        text.contains("memory_bytes: 2147483648 exceeds the org's allowance 1073741824"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "max_parallel: {} exceeds the org's allowance {}",
            d.max_parallel + 1,
            d.max_parallel
        )),
        "{text}"
    );
    assert_eq!(
        f.platform
            .store
            .get_user_policy("acme", "alice")
            .await
            .unwrap(),
        None
    );
    // Absurd values stay `invalid_limits`, checked first.
    let e = f
        .platform
        .put_user_policy(
            &admin,
            "acme",
            "alice",
            Policy {
                memory_bytes: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_limits");
    // At the allowance is fine.
    let view = f
        .platform
        .put_user_policy(
            &admin,
            "acme",
            "alice",
            Policy {
                memory_bytes: Some(1 << 30),
                cpus: Some(0.5),
                max_parallel: Some(d.max_parallel),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(view.effective.memory_bytes, 1 << 30);
    assert_eq!(view.effective.cpus, 0.5);
    assert!(view.capped_by_org.is_empty());
    // A superadmin may set any override; the effective policy still never exceeds the
    // org's, and the view says which fields the org caps.
    let view = f
        .platform
        .put_user_policy(
            &root,
            "acme",
            "bob",
            Policy {
                memory_bytes: Some(8 << 30),
                pids: Some(4096),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(view.policy.memory_bytes, Some(8 << 30));
    assert_eq!(view.effective.memory_bytes, 1 << 30);
    assert_eq!(view.effective.pids, d.pids);
    assert_eq!(view.capped_by_org, vec!["memory_bytes", "pids"]);
    let read = f
        .platform
        .get_user_policy(&admin, "acme", "bob")
        .await
        .unwrap();
    assert_eq!(read.policy, view.policy);
    assert_eq!(read.effective, view.effective);
}

#[tokio::test]
async fn lowering_an_org_below_existing_overrides_caps_them_at_once() {
    let f = fixture();
    let admin = who("acme", "boss", Role::OrgAdmin);
    let root = who("hatchery", "root", Role::Superadmin);
    let alice = who("acme", "alice", Role::User);
    let org = |memory_bytes: u64, max_parallel: u32| Policy {
        memory_bytes: Some(memory_bytes),
        max_parallel: Some(max_parallel),
        ..Default::default()
    };
    f.platform
        .put_org_policy(&root, "acme", org(4 << 30, 4))
        .await
        .unwrap();
    f.platform
        .put_user_policy(&admin, "acme", "alice", org(2 << 30, 3))
        .await
        .unwrap();
    let rec = f.platform.submit(&alice, req("1", None)).await.unwrap();
    assert_eq!(rec.limits.memory_bytes, 2 << 30);

    // The superadmin lowers the org below alice's override: accepted, and it applies to
    // her next execution.
    f.platform
        .put_org_policy(&root, "acme", org(512 << 20, 1))
        .await
        .unwrap();
    let eff = f.platform.effective_policy("acme", "alice").await.unwrap();
    assert_eq!((eff.memory_bytes, eff.max_parallel), (512 << 20, 1));
    let second = f.platform.submit(&alice, req("2", None)).await.unwrap();
    assert_eq!(second.limits.memory_bytes, 512 << 20);
    // max_parallel is capped too: her first execution went to make room for it.
    let first = f.platform.get(&alice, &rec.id).await.unwrap().record;
    assert_eq!(first.cancel, Some(CancelReason::ParallelismCap));
    let mut r = req("3", None);
    r.limits = Some(RequestedLimits {
        memory_bytes: Some(1 << 30),
        ..Default::default()
    });
    assert_eq!(
        f.platform.submit(&alice, r).await.unwrap_err().code(),
        "invalid_limits"
    );
    // The override is kept as stored, and shown as capped.
    let view = f
        .platform
        .get_user_policy(&admin, "acme", "alice")
        .await
        .unwrap();
    assert_eq!(view.policy, org(2 << 30, 3));
    assert_eq!(view.effective.memory_bytes, 512 << 20);
    assert_eq!(view.capped_by_org, vec!["memory_bytes", "max_parallel"]);
    // Raising the org again restores it.
    f.platform
        .put_org_policy(&root, "acme", org(4 << 30, 4))
        .await
        .unwrap();
    let eff = f.platform.effective_policy("acme", "alice").await.unwrap();
    assert_eq!((eff.memory_bytes, eff.max_parallel), (2 << 30, 3));
}

#[tokio::test]
async fn e_mail_style_users_run_and_get_policies() {
    let f = fixture();
    let root = who("hatchery", "root", Role::Superadmin);
    let admin = who("acme", "boss", Role::OrgAdmin);
    for name in ["ada@example.com", "ada+lab@example.co.uk"] {
        let ada = who("acme", name, Role::User);
        let p = Policy {
            memory_bytes: Some(128 << 20),
            ..Default::default()
        };
        let view = f
            .platform
            .put_user_policy(&admin, "acme", name, p.clone())
            .await
            .unwrap();
        assert_eq!(view.user, name);
        let read = f
            .platform
            .get_user_policy(&root, "acme", name)
            .await
            .unwrap();
        assert_eq!(read.policy, p);
        let rec = f.platform.submit(&ada, req("1", None)).await.unwrap();
        assert_eq!(rec.user, name);
        assert_eq!(rec.limits.memory_bytes, 128 << 20);
        assert_eq!(
            f.platform.get(&ada, &rec.id).await.unwrap().record.id,
            rec.id
        );
    }
    // Names that could leave the store's folder are still refused.
    for bad in ["../ada@example.com", "ada/x", ".ada"] {
        let e = f
            .platform
            .put_user_policy(&root, "acme", bad, Policy::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "invalid_request", "{bad}");
    }
}

#[tokio::test]
async fn other_users_and_orgs_get_not_found_never_forbidden() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let bob = who("acme", "bob", Role::User);
    let eve = who("globex", "alice", Role::User);
    let acme_admin = who("acme", "boss", Role::OrgAdmin);
    let rec = f.platform.submit(&alice, req("1", None)).await.unwrap();
    for intruder in [&bob, &eve] {
        assert_eq!(
            f.platform.get(intruder, &rec.id).await.unwrap_err(),
            PlatformError::NotFound
        );
        assert_eq!(
            f.platform.cancel(intruder, &rec.id).await.unwrap_err(),
            PlatformError::NotFound
        );
        match f.platform.follow(intruder, &rec.id, 0).await {
            Err(PlatformError::NotFound) => {}
            Err(e) => panic!("{intruder:?} following another's execution got {e:?}, not NotFound"),
            Ok(_) => panic!("{intruder:?} followed another user's execution"),
        }
        assert!(f
            .platform
            .list(intruder, &ListQuery::default())
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        f.platform.get(&alice, "no-such-id").await.unwrap_err(),
        PlatformError::NotFound
    );
    // The org's admin may read and cancel it.
    f.platform.get(&acme_admin, &rec.id).await.unwrap();
    let after = f.platform.cancel(&acme_admin, &rec.id).await.unwrap();
    assert_eq!(after.state, ExecState::Cancelled);
}

#[tokio::test]
async fn same_tab_supersedes_and_the_cap_cancels_the_oldest() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let mut live = f.platform.bus.subscribe_events();
    let t1 = f
        .platform
        .submit(&alice, req("1", Some("tab-1")))
        .await
        .unwrap();
    let t2 = f
        .platform
        .submit(&alice, req("2", Some("tab-2")))
        .await
        .unwrap();
    let t1b = f
        .platform
        .submit(&alice, req("3", Some("tab-1")))
        .await
        .unwrap();
    let get = |id: String| {
        let p = f.platform.clone();
        let a = alice.clone();
        async move { p.get(&a, &id).await.unwrap().record }
    };
    let r1 = get(t1.id.clone()).await;
    assert_eq!(r1.state, ExecState::Cancelled);
    assert_eq!(r1.cancel, Some(CancelReason::SupersededByTab));
    assert_eq!(get(t2.id.clone()).await.state, ExecState::Queued);
    assert_eq!(get(t1b.id.clone()).await.state, ExecState::Queued);
    // A third active one goes over the default cap of 2: the oldest (t2) is cancelled.
    let t3 = f.platform.submit(&alice, req("4", None)).await.unwrap();
    let r2 = get(t2.id.clone()).await;
    assert_eq!(r2.state, ExecState::Cancelled);
    assert_eq!(r2.cancel, Some(CancelReason::ParallelismCap));
    assert_eq!(get(t3.id.clone()).await.state, ExecState::Queued);
    // Cancelled executions' `finished` events were published live.
    let mut finished = Vec::new();
    while let Some(Received::Item(e)) = live.try_recv() {
        if let BusEvent::Stored(e) = e {
            if matches!(e.body, EventBody::Finished(_)) {
                finished.push(e.execution_id);
            }
        }
    }
    assert!(
        finished.contains(&t1.id) && finished.contains(&t2.id),
        "{finished:?}"
    );
    // A follower that comes later gets the whole story from the store.
    let follow = f.platform.follow(&alice, &t1.id, 0).await.unwrap();
    let kinds: Vec<_> = follow.backlog.iter().map(|e| e.seq).collect();
    assert_eq!(kinds, vec![1, 2]);
    assert!(matches!(follow.backlog[0].body, EventBody::Queued));
    assert!(matches!(follow.backlog[1].body, EventBody::Finished(_)));
    let resumed = f.platform.follow(&alice, &t1.id, 1).await.unwrap();
    assert_eq!(resumed.backlog.len(), 1);
}

#[tokio::test]
async fn list_filters_by_tab_and_state_newest_first() {
    let f = fixture();
    let alice = who("acme", "alice", Role::User);
    let a = f
        .platform
        .submit(&alice, req("1", Some("t")))
        .await
        .unwrap();
    let b = f
        .platform
        .submit(&alice, req("2", Some("u")))
        .await
        .unwrap();
    let by_tab = f
        .platform
        .list(
            &alice,
            &ListQuery {
                tab_id: Some("t".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(by_tab.len(), 1);
    assert_eq!(by_tab[0].id, a.id);
    let queued = f
        .platform
        .list(
            &alice,
            &ListQuery {
                state: Some(ExecState::Queued),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0].id, b.id, "newest first");
    let e = f
        .platform
        .list(
            &alice,
            &ListQuery {
                limit: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, PlatformError::Invalid(_)), "limit 0: {e:?}");
}

/// Objects whose deletions fail while `failures` is above zero, and that note, for every
/// deletion, whether the record of the execution the object belongs to still existed.
struct FlakyObjects {
    inner: EncryptedObjects,
    store: Arc<dyn Store>,
    failures: AtomicUsize,
    deleted: Mutex<Vec<(String, bool)>>,
}

#[async_trait::async_trait]
impl Objects for FlakyObjects {
    async fn put(&self, key: &str, plaintext: Vec<u8>) -> Result<(), ObjectError> {
        self.inner.put(key, plaintext).await
    }
    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(ObjectError::Io(format!("deleting {key}: injected failure")));
        }
        let id = key.rsplit('/').next().unwrap_or_default();
        let row = self.store.get(id).await.unwrap().is_some();
        self.deleted.lock().unwrap().push((key.to_string(), row));
        self.inner.delete(key).await
    }
    async fn delete_folder(&self, prefix: &str) -> Result<usize, ObjectError> {
        self.inner.delete_folder(prefix).await
    }
}

/// A platform on `store` and `objects` that keeps finished executions for a minute.
fn retaining_for_a_minute(store: &Arc<dyn Store>, objects: Arc<dyn Objects>) -> Platform {
    Platform {
        config: Arc::new(PlatformConfig {
            retention_ms: 60_000,
            ..PlatformConfig::default()
        }),
        store: Arc::clone(store),
        bus: Arc::new(EmbeddedBus::new()),
        objects,
    }
}

#[tokio::test]
async fn retention_deletes_objects_before_records_and_keeps_a_record_whose_objects_stay() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::single(generate_key());
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store"), keyring.clone()).unwrap());
    let objects = Arc::new(FlakyObjects {
        inner: EncryptedObjects::local(&dir.path().join("objects"), keyring).unwrap(),
        store: Arc::clone(&store),
        failures: AtomicUsize::new(0),
        deleted: Mutex::new(Vec::new()),
    });
    let platform = retaining_for_a_minute(&store, objects.clone());
    let users = ["a", "b", "c", "d"].map(|u| who("acme", u, Role::User));
    // Code too large to travel in the record: each execution names a code object.
    let large = format!("x <- '{}'", "a".repeat(INLINE_CODE_MAX));
    let mut ids = Vec::new();
    for u in &users {
        ids.push(platform.submit(u, req(&large, None)).await.unwrap().id);
    }
    // Finished long ago with a result; the fourth stays queued.
    let finish = |id: String| {
        let (store, objects) = (Arc::clone(&store), objects.clone());
        async move {
            let key = format!("results/{id}");
            objects.put(&key, b"{}".to_vec()).await.unwrap();
            let summary = ResultSummary::bare(ExecState::Succeeded, "test", None);
            store
                .finish(&id, ExecState::Succeeded, Some(key), 1, summary)
                .await
                .unwrap();
        }
    };
    let has_object = |key: String| {
        let objects = objects.clone();
        async move {
            match objects.inner.get(&key).await {
                Ok(_) => true,
                Err(ObjectError::NotFound(_)) => false,
                Err(e) => panic!("{key}: {e}"),
            }
        }
    };
    finish(ids[0].clone()).await;
    finish(ids[1].clone()).await;

    // The first deletion fails: that execution keeps its record and its objects.
    objects.failures.store(1, Ordering::SeqCst);
    assert_eq!(platform.expire_old().await.unwrap(), 1);
    let mut left = Vec::new();
    for id in &ids[..2] {
        if store.get(id).await.unwrap().is_some() {
            left.push(id.clone());
        }
    }
    assert_eq!(left.len(), 1, "{left:?}");
    let kept = &left[0];
    assert!(has_object(format!("code/{kept}")).await);
    assert!(has_object(format!("results/{kept}")).await);
    assert!(store.events_after(kept, 0).await.is_ok());

    // The next pass removes both.
    assert_eq!(platform.expire_old().await.unwrap(), 1);

    // As if a pass crashed after deleting an execution's objects: the next one deletes
    // its record all the same.
    finish(ids[2].clone()).await;
    objects
        .inner
        .delete(&format!("code/{}", ids[2]))
        .await
        .unwrap();
    objects
        .inner
        .delete(&format!("results/{}", ids[2]))
        .await
        .unwrap();
    assert_eq!(platform.expire_old().await.unwrap(), 1);

    for id in &ids[..3] {
        assert!(store.get(id).await.unwrap().is_none(), "{id}");
        assert!(!has_object(format!("code/{id}")).await, "{id}");
        assert!(!has_object(format!("results/{id}")).await, "{id}");
    }
    // Every object went while its record was still there (objects first), and the
    // queued one was not touched.
    let deleted = objects.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 6, "{deleted:?}");
    assert!(deleted.iter().all(|(_, row)| *row), "{deleted:?}");
    assert!(store.get(&ids[3]).await.unwrap().is_some());
    assert!(has_object(format!("code/{}", ids[3])).await);
    assert_eq!(platform.expire_old().await.unwrap(), 0);
}

/// Retention deletes an execution's artifacts with it: the ones its record lists, and
/// for an execution lost while it ran (its agent died after storing some, before its
/// result listed them) its whole artifact folder.
#[tokio::test]
async fn retention_deletes_artifacts_listed_and_those_of_lost_runs() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::single(generate_key());
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store"), keyring.clone()).unwrap());
    let objects = Arc::new(EncryptedObjects::local(&dir.path().join("objects"), keyring).unwrap());
    let platform = retaining_for_a_minute(&store, objects.clone());
    let u = who("acme", "a", Role::User);
    let done = platform.submit(&u, req("1", None)).await.unwrap().id;
    let lost = platform.submit(&u, req("2", None)).await.unwrap().id;
    let info = |name: &str| ArtifactInfo {
        name: name.into(),
        bytes: 1,
        content_type: artifact_content_type(name).into(),
    };
    for (id, name) in [
        (&done, "plot-001.png"),
        (&done, "t.csv"),
        (&lost, "plot-001.png"),
    ] {
        objects
            .put(&ArtifactInfo::key(id, name), b"x".to_vec())
            .await
            .unwrap();
    }
    for id in [&done, &lost] {
        store.mark_running(id, "agent-a", 1).await.unwrap();
    }
    let mut summary = ResultSummary::bare(ExecState::Succeeded, "test", None);
    summary.artifacts = vec![info("plot-001.png"), info("t.csv")];
    store
        .finish(&done, ExecState::Succeeded, None, 1, summary)
        .await
        .unwrap();
    assert_eq!(
        store.get(&done).await.unwrap().unwrap().artifacts,
        vec![info("plot-001.png"), info("t.csv")],
        "the record lists its artifacts"
    );
    let bare = ResultSummary::bare(ExecState::Lost, "agent_restarted", None);
    store
        .finish(&lost, ExecState::Lost, None, 1, bare)
        .await
        .unwrap();

    assert_eq!(platform.expire_old().await.unwrap(), 2);
    for (id, name) in [
        (&done, "plot-001.png"),
        (&done, "t.csv"),
        (&lost, "plot-001.png"),
    ] {
        let key = ArtifactInfo::key(id, name);
        assert!(
            matches!(objects.get(&key).await, Err(ObjectError::NotFound(_))),
            "{key} is still stored"
        );
    }
    // The folders went with their last files.
    assert!(!dir.path().join("objects/artifacts").join(&done).exists());
    assert!(!dir.path().join("objects/artifacts").join(&lost).exists());
}

#[tokio::test]
async fn with_host_groups_a_request_no_group_can_hold_is_refused_and_the_demand_is_counted_per_group(
) {
    use hatchery_scheduler::autoscale::GroupConfig;
    use hatchery_scheduler::model::{RequestedLimits, Resources};
    let mut f = fixture();
    let group = |name: &str, gib: u64, cpus: f64| GroupConfig {
        name: name.into(),
        shape: Resources::new(gib << 30, cpus),
        languages: vec!["r".into()],
        min: 0,
        max: 4,
        scale_down_after: std::time::Duration::from_secs(600),
        cooldown_up: std::time::Duration::ZERO,
        cooldown_down: std::time::Duration::ZERO,
        pool_size: None,
        provider: "static".into(),
    };
    f.platform.config = Arc::new(PlatformConfig {
        groups: vec![group("small", 1, 1.0), group("big", 8, 4.0)],
        ..PlatformConfig::default()
    });
    let root = who("hatchery", "root", Role::Superadmin);
    f.platform
        .put_org_policy(
            &root,
            "acme",
            Policy {
                memory_bytes: Some(64 << 30),
                cpus: Some(16.0),
                max_parallel: Some(10),
                ..Policy::default()
            },
        )
        .await
        .unwrap();
    let alice = who("acme", "alice", Role::User);
    let sized = |gib: u64, cpus: f64| SubmitRequest {
        limits: Some(RequestedLimits {
            memory_bytes: Some(gib << 30),
            cpus: Some(cpus),
            pids: None,
            time_limit_ms: None,
        }),
        ..req("1", None)
    };
    // 16 GiB, or 6 cpus, fits no group: refused, naming the largest.
    for (gib, cpus) in [(16, 1.0), (2, 6.0)] {
        match f.platform.submit(&alice, sized(gib, cpus)).await {
            Err(e @ PlatformError::ExceedsLargestGroup { .. }) => {
                assert_eq!(e.code(), "exceeds_largest_group");
                let m = e.to_string();
                assert!(m.contains("big") && m.contains("8 GiB and 4 cpus"), "{m}");
            }
            other => panic!("{gib} GiB / {cpus} cpus: {other:?}"),
        }
    }
    // What fits a group is admitted (no host need be up: the group scales), and counted
    // against the smallest group that holds it.
    for (gib, cpus) in [(1, 1.0), (1, 0.5), (4, 2.0)] {
        f.platform.submit(&alice, sized(gib, cpus)).await.unwrap();
    }
    let groups = f.platform.groups(&root).await.unwrap();
    let demand: Vec<(&str, u32, Resources)> = groups
        .iter()
        .map(|d| (d.group.name.as_str(), d.queued, d.queued_need))
        .collect();
    assert_eq!(
        demand,
        [
            ("small", 2, Resources::new(2 << 30, 1.5)),
            ("big", 1, Resources::new(4 << 30, 2.0)),
        ]
    );
    assert!(matches!(
        f.platform.groups(&alice).await,
        Err(PlatformError::Forbidden(_))
    ));
    // alice's default limits (64 GiB) fit no group: no room is kept for her.
    assert!(groups.iter().all(|d| d.reserved == 0), "{groups:?}");

    // globex may use big only (a policy naming a group that does not exist is
    // refused): its 1 GiB run is counted against big, and its active user keeps room
    // for 2 runs (the default warm_pool_size) at its default limits (4 GiB, 1 CPU)
    // there.
    let only = |g: &[&str]| Policy {
        groups: Some(g.iter().map(|s| s.to_string()).collect()),
        memory_bytes: Some(4 << 30),
        ..Policy::default()
    };
    let e = f
        .platform
        .put_org_policy(&root, "globex", only(&["big", "gpu"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gpu is not a host group"), "{e}");
    f.platform
        .put_org_policy(&root, "globex", only(&["big"]))
        .await
        .unwrap();
    let gil = who("globex", "gil", Role::User);
    let r = f.platform.submit(&gil, sized(1, 0.5)).await.unwrap();
    assert_eq!(r.groups, Some(vec!["big".to_string()]));
    let groups = f.platform.groups(&root).await.unwrap();
    let big = &groups[1];
    assert_eq!((big.group.name.as_str(), big.queued), ("big", 2));
    assert_eq!(big.reserved, 2);
    assert_eq!(big.reserved_need, Resources::new(8 << 30, 2.0));
    assert_eq!(big.active_users, ["globex/gil"]);
    assert_eq!(groups[0].reserved, 0);
    // initech may use small only: 2 GiB is refused, naming small as its largest.
    f.platform
        .put_org_policy(&root, "initech", only(&["small"]))
        .await
        .unwrap();
    let ida = who("initech", "ida", Role::User);
    match f.platform.submit(&ida, sized(2, 1.0)).await {
        Err(e @ PlatformError::ExceedsLargestGroup { .. }) => {
            assert!(e.to_string().contains("small"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}
