//! Bearer tokens: HS256 JWTs carrying who the caller is (`sub` = user, `org`, `role`)
//! and when the token expires. [`Auth::mint`] issues them (`hatchery token create`,
//! `hatchery up`); [`Auth::verify`] turns one into a [`Principal`]. The key never leaves
//! the process and is never logged.

use std::time::Duration;

use hatchery_scheduler::model::{now_ms, Principal, Role};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims of a Hatchery token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    pub org: String,
    pub role: Role,
    /// Expiry and issue time, seconds since the Unix epoch.
    pub exp: u64,
    pub iat: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Longest org / user name a token may carry.
pub const MAX_NAME_LEN: usize = 128;

/// Checks an org or user name: 1–128 characters of `[A-Za-z0-9._@+-]`, not starting
/// with a dot — e-mail style user names like `ada+lab@example.com` included. The store
/// accepts the same names (it keys policies by them), so whoever holds a token can also
/// be given a policy.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_LEN} characters of letters, digits, \
             '.', '_', '-', '@', '+', not starting with '.'"
        ))
    }
}

/// Signs and checks tokens with one HS256 key.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(key: &[u8]) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
        }
    }

    /// A token for `user` of `org` with `role`, valid for `ttl`.
    pub fn mint(&self, org: &str, user: &str, role: Role, ttl: Duration) -> Result<String, String> {
        check_name("org", org)?;
        check_name("user", user)?;
        let iat = now_ms() / 1000;
        let claims = Claims {
            sub: user.to_string(),
            org: org.to_string(),
            role,
            exp: iat.saturating_add(ttl.as_secs().max(1)),
            iat,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| e.to_string())
    }

    /// The caller a token names, if its signature and expiry hold.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let c = data.claims;
        check_name("org", &c.org).map_err(AuthError::Invalid)?;
        check_name("user", &c.sub).map_err(AuthError::Invalid)?;
        Ok(Principal {
            org: c.org,
            user: c.sub,
            role: c.role,
        })
    }
}

/// `user`, `org_admin` or `superadmin`.
pub fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "user" => Ok(Role::User),
        "org_admin" => Ok(Role::OrgAdmin),
        "superadmin" => Ok(Role::Superadmin),
        other => Err(format!(
            "unknown role {other:?}: expected user, org_admin or superadmin"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let auth = Auth::new(&[7u8; 32]);
        let t = auth
            .mint("acme", "ann", Role::OrgAdmin, Duration::from_secs(60))
            .unwrap();
        let p = auth.verify(&t).unwrap();
        assert_eq!(
            p,
            Principal {
                org: "acme".into(),
                user: "ann".into(),
                role: Role::OrgAdmin
            }
        );
        let other = Auth::new(&[8u8; 32]);
        assert!(matches!(other.verify(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(
            auth.verify("nonsense"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn e_mail_style_user_names_round_trip_through_a_token() {
        let auth = Auth::new(&[7u8; 32]);
        let t = auth
            .mint(
                "acme",
                "ada+lab@example.com",
                Role::User,
                Duration::from_secs(60),
            )
            .unwrap();
        let p = auth.verify(&t).unwrap();
        assert_eq!(p.user, "ada+lab@example.com");
        assert!(auth
            .mint("acme", "ada/../x", Role::User, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let auth = Auth::new(&[7u8; 32]);
        let now = now_ms() / 1000;
        let claims = Claims {
            sub: "ann".into(),
            org: "acme".into(),
            role: Role::User,
            exp: now - 3600,
            iat: now - 7200,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert_eq!(auth.verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn names_and_roles() {
        assert!(check_name("org", "acme-1.x_y@z").is_ok());
        for ok in ["ada@example.com", "ada+lab@example.co.uk", "a.b-c_d"] {
            assert!(check_name("user", ok).is_ok(), "{ok}");
            // Whatever a token may name, the store can key a policy by.
            assert!(hatchery_scheduler::embedded::name_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            ".hidden",
            "..",
            "a/b",
            "ada@exämple.com",
            "a%40b",
        ] {
            assert!(check_name("user", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("org", &"a".repeat(129)).is_err());
        assert_eq!(parse_role("superadmin"), Ok(Role::Superadmin));
        assert!(parse_role("root").is_err());
    }
}
