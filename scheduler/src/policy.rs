//! Resource policy (R3, R8): resolving the effective policy of a user (user override ▷
//! org policy ▷ platform default, field by field), checking a policy an admin sets, and
//! turning a request's asked-for limits into the limits an execution runs with.
//!
//! This module never clamps: a request above the caller's policy is refused with a
//! message naming the field, what was asked and what is allowed, so nothing is ever
//! silently exceeded or silently reduced. It is pure (no I/O), so every rule is a unit
//! test.

use crate::model::{EffectivePolicy, Limits, Policy, RequestedLimits};

/// Smallest memory a sandbox may be given (an interpreter does not start below it).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest memory a policy may name (16 TiB: far beyond any host, so only typos hit it).
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
/// Largest CPU count a policy may name.
pub const MAX_CPUS: f64 = 1024.0;
/// Fewest pids a sandbox may be given (the interpreter and a few helpers).
pub const MIN_PIDS: u64 = 8;
pub const MAX_PIDS: u64 = 1_000_000;
/// Shortest and longest time limit (100 ms and 7 days).
pub const MIN_TIME_LIMIT_MS: u64 = 100;
pub const MAX_TIME_LIMIT_MS: u64 = 7 * 24 * 3600 * 1000;
pub const MAX_PARALLEL: u32 = 1000;
pub const MAX_WARM_POOL_SIZE: u32 = 1000;

/// The effective policy: for each field the user's override if set, else the org's, else
/// the platform default.
pub fn resolve(
    default: &EffectivePolicy,
    org: Option<&Policy>,
    user: Option<&Policy>,
) -> EffectivePolicy {
    fn pick<T: Copy>(user: Option<T>, org: Option<T>, default: T) -> T {
        user.or(org).unwrap_or(default)
    }
    let u = user.cloned().unwrap_or_default();
    let o = org.cloned().unwrap_or_default();
    EffectivePolicy {
        memory_bytes: pick(u.memory_bytes, o.memory_bytes, default.memory_bytes),
        cpus: pick(u.cpus, o.cpus, default.cpus),
        pids: pick(u.pids, o.pids, default.pids),
        time_limit_ms: pick(u.time_limit_ms, o.time_limit_ms, default.time_limit_ms),
        max_parallel: pick(u.max_parallel, o.max_parallel, default.max_parallel),
        warm_pool_size: pick(u.warm_pool_size, o.warm_pool_size, default.warm_pool_size),
    }
}

fn check_u64(errors: &mut Vec<String>, field: &str, value: Option<u64>, min: u64, max: u64) {
    if let Some(v) = value {
        if v < min || v > max {
            errors.push(format!(
                "{field} is {v}; it must be between {min} and {max}"
            ));
        }
    }
}

fn cpus_ok(v: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= MAX_CPUS
}

/// Checks a policy an admin sets: every field that is set must be within its sane range
/// (no zero, negative, NaN or absurd values). The message lists every bad field.
pub fn validate_policy(p: &Policy) -> Result<(), String> {
    let mut errors = Vec::new();
    check_u64(
        &mut errors,
        "memory_bytes",
        p.memory_bytes,
        MIN_MEMORY_BYTES,
        MAX_MEMORY_BYTES,
    );
    if let Some(c) = p.cpus {
        if !cpus_ok(c) {
            errors.push(format!(
                "cpus is {c}; it must be a number above 0 and at most {MAX_CPUS}"
            ));
        }
    }
    check_u64(&mut errors, "pids", p.pids, MIN_PIDS, MAX_PIDS);
    check_u64(
        &mut errors,
        "time_limit_ms",
        p.time_limit_ms,
        MIN_TIME_LIMIT_MS,
        MAX_TIME_LIMIT_MS,
    );
    check_u64(
        &mut errors,
        "max_parallel",
        p.max_parallel.map(u64::from),
        1,
        u64::from(MAX_PARALLEL),
    );
    check_u64(
        &mut errors,
        "warm_pool_size",
        p.warm_pool_size.map(u64::from),
        0,
        u64::from(MAX_WARM_POOL_SIZE),
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// One integer limit: the policy's value when not asked for; refused when below the
/// floor or above the policy.
fn limit_u64(field: &str, requested: Option<u64>, allowed: u64, min: u64) -> Result<u64, String> {
    match requested {
        None => Ok(allowed),
        Some(v) if v < min => Err(format!(
            "{field}: requested {v}, the smallest accepted is {min}"
        )),
        Some(v) if v > allowed => Err(format!(
            "{field}: requested {v} exceeds the allowed {allowed}"
        )),
        Some(v) => Ok(v),
    }
}

/// The limits an execution runs with: each requested field must be positive, at least
/// its floor ([`MIN_MEMORY_BYTES`], [`MIN_PIDS`], [`MIN_TIME_LIMIT_MS`]) and at most the
/// caller's effective policy; a missing field takes the policy's value. A request above
/// the policy is refused (never clamped), naming the field, the requested and the
/// allowed value. Every bad field is reported.
pub fn limits_for(
    effective: &EffectivePolicy,
    requested: Option<&RequestedLimits>,
) -> Result<Limits, String> {
    let r = requested.cloned().unwrap_or_default();
    let mut errors = Vec::new();
    let mut keep = |res: Result<u64, String>, fallback: u64| match res {
        Ok(v) => v,
        Err(e) => {
            errors.push(e);
            fallback
        }
    };
    let memory_bytes = keep(
        limit_u64(
            "memory_bytes",
            r.memory_bytes,
            effective.memory_bytes,
            MIN_MEMORY_BYTES,
        ),
        0,
    );
    let pids = keep(limit_u64("pids", r.pids, effective.pids, MIN_PIDS), 0);
    let time_limit_ms = keep(
        limit_u64(
            "time_limit_ms",
            r.time_limit_ms,
            effective.time_limit_ms,
            MIN_TIME_LIMIT_MS,
        ),
        0,
    );
    let cpus = match r.cpus {
        None => effective.cpus,
        Some(c) if !(c.is_finite() && c > 0.0) => {
            errors.push(format!("cpus: requested {c}, it must be a number above 0"));
            0.0
        }
        Some(c) if c > effective.cpus => {
            errors.push(format!(
                "cpus: requested {c} exceeds the allowed {}",
                effective.cpus
            ));
            0.0
        }
        Some(c) => c,
    };
    if errors.is_empty() {
        Ok(Limits {
            memory_bytes,
            cpus,
            pids,
            time_limit_ms,
        })
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> EffectivePolicy {
        EffectivePolicy::default()
    }

    #[test]
    fn resolve_without_overrides_is_the_default() {
        assert_eq!(resolve(&default(), None, None), default());
        let empty = Policy::default();
        assert_eq!(resolve(&default(), Some(&empty), Some(&empty)), default());
    }

    #[test]
    fn resolve_user_over_org_over_default_field_by_field() {
        let org = Policy {
            memory_bytes: Some(1 << 30),
            cpus: Some(2.0),
            max_parallel: Some(4),
            ..Default::default()
        };
        let user = Policy {
            cpus: Some(0.5),
            time_limit_ms: Some(5_000),
            ..Default::default()
        };
        let e = resolve(&default(), Some(&org), Some(&user));
        assert_eq!(e.memory_bytes, 1 << 30, "org");
        assert_eq!(e.cpus, 0.5, "user beats org");
        assert_eq!(e.time_limit_ms, 5_000, "user");
        assert_eq!(e.max_parallel, 4, "org");
        assert_eq!(e.pids, default().pids, "default");
        assert_eq!(e.warm_pool_size, default().warm_pool_size, "default");
        // A user override without an org policy still applies.
        let e = resolve(&default(), None, Some(&user));
        assert_eq!(e.cpus, 0.5);
        assert_eq!(e.memory_bytes, default().memory_bytes);
    }

    #[test]
    fn validate_accepts_sane_and_empty_policies() {
        assert!(validate_policy(&Policy::default()).is_ok());
        let p = Policy {
            memory_bytes: Some(200 << 30),
            cpus: Some(64.0),
            pids: Some(4096),
            time_limit_ms: Some(3_600_000),
            max_parallel: Some(1),
            warm_pool_size: Some(0),
        };
        assert!(validate_policy(&p).is_ok());
        let edges = Policy {
            memory_bytes: Some(MIN_MEMORY_BYTES),
            cpus: Some(MAX_CPUS),
            pids: Some(MAX_PIDS),
            time_limit_ms: Some(MAX_TIME_LIMIT_MS),
            max_parallel: Some(MAX_PARALLEL),
            warm_pool_size: Some(MAX_WARM_POOL_SIZE),
        };
        assert!(validate_policy(&edges).is_ok());
    }

    #[test]
    fn validate_refuses_zero_negative_nan_and_absurd() {
        let bad = [
            Policy {
                memory_bytes: Some(0),
                ..Default::default()
            },
            Policy {
                memory_bytes: Some(MIN_MEMORY_BYTES - 1),
                ..Default::default()
            },
            Policy {
                memory_bytes: Some(MAX_MEMORY_BYTES + 1),
                ..Default::default()
            },
            Policy {
                cpus: Some(0.0),
                ..Default::default()
            },
            Policy {
                cpus: Some(-1.0),
                ..Default::default()
            },
            Policy {
                cpus: Some(f64::NAN),
                ..Default::default()
            },
            Policy {
                cpus: Some(f64::INFINITY),
                ..Default::default()
            },
            Policy {
                cpus: Some(1024.5),
                ..Default::default()
            },
            Policy {
                pids: Some(7),
                ..Default::default()
            },
            Policy {
                pids: Some(1_000_001),
                ..Default::default()
            },
            Policy {
                time_limit_ms: Some(99),
                ..Default::default()
            },
            Policy {
                time_limit_ms: Some(MAX_TIME_LIMIT_MS + 1),
                ..Default::default()
            },
            Policy {
                max_parallel: Some(0),
                ..Default::default()
            },
            Policy {
                max_parallel: Some(1001),
                ..Default::default()
            },
            Policy {
                warm_pool_size: Some(1001),
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(validate_policy(&p).is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn validate_names_every_bad_field() {
        let p = Policy {
            memory_bytes: Some(1),
            pids: Some(0),
            ..Default::default()
        };
        let e = validate_policy(&p).unwrap_err();
        assert!(e.contains("memory_bytes") && e.contains("pids"), "{e}");
    }

    #[test]
    fn limits_default_to_the_policy() {
        let p = default();
        let want = Limits {
            memory_bytes: p.memory_bytes,
            cpus: p.cpus,
            pids: p.pids,
            time_limit_ms: p.time_limit_ms,
        };
        assert_eq!(limits_for(&p, None).unwrap(), want);
        assert_eq!(
            limits_for(&p, Some(&RequestedLimits::default())).unwrap(),
            want
        );
    }

    #[test]
    fn limits_take_requested_values_within_the_policy() {
        let p = default();
        let r = RequestedLimits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.25),
            pids: None,
            time_limit_ms: Some(p.time_limit_ms),
        };
        let l = limits_for(&p, Some(&r)).unwrap();
        assert_eq!(l.memory_bytes, 64 << 20);
        assert_eq!(l.cpus, 0.25);
        assert_eq!(l.pids, p.pids);
        assert_eq!(l.time_limit_ms, p.time_limit_ms);
    }

    #[test]
    fn limits_above_the_policy_are_refused_not_clamped() {
        let p = default();
        let r = RequestedLimits {
            memory_bytes: Some(p.memory_bytes + 1),
            ..Default::default()
        };
        let e = limits_for(&p, Some(&r)).unwrap_err();
        assert!(e.contains("memory_bytes"), "{e}");
        assert!(e.contains(&(p.memory_bytes + 1).to_string()), "{e}");
        assert!(e.contains(&p.memory_bytes.to_string()), "{e}");

        let r = RequestedLimits {
            cpus: Some(1.5),
            ..Default::default()
        };
        let e = limits_for(&p, Some(&r)).unwrap_err();
        assert!(
            e.contains("cpus") && e.contains("1.5") && e.contains('1'),
            "{e}"
        );

        let r = RequestedLimits {
            pids: Some(p.pids * 2),
            time_limit_ms: Some(p.time_limit_ms + 1),
            ..Default::default()
        };
        let e = limits_for(&p, Some(&r)).unwrap_err();
        assert!(e.contains("pids") && e.contains("time_limit_ms"), "{e}");
    }

    #[test]
    fn limits_zero_negative_nan_are_refused() {
        let p = default();
        let bad = [
            RequestedLimits {
                memory_bytes: Some(0),
                ..Default::default()
            },
            RequestedLimits {
                memory_bytes: Some(1),
                ..Default::default()
            },
            RequestedLimits {
                cpus: Some(0.0),
                ..Default::default()
            },
            RequestedLimits {
                cpus: Some(-2.0),
                ..Default::default()
            },
            RequestedLimits {
                cpus: Some(f64::NAN),
                ..Default::default()
            },
            RequestedLimits {
                cpus: Some(f64::NEG_INFINITY),
                ..Default::default()
            },
            RequestedLimits {
                pids: Some(0),
                ..Default::default()
            },
            RequestedLimits {
                time_limit_ms: Some(0),
                ..Default::default()
            },
        ];
        for r in bad {
            assert!(limits_for(&p, Some(&r)).is_err(), "{r:?} accepted");
        }
    }

    #[test]
    fn limits_follow_a_raised_policy() {
        // R4: a big policy allows a big request.
        let p = EffectivePolicy {
            memory_bytes: 256 << 30,
            cpus: 64.0,
            ..default()
        };
        let r = RequestedLimits {
            memory_bytes: Some(200 << 30),
            cpus: Some(48.0),
            ..Default::default()
        };
        let l = limits_for(&p, Some(&r)).unwrap();
        assert_eq!(l.memory_bytes, 200 << 30);
        assert_eq!(l.cpus, 48.0);
    }
}
