//! The sealed object store on both backends — a local folder and S3 (a private moto
//! server per test): objects round-trip, a missing one is `NotFound`, deletes stick, and
//! what lies in the bucket is sealed and bound to its name (moved bytes do not open).

use std::sync::Arc;

use hatchery_scheduler::encrypted::{EncryptedObjects, S3Config};
use hatchery_scheduler::engines::{EngineError, MotoServer};
use hatchery_scheduler::objects::{ObjectError, Objects};
use hatchery_scheduler::seal::Keyring;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

fn keyring() -> Keyring {
    Keyring::single([7u8; 32])
}

/// A bucket on a private moto server, as the platform's objects and as raw S3 (to look
/// at what is stored), or `None` (the skip recorded) where moto is not installed.
fn s3(test: &str) -> Option<(MotoServer, EncryptedObjects, Arc<dyn ObjectStore>)> {
    let moto = match MotoServer::start() {
        Ok(m) => m,
        Err(EngineError::MotoMissing) => {
            hatchery_tests::skip(test, "moto is not installed", "HATCHERY_REQUIRE_ENGINES");
            return None;
        }
        Err(e) => panic!("starting moto: {e}"),
    };
    moto.create_bucket("objects").unwrap();
    let cfg = S3Config {
        bucket: "objects".into(),
        region: "us-east-1".into(),
        endpoint: Some(moto.endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    };
    let objects = EncryptedObjects::s3(&cfg, keyring()).unwrap();
    let raw = AmazonS3Builder::new()
        .with_bucket_name("objects")
        .with_region("us-east-1")
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    Some((moto, objects, Arc::new(raw)))
}

async fn contract(objects: &dyn Objects) {
    let secret = b"the user's result: 42".to_vec();
    objects.put("results/a", secret.clone()).await.unwrap();
    assert_eq!(objects.get("results/a").await.unwrap(), secret);
    objects
        .put("results/a", b"replaced".to_vec())
        .await
        .unwrap();
    assert_eq!(objects.get("results/a").await.unwrap(), b"replaced");
    assert!(matches!(
        objects.get("results/none").await,
        Err(ObjectError::NotFound(_))
    ));
    objects.delete("results/a").await.unwrap();
    assert!(matches!(
        objects.get("results/a").await,
        Err(ObjectError::NotFound(_))
    ));
    // A large object (a result near the output limit) round-trips.
    let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    objects.put("code/big", big.clone()).await.unwrap();
    assert_eq!(objects.get("code/big").await.unwrap(), big);
}

#[tokio::test]
async fn objects_in_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let objects = EncryptedObjects::local(dir.path(), keyring()).unwrap();
    contract(&objects).await;
}

#[tokio::test]
async fn objects_in_s3_are_sealed_and_bound_to_their_names() {
    let Some((_moto, objects, raw)) = s3("objects_in_s3_are_sealed_and_bound_to_their_names")
    else {
        return;
    };
    contract(&objects).await;

    objects
        .put("results/x", b"a-secret-marker".to_vec())
        .await
        .unwrap();
    let stored = raw
        .get(&ObjectPath::from("results/x"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        !stored.windows(15).any(|w| w == b"a-secret-marker"),
        "plaintext in the bucket"
    );
    // The same bytes under another name do not open.
    raw.put(&ObjectPath::from("results/y"), PutPayload::from(stored))
        .await
        .unwrap();
    assert!(matches!(
        objects.get("results/y").await,
        Err(ObjectError::Tampered(_))
    ));
}
