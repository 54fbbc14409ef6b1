//! Resource policy (R3, R8): the sane range of every policy field, resolving the
//! effective policy of a user (user override ▷ org policy ▷ platform default, field by
//! field, never above what the org allows), checking a policy an admin sets, and turning
//! a request's asked-for limits into the limits an execution runs with.
//!
//! One validation serves every place a policy value appears: a request's limits, a
//! stored org policy or user override, and the platform default checked at start
//! ([`Field::check`]). Requests and admin writes are never clamped: a value out of range
//! or above what is allowed is refused with a typed error naming the field, the value
//! and the allowance. The only clamp is at resolution: a user override above its org's
//! allowance (possible when a superadmin set it, or lowered the org after an org admin
//! set it) counts as the org's allowance, so the effective policy never exceeds the
//! org's. It is pure (no I/O), so every rule is a unit test.

use std::fmt;

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
pub const MAX_ARTIFACTS: u32 = 1000;
/// Largest total size of one execution's artifacts a policy may name (1 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// A field of a policy (and, for the first four, of a request's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    MemoryBytes,
    Cpus,
    Pids,
    TimeLimitMs,
    MaxParallel,
    WarmPoolSize,
    MaxArtifacts,
    MaxArtifactBytes,
}

/// A value of a field: whole numbers for all but `cpus`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Whole(u64),
    Cpus(f64),
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Whole(n) => write!(f, "{n}"),
            Amount::Cpus(c) => write!(f, "{c}"),
        }
    }
}

impl Amount {
    /// Whether `self` is larger than `other` (same kind; NaN is never "larger", and is
    /// refused by [`Field::check`] before any comparison).
    fn exceeds(self, other: Amount) -> bool {
        match (self, other) {
            (Amount::Whole(a), Amount::Whole(b)) => a > b,
            (Amount::Cpus(a), Amount::Cpus(b)) => a > b,
            _ => false,
        }
    }
}

impl Field {
    pub const ALL: [Field; 8] = [
        Field::MemoryBytes,
        Field::Cpus,
        Field::Pids,
        Field::TimeLimitMs,
        Field::MaxParallel,
        Field::WarmPoolSize,
        Field::MaxArtifacts,
        Field::MaxArtifactBytes,
    ];

    /// The field's name in policies, requests and configuration.
    pub fn name(self) -> &'static str {
        match self {
            Field::MemoryBytes => "memory_bytes",
            Field::Cpus => "cpus",
            Field::Pids => "pids",
            Field::TimeLimitMs => "time_limit_ms",
            Field::MaxParallel => "max_parallel",
            Field::WarmPoolSize => "warm_pool_size",
            Field::MaxArtifacts => "max_artifacts",
            Field::MaxArtifactBytes => "max_artifact_bytes",
        }
    }

    /// The inclusive range of whole-number fields (`cpus` has its own rule).
    fn whole_range(self) -> (u64, u64) {
        match self {
            Field::MemoryBytes => (MIN_MEMORY_BYTES, MAX_MEMORY_BYTES),
            Field::Pids => (MIN_PIDS, MAX_PIDS),
            Field::TimeLimitMs => (MIN_TIME_LIMIT_MS, MAX_TIME_LIMIT_MS),
            Field::MaxParallel => (1, u64::from(MAX_PARALLEL)),
            Field::WarmPoolSize => (0, u64::from(MAX_WARM_POOL_SIZE)),
            Field::MaxArtifacts => (0, u64::from(MAX_ARTIFACTS)),
            Field::MaxArtifactBytes => (0, MAX_ARTIFACT_BYTES),
            Field::Cpus => (0, 0),
        }
    }

    /// What a value of this field must be, for messages.
    pub fn range_text(self) -> String {
        match self {
            Field::Cpus => format!("a number above 0 and at most {MAX_CPUS}"),
            _ => {
                let (min, max) = self.whole_range();
                format!("between {min} and {max}")
            }
        }
    }

    /// The one sanity rule of a value of this field, wherever it appears: no zero (but
    /// for `warm_pool_size` and the artifact limits), negative, NaN, infinite or absurd
    /// value.
    pub fn check(self, value: Amount) -> Result<(), PolicyError> {
        let ok = match value {
            Amount::Cpus(c) => self == Field::Cpus && c.is_finite() && c > 0.0 && c <= MAX_CPUS,
            Amount::Whole(n) => {
                let (min, max) = self.whole_range();
                self != Field::Cpus && (min..=max).contains(&n)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(PolicyError::OutOfRange { field: self, value })
        }
    }

    /// This field of a policy, if set.
    pub fn of_policy(self, p: &Policy) -> Option<Amount> {
        match self {
            Field::MemoryBytes => p.memory_bytes.map(Amount::Whole),
            Field::Cpus => p.cpus.map(Amount::Cpus),
            Field::Pids => p.pids.map(Amount::Whole),
            Field::TimeLimitMs => p.time_limit_ms.map(Amount::Whole),
            Field::MaxParallel => p.max_parallel.map(|n| Amount::Whole(n.into())),
            Field::WarmPoolSize => p.warm_pool_size.map(|n| Amount::Whole(n.into())),
            Field::MaxArtifacts => p.max_artifacts.map(|n| Amount::Whole(n.into())),
            Field::MaxArtifactBytes => p.max_artifact_bytes.map(Amount::Whole),
        }
    }

    /// This field of a resolved policy.
    pub fn of_effective(self, p: &EffectivePolicy) -> Amount {
        match self {
            Field::MemoryBytes => Amount::Whole(p.memory_bytes),
            Field::Cpus => Amount::Cpus(p.cpus),
            Field::Pids => Amount::Whole(p.pids),
            Field::TimeLimitMs => Amount::Whole(p.time_limit_ms),
            Field::MaxParallel => Amount::Whole(p.max_parallel.into()),
            Field::WarmPoolSize => Amount::Whole(p.warm_pool_size.into()),
            Field::MaxArtifacts => Amount::Whole(p.max_artifacts.into()),
            Field::MaxArtifactBytes => Amount::Whole(p.max_artifact_bytes),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem with a policy value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// Outside the field's sane range (see [`Field::check`]).
    #[error("{field} is {value}; it must be {}", field.range_text())]
    OutOfRange { field: Field, value: Amount },
    /// A request's limit above the caller's effective policy.
    #[error("{field}: requested {value} exceeds the allowed {allowed}")]
    AboveAllowance {
        field: Field,
        value: Amount,
        allowed: Amount,
    },
    /// A user override (set by an org admin) above what the org allows: the org's
    /// policy, else the platform default.
    #[error("{field}: {value} exceeds the org's allowance {allowed}")]
    AboveOrg {
        field: Field,
        value: Amount,
        allowed: Amount,
    },
    /// A `groups` list that is empty, repeats a name or has a malformed one.
    #[error("groups: {0}")]
    Groups(String),
    /// A user override's `groups` naming groups its org may not use.
    #[error("groups: {} not among the org's groups ({})", .outside.join(", "), .allowed.join(", "))]
    GroupsAboveOrg {
        outside: Vec<String>,
        allowed: Vec<String>,
    },
}

impl PolicyError {
    /// The numeric field the error is about (`None` for `groups`).
    pub fn field(&self) -> Option<Field> {
        match self {
            PolicyError::OutOfRange { field, .. }
            | PolicyError::AboveAllowance { field, .. }
            | PolicyError::AboveOrg { field, .. } => Some(*field),
            PolicyError::Groups(_) | PolicyError::GroupsAboveOrg { .. } => None,
        }
    }
}

/// Every problem found in one policy or request (never empty), in field order.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

fn collect(errors: Vec<PolicyError>) -> Result<(), PolicyErrors> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(errors))
    }
}

/// What an org allows its users: the org's policy, else the platform default, field by
/// field.
pub fn org_allowance(default: &EffectivePolicy, org: Option<&Policy>) -> EffectivePolicy {
    let o = org.cloned().unwrap_or_default();
    EffectivePolicy {
        memory_bytes: o.memory_bytes.unwrap_or(default.memory_bytes),
        cpus: o.cpus.unwrap_or(default.cpus),
        pids: o.pids.unwrap_or(default.pids),
        time_limit_ms: o.time_limit_ms.unwrap_or(default.time_limit_ms),
        max_parallel: o.max_parallel.unwrap_or(default.max_parallel),
        warm_pool_size: o.warm_pool_size.unwrap_or(default.warm_pool_size),
        max_artifacts: o.max_artifacts.unwrap_or(default.max_artifacts),
        max_artifact_bytes: o.max_artifact_bytes.unwrap_or(default.max_artifact_bytes),
        groups: narrowed(default.groups.as_deref(), o.groups.as_deref()),
    }
}

/// The groups of `wanted` that `allowed` lets through (`None`: any), in `wanted`'s
/// order. A list that keeps nothing of `wanted` counts as `allowed`, as every field
/// set above its allowance does.
fn narrowed(allowed: Option<&[String]>, wanted: Option<&[String]>) -> Option<Vec<String>> {
    match (allowed, wanted) {
        (allowed, None) => allowed.map(<[String]>::to_vec),
        (None, Some(w)) => Some(w.to_vec()),
        (Some(a), Some(w)) => {
            let kept: Vec<String> = w.iter().filter(|g| a.contains(g)).cloned().collect();
            Some(if kept.is_empty() { a.to_vec() } else { kept })
        }
    }
}

/// The effective policy: for each field the user's override if set, else the org's,
/// else the platform default — and never above the org's allowance ([`org_allowance`]):
/// an override above it counts as the allowance. So lowering an org's policy takes
/// effect for every user of the org at once (on their next execution), whatever their
/// overrides say; raising it again restores the overrides as stored.
pub fn resolve(
    default: &EffectivePolicy,
    org: Option<&Policy>,
    user: Option<&Policy>,
) -> EffectivePolicy {
    let allow = org_allowance(default, org);
    let u = user.cloned().unwrap_or_default();
    fn capped<T: Copy + PartialOrd>(user: Option<T>, allowed: T) -> T {
        match user {
            Some(v) if v <= allowed => v,
            _ => allowed,
        }
    }
    EffectivePolicy {
        memory_bytes: capped(u.memory_bytes, allow.memory_bytes),
        cpus: capped(u.cpus, allow.cpus),
        pids: capped(u.pids, allow.pids),
        time_limit_ms: capped(u.time_limit_ms, allow.time_limit_ms),
        max_parallel: capped(u.max_parallel, allow.max_parallel),
        warm_pool_size: capped(u.warm_pool_size, allow.warm_pool_size),
        max_artifacts: capped(u.max_artifacts, allow.max_artifacts),
        max_artifact_bytes: capped(u.max_artifact_bytes, allow.max_artifact_bytes),
        groups: narrowed(allow.groups.as_deref(), u.groups.as_deref()),
    }
}

/// The fields of a user override that the org's allowance caps (set above it; `groups`
/// when it names groups the org may not use), for showing admins what [`resolve`] does
/// with them.
pub fn capped_fields(
    default: &EffectivePolicy,
    org: Option<&Policy>,
    user: &Policy,
) -> Vec<&'static str> {
    let allow = org_allowance(default, org);
    let mut capped: Vec<&'static str> = Field::ALL
        .into_iter()
        .filter(|f| {
            f.of_policy(user)
                .is_some_and(|v| v.exceeds(f.of_effective(&allow)))
        })
        .map(Field::name)
        .collect();
    if groups_outside(user, &allow).is_some() {
        capped.push("groups");
    }
    capped
}

/// Checks a policy an admin sets: every field that is set must pass [`Field::check`],
/// and `groups`, if set, must name at least one group, each well formed and once (that
/// the groups exist is the platform's check: it knows the configuration). Every bad
/// field is reported.
pub fn validate_policy(p: &Policy) -> Result<(), PolicyErrors> {
    let mut errors: Vec<PolicyError> = Field::ALL
        .into_iter()
        .filter_map(|f| f.of_policy(p).and_then(|v| f.check(v).err()))
        .collect();
    if let Some(groups) = &p.groups {
        if let Err(e) = check_groups(groups) {
            errors.push(e);
        }
    }
    collect(errors)
}

/// The rule of a `groups` list: at least one name, each a valid group name, none twice.
pub fn check_groups(groups: &[String]) -> Result<(), PolicyError> {
    if groups.is_empty() {
        return Err(PolicyError::Groups(
            "name at least one group (leave the field out for any group)".into(),
        ));
    }
    if let Some(bad) = groups
        .iter()
        .find(|g| !crate::autoscale::valid_group_name(g))
    {
        return Err(PolicyError::Groups(format!(
            "{bad:?} is not a group name (1 to 64 letters, digits, - and _)"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = groups.iter().find(|g| !seen.insert(g.as_str())) {
        return Err(PolicyError::Groups(format!("{twice:?} is named twice")));
    }
    Ok(())
}

/// Checks a platform default policy (every field is set): the same rule as
/// [`validate_policy`].
pub fn validate_default(p: &EffectivePolicy) -> Result<(), PolicyErrors> {
    collect(
        Field::ALL
            .into_iter()
            .filter_map(|f| f.check(f.of_effective(p)).err())
            .collect(),
    )
}

/// Checks a user override an org admin sets against what the org allows
/// ([`org_allowance`]): every set field must be at most the allowance. Every field above
/// it is reported ([`PolicyError::AboveOrg`]). Run [`validate_policy`] first.
pub fn check_within_org(user: &Policy, allowance: &EffectivePolicy) -> Result<(), PolicyErrors> {
    let mut errors: Vec<PolicyError> = Field::ALL
        .into_iter()
        .filter_map(|f| {
            let value = f.of_policy(user)?;
            let allowed = f.of_effective(allowance);
            value.exceeds(allowed).then_some(PolicyError::AboveOrg {
                field: f,
                value,
                allowed,
            })
        })
        .collect();
    if let Some(e) = groups_outside(user, allowance) {
        errors.push(e);
    }
    collect(errors)
}

/// The groups of a user override its org's allowance does not let through.
pub fn groups_outside(user: &Policy, allowance: &EffectivePolicy) -> Option<PolicyError> {
    let (Some(wanted), Some(allowed)) = (&user.groups, &allowance.groups) else {
        return None;
    };
    let outside: Vec<String> = wanted
        .iter()
        .filter(|g| !allowed.contains(g))
        .cloned()
        .collect();
    (!outside.is_empty()).then(|| PolicyError::GroupsAboveOrg {
        outside,
        allowed: allowed.clone(),
    })
}

/// The limits an execution runs with: each requested field must pass [`Field::check`]
/// and be at most the caller's effective policy; a missing field takes the policy's
/// value. A request above the policy is refused (never clamped), naming the field, the
/// requested and the allowed value. Every bad field is reported.
pub fn limits_for(
    effective: &EffectivePolicy,
    requested: Option<&RequestedLimits>,
) -> Result<Limits, PolicyErrors> {
    let r = requested.cloned().unwrap_or_default();
    let asked = Policy {
        memory_bytes: r.memory_bytes,
        cpus: r.cpus,
        pids: r.pids,
        time_limit_ms: r.time_limit_ms,
        max_parallel: None,
        warm_pool_size: None,
        max_artifacts: None,
        max_artifact_bytes: None,
        groups: None,
    };
    let mut errors = Vec::new();
    for f in Field::ALL {
        let Some(value) = f.of_policy(&asked) else {
            continue;
        };
        let allowed = f.of_effective(effective);
        if let Err(e) = f.check(value) {
            errors.push(e);
        } else if value.exceeds(allowed) {
            errors.push(PolicyError::AboveAllowance {
                field: f,
                value,
                allowed,
            });
        }
    }
    collect(errors)?;
    Ok(Limits {
        memory_bytes: r.memory_bytes.unwrap_or(effective.memory_bytes),
        cpus: r.cpus.unwrap_or(effective.cpus),
        pids: r.pids.unwrap_or(effective.pids),
        time_limit_ms: r.time_limit_ms.unwrap_or(effective.time_limit_ms),
        max_artifacts: effective.max_artifacts,
        max_artifact_bytes: effective.max_artifact_bytes,
    })
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
            max_artifacts: Some(0),
            max_artifact_bytes: Some(0),
            groups: Some(vec!["small".into()]),
        };
        assert!(validate_policy(&p).is_ok());
        let edges = Policy {
            memory_bytes: Some(MIN_MEMORY_BYTES),
            cpus: Some(MAX_CPUS),
            pids: Some(MAX_PIDS),
            time_limit_ms: Some(MAX_TIME_LIMIT_MS),
            max_parallel: Some(MAX_PARALLEL),
            warm_pool_size: Some(MAX_WARM_POOL_SIZE),
            max_artifacts: Some(MAX_ARTIFACTS),
            max_artifact_bytes: Some(MAX_ARTIFACT_BYTES),
            groups: Some(vec!["g".repeat(64)]),
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
        let fields: Vec<Field> = e.0.iter().filter_map(PolicyError::field).collect();
        assert_eq!(fields, vec![Field::MemoryBytes, Field::Pids]);
        let e = e.to_string();
        assert!(
            e.contains("memory_bytes is 1") && e.contains("pids is 0"),
            "{e}"
        );
    }

    #[test]
    fn limits_default_to_the_policy() {
        let p = default();
        let want = Limits {
            memory_bytes: p.memory_bytes,
            cpus: p.cpus,
            pids: p.pids,
            time_limit_ms: p.time_limit_ms,
            max_artifacts: p.max_artifacts,
            max_artifact_bytes: p.max_artifact_bytes,
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
        assert_eq!(
            e.0,
            vec![PolicyError::AboveAllowance {
                field: Field::MemoryBytes,
                value: Amount::Whole(p.memory_bytes + 1),
                allowed: Amount::Whole(p.memory_bytes),
            }]
        );
        let e = e.to_string();
        assert!(e.contains("memory_bytes"), "{e}");
        assert!(e.contains(&(p.memory_bytes + 1).to_string()), "{e}");
        assert!(e.contains(&p.memory_bytes.to_string()), "{e}");

        let r = RequestedLimits {
            cpus: Some(1.5),
            ..Default::default()
        };
        let e = limits_for(&p, Some(&r)).unwrap_err().to_string();
        assert!(
            e.contains("cpus") && e.contains("1.5") && e.contains('1'),
            "{e}"
        );

        let r = RequestedLimits {
            pids: Some(p.pids * 2),
            time_limit_ms: Some(p.time_limit_ms + 1),
            ..Default::default()
        };
        let e = limits_for(&p, Some(&r)).unwrap_err().to_string();
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

    #[test]
    fn an_override_above_the_org_counts_as_the_orgs_allowance() {
        let org = Policy {
            memory_bytes: Some(1 << 30),
            max_parallel: Some(4),
            ..Default::default()
        };
        let user = Policy {
            memory_bytes: Some(4 << 30),
            cpus: Some(8.0),
            max_parallel: Some(3),
            ..Default::default()
        };
        let e = resolve(&default(), Some(&org), Some(&user));
        assert_eq!(e.memory_bytes, 1 << 30, "capped by the org's policy");
        assert_eq!(
            e.cpus,
            default().cpus,
            "capped by the default the org keeps"
        );
        assert_eq!(e.max_parallel, 3, "below the org: the override applies");
        assert_eq!(
            capped_fields(&default(), Some(&org), &user),
            vec!["memory_bytes", "cpus"]
        );
        // Without an org policy the platform default is the allowance.
        let e = resolve(&default(), None, Some(&user));
        assert_eq!(e.memory_bytes, default().memory_bytes);
        assert_eq!(e.max_parallel, default().max_parallel);
    }

    #[test]
    fn lowering_an_org_lowers_its_users_and_raising_it_restores_their_overrides() {
        let user = Policy {
            memory_bytes: Some(2 << 30),
            pids: Some(500),
            ..Default::default()
        };
        let high = Policy {
            memory_bytes: Some(8 << 30),
            pids: Some(1000),
            ..Default::default()
        };
        let e = resolve(&default(), Some(&high), Some(&user));
        assert_eq!((e.memory_bytes, e.pids), (2 << 30, 500));
        let low = Policy {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            ..Default::default()
        };
        let e = resolve(&default(), Some(&low), Some(&user));
        assert_eq!((e.memory_bytes, e.pids), (256 << 20, 64));
        let e = resolve(&default(), Some(&high), Some(&user));
        assert_eq!((e.memory_bytes, e.pids), (2 << 30, 500));
    }

    #[test]
    fn the_effective_policy_never_exceeds_the_orgs_allowance() {
        let values = [
            None,
            Some(1u64),
            Some(64 << 20),
            Some(1 << 30),
            Some(64 << 30),
        ];
        for o in values {
            for u in values {
                let org = Policy {
                    memory_bytes: o,
                    max_parallel: o.map(|v| (v % 7) as u32 + 1),
                    ..Default::default()
                };
                let user = Policy {
                    memory_bytes: u,
                    max_parallel: u.map(|v| (v % 5) as u32 + 1),
                    cpus: u.map(|v| (v % 9) as f64 + 0.5),
                    ..Default::default()
                };
                let allow = org_allowance(&default(), Some(&org));
                let e = resolve(&default(), Some(&org), Some(&user));
                for f in Field::ALL {
                    assert!(
                        !f.of_effective(&e).exceeds(f.of_effective(&allow)),
                        "{f} of {e:?} above {allow:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_override_within_the_org_is_accepted_and_above_it_names_field_value_and_allowance() {
        let org = Policy {
            memory_bytes: Some(1 << 30),
            cpus: Some(2.0),
            ..Default::default()
        };
        let allow = org_allowance(&default(), Some(&org));
        let at = Policy {
            memory_bytes: Some(1 << 30),
            cpus: Some(2.0),
            pids: Some(default().pids),
            max_parallel: Some(1),
            ..Default::default()
        };
        assert!(check_within_org(&at, &allow).is_ok());
        let above = Policy {
            memory_bytes: Some((1 << 30) + 1),
            cpus: Some(2.5),
            max_parallel: Some(default().max_parallel + 1),
            ..Default::default()
        };
        let e = check_within_org(&above, &allow).unwrap_err();
        assert_eq!(
            e.0,
            vec![
                PolicyError::AboveOrg {
                    field: Field::MemoryBytes,
                    value: Amount::Whole((1 << 30) + 1),
                    allowed: Amount::Whole(1 << 30),
                },
                PolicyError::AboveOrg {
                    field: Field::Cpus,
                    value: Amount::Cpus(2.5),
                    allowed: Amount::Cpus(2.0),
                },
                PolicyError::AboveOrg {
                    field: Field::MaxParallel,
                    value: Amount::Whole(u64::from(default().max_parallel) + 1),
                    allowed: Amount::Whole(default().max_parallel.into()),
                },
            ]
        );
        let text = e.to_string();
        assert!(
            text.contains("memory_bytes: 1073741825 exceeds the org's allowance 1073741824"),
            "{text}"
        );
    }

    #[test]
    fn the_default_policy_passes_the_same_rule() {
        assert!(validate_default(&default()).is_ok());
        let bad = [
            EffectivePolicy {
                max_parallel: 0,
                ..default()
            },
            EffectivePolicy {
                memory_bytes: 0,
                ..default()
            },
            EffectivePolicy {
                memory_bytes: MAX_MEMORY_BYTES + 1,
                ..default()
            },
            EffectivePolicy {
                cpus: f64::NAN,
                ..default()
            },
            EffectivePolicy {
                cpus: -1.0,
                ..default()
            },
            EffectivePolicy {
                pids: 0,
                ..default()
            },
            EffectivePolicy {
                time_limit_ms: 0,
                ..default()
            },
            EffectivePolicy {
                max_parallel: MAX_PARALLEL + 1,
                ..default()
            },
        ];
        for p in bad {
            let e = validate_default(&p).unwrap_err();
            assert_eq!(e.0.len(), 1, "{p:?}: {e}");
        }
        let e = validate_default(&EffectivePolicy {
            max_parallel: 0,
            ..default()
        })
        .unwrap_err();
        assert_eq!(
            e.0,
            vec![PolicyError::OutOfRange {
                field: Field::MaxParallel,
                value: Amount::Whole(0),
            }]
        );
        assert_eq!(
            e.to_string(),
            "max_parallel is 0; it must be between 1 and 1000"
        );
    }

    #[test]
    fn one_rule_for_requests_policies_and_defaults() {
        // The same value is refused, with the same error, in all three places.
        for (f, v) in [
            (Field::MemoryBytes, Amount::Whole(1)),
            (Field::Cpus, Amount::Cpus(f64::NAN)),
            (Field::Pids, Amount::Whole(0)),
            (Field::TimeLimitMs, Amount::Whole(MAX_TIME_LIMIT_MS + 1)),
        ] {
            let want = PolicyError::OutOfRange { field: f, value: v };
            let mut p = Policy::default();
            let mut d = default();
            let mut r = RequestedLimits::default();
            match (f, v) {
                (Field::MemoryBytes, Amount::Whole(n)) => {
                    p.memory_bytes = Some(n);
                    d.memory_bytes = n;
                    r.memory_bytes = Some(n);
                }
                (Field::Cpus, Amount::Cpus(c)) => {
                    p.cpus = Some(c);
                    d.cpus = c;
                    r.cpus = Some(c);
                }
                (Field::Pids, Amount::Whole(n)) => {
                    p.pids = Some(n);
                    d.pids = n;
                    r.pids = Some(n);
                }
                (Field::TimeLimitMs, Amount::Whole(n)) => {
                    p.time_limit_ms = Some(n);
                    d.time_limit_ms = n;
                    r.time_limit_ms = Some(n);
                }
                _ => unreachable!(),
            }
            let e = |r: Result<(), PolicyErrors>| r.unwrap_err().0;
            // NaN != NaN: compare the field and the text.
            let same = |got: Vec<PolicyError>| {
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].field(), want.field());
                assert_eq!(got[0].to_string(), want.to_string());
            };
            same(e(validate_policy(&p)));
            same(e(validate_default(&d)));
            same(limits_for(&default(), Some(&r)).unwrap_err().0);
        }
    }

    fn names(g: &[&str]) -> Option<Vec<String>> {
        Some(g.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn groups_narrow_from_default_to_org_to_user_and_never_widen() {
        let org = Policy {
            groups: names(&["small", "big"]),
            ..Default::default()
        };
        // No list anywhere: any group.
        assert_eq!(resolve(&default(), None, None).groups, None);
        // The org's list; a user's narrower list; a user naming only groups outside the
        // org's gets the org's; one naming some outside keeps those inside.
        assert_eq!(
            resolve(&default(), Some(&org), None).groups,
            names(&["small", "big"])
        );
        let user = |g: &[&str]| Policy {
            groups: names(g),
            ..Default::default()
        };
        assert_eq!(
            resolve(&default(), Some(&org), Some(&user(&["big"]))).groups,
            names(&["big"])
        );
        assert_eq!(
            resolve(&default(), Some(&org), Some(&user(&["huge"]))).groups,
            names(&["small", "big"])
        );
        assert_eq!(
            resolve(&default(), Some(&org), Some(&user(&["huge", "big"]))).groups,
            names(&["big"])
        );
        // Without an org list a user's list applies; a platform default list bounds both.
        assert_eq!(
            resolve(&default(), None, Some(&user(&["huge"]))).groups,
            names(&["huge"])
        );
        let platform = EffectivePolicy {
            groups: names(&["small"]),
            ..default()
        };
        assert_eq!(resolve(&platform, None, None).groups, names(&["small"]));
        assert_eq!(
            resolve(&platform, Some(&org), None).groups,
            names(&["small"]),
            "an org list cannot widen the platform's"
        );
        // What admins are shown, and what an org admin may set.
        assert_eq!(
            capped_fields(&default(), Some(&org), &user(&["huge", "big"])),
            vec!["groups"]
        );
        assert!(capped_fields(&default(), Some(&org), &user(&["big"])).is_empty());
        let allowance = org_allowance(&default(), Some(&org));
        assert!(check_within_org(&user(&["small"]), &allowance).is_ok());
        let e = check_within_org(&user(&["huge", "big"]), &allowance).unwrap_err();
        assert_eq!(
            e.to_string(),
            "groups: huge not among the org's groups (small, big)"
        );
        // An org without a list allows any.
        assert!(check_within_org(&user(&["huge"]), &org_allowance(&default(), None)).is_ok());
    }

    #[test]
    fn a_groups_list_names_at_least_one_well_formed_group_once() {
        let with = |g: Vec<&str>| Policy {
            groups: Some(g.into_iter().map(String::from).collect()),
            ..Default::default()
        };
        assert!(validate_policy(&with(vec!["small", "big-2", "gpu_a"])).is_ok());
        for (bad, says) in [
            (vec![], "name at least one group"),
            (vec!["small", "small"], "\"small\" is named twice"),
            (vec!["a b"], "\"a b\" is not a group name"),
            (vec![""], "\"\" is not a group name"),
        ] {
            let e = validate_policy(&with(bad.clone())).unwrap_err();
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
            assert_eq!(e.0[0].field(), None);
        }
        let long = "x".repeat(65);
        assert!(validate_policy(&with(vec![long.as_str()])).is_err());
    }
}
