//! The `ec2-asg` provider against an AWS emulator: moto's Auto Scaling API (PyPI's
//! `moto[server]`, in the virtualenv `scripts/setup-deps.sh` makes). moto runs no
//! lifecycle hooks and creates a group's instances at once; the provider uses neither.

use std::time::Duration;

use hatchery_scheduler::autoscale::GroupConfig;
use hatchery_scheduler::engines::{moto_server_bin, MotoServer};
use hatchery_scheduler::model::Resources;
use hatchery_scheduler::provider::ec2_asg::{sdk, Ec2AsgConfig, Ec2AsgProvider};
use hatchery_scheduler::provider::{HostPhase, Provider, ProviderError};

fn group(name: &str, min: u32, max: u32) -> GroupConfig {
    GroupConfig {
        name: name.into(),
        shape: Resources::new(1 << 30, 1.0),
        languages: vec!["r".into()],
        min,
        max,
        scale_down_after: Duration::from_secs(60),
        cooldown_up: Duration::ZERO,
        cooldown_down: Duration::ZERO,
        pool_size: None,
        provider: "ec2-asg".into(),
    }
}

/// The ASG as AWS sees it: desired capacity, and each instance with its protection.
async fn asg(client: &sdk::Client, name: &str) -> (i32, Vec<(String, bool)>, Vec<String>, bool) {
    let out = client
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap();
    let g = &out.auto_scaling_groups()[0];
    (
        g.desired_capacity().unwrap(),
        g.instances()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_string(),
                    i.protected_from_scale_in().unwrap_or(false),
                )
            })
            .collect(),
        g.suspended_processes()
            .iter()
            .filter_map(|p| p.process_name().map(str::to_string))
            .collect(),
        g.new_instances_protected_from_scale_in().unwrap_or(false),
    )
}

async fn create_asg(client: &sdk::Client, name: &str, min: i32, max: i32, desired: i32) {
    client
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_configuration_name("hatchery-test")
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
}

fn names(hosts: &[hatchery_scheduler::provider::ProvidedHost]) -> Vec<String> {
    hosts.iter().map(|h| h.name.clone()).collect()
}

#[test]
fn the_ec2_asg_provider_scales_protected_groups_and_removes_only_the_host_it_is_told() {
    let test = "the_ec2_asg_provider_scales_protected_groups_and_removes_only_the_host_it_is_told";
    if moto_server_bin().is_none() {
        hatchery_tests::skip(test, "no moto_server", "HATCHERY_REQUIRE_ENGINES");
        return;
    }
    let moto = MotoServer::start().expect("moto starts");
    // moto accepts any credentials; the provider reads them as the AWS CLI does.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let small = group("small", 0, 2);
        let steady = group("steady", 1, 3);
        let cfg = Ec2AsgConfig {
            region: Some("us-east-1".into()),
            endpoint: Some(moto.endpoint()),
            groups: vec![
                (small.clone(), "hatchery-small".into()),
                (steady.clone(), "hatchery-steady".into()),
            ],
        };
        let provider = Ec2AsgProvider::new(cfg).await.unwrap();
        let client = provider.client().clone();
        client
            .create_launch_configuration()
            .launch_configuration_name("hatchery-test")
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .unwrap();
        create_asg(&client, "hatchery-small", 0, 5, 0).await;
        // An instance made before Hatchery managed the group: unprotected.
        create_asg(&client, "hatchery-steady", 1, 5, 1).await;
        let (_, before, _, _) = asg(&client, "hatchery-steady").await;
        assert_eq!(before.len(), 1);
        assert!(!before[0].1, "unprotected to begin with");

        // Listing makes the groups Hatchery's: every instance protected from scale-in,
        // new ones too, AZRebalance suspended.
        let hosts = provider.list().await.unwrap();
        assert_eq!(names(&hosts), vec![before[0].0.clone()]);
        assert_eq!(hosts[0].group, "steady");
        assert_eq!(hosts[0].phase, HostPhase::Running);
        for name in ["hatchery-small", "hatchery-steady"] {
            let (_, instances, suspended, protect_new) = asg(&client, name).await;
            assert!(instances.iter().all(|(_, p)| *p), "{name}: {instances:?}");
            assert_eq!(suspended, ["AZRebalance"], "{name}");
            assert!(protect_new, "{name}");
        }

        // Scale-up: one more desired each time, instances protected, never above max.
        // moto makes instances at once: a launch names the instance it made.
        let first = provider.launch(&small).await.unwrap();
        let second = provider.launch(&small).await.unwrap();
        let (desired, instances, _, _) = asg(&client, "hatchery-small").await;
        assert_eq!(desired, 2);
        assert_eq!(instances.len(), 2);
        assert_eq!([&instances[0].0, &instances[1].0], [&first, &second]);
        assert!(instances.iter().all(|(_, p)| *p), "{instances:?}");
        match provider.launch(&small).await {
            Err(ProviderError::Launch { reason, .. }) => {
                assert!(reason.contains("max 2"), "{reason}")
            }
            other => panic!("a launch above max: {other:?}"),
        }
        assert_eq!(asg(&client, "hatchery-small").await.0, 2);
        let listed = names(&provider.list().await.unwrap());
        for (id, _) in &instances {
            assert!(listed.contains(id), "{id} in {listed:?}");
        }

        // Removal: the named instance only, with its capacity.
        let (victim, survivor) = (&instances[0].0, &instances[1].0);
        provider.terminate(victim).await.unwrap();
        let (desired, left, _, _) = asg(&client, "hatchery-small").await;
        assert_eq!(desired, 1);
        assert_eq!(left.iter().map(|(i, _)| i).collect::<Vec<_>>(), [survivor]);
        assert!(!names(&provider.list().await.unwrap()).contains(victim));

        // Never below min: the steady group's only instance goes without its capacity,
        // and AWS replaces it.
        let only = before[0].0.clone();
        provider.terminate(&only).await.unwrap();
        let (desired, now, _, _) = asg(&client, "hatchery-steady").await;
        assert_eq!(desired, 1, "min 1 kept");
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].0, only);

        // An unknown host is refused, and nothing changes.
        match provider.terminate("i-0000000000000000").await {
            Err(ProviderError::UnknownHost(_)) => {}
            other => panic!("terminating an unknown host: {other:?}"),
        }

        // Desired capacity at zero while a protected instance stays (moto can even take
        // it below zero): the provider counts from the instances there are, so a launch
        // asks for one more than exist and no placeholder host is listed.
        client
            .set_desired_capacity()
            .auto_scaling_group_name("hatchery-small")
            .desired_capacity(0)
            .send()
            .await
            .unwrap();
        let hosts = provider.list().await.unwrap();
        assert!(
            hosts.iter().all(|h| !h.name.contains("-pending-")),
            "{hosts:?}"
        );
        provider.launch(&small).await.unwrap();
        let (desired, instances, _, _) = asg(&client, "hatchery-small").await;
        assert_eq!(desired, 2);
        assert_eq!(instances.len(), 2, "{instances:?}");

        // An instance AWS removes on its own leaves the list (its agent's lease then
        // declares what it ran lost).
        let gone = instances[0].0.clone();
        client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(&gone)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .unwrap();
        assert!(!names(&provider.list().await.unwrap()).contains(&gone));
    });
}
