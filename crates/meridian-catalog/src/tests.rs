use std::time::Duration;

use meridian_core::RegionId;

use crate::*;

async fn sqlite_catalog(dir: &tempfile::TempDir) -> Catalog {
    let url = format!("sqlite://{}/catalog.db?mode=rwc", dir.path().display());
    Catalog::connect(&url).await.unwrap()
}

fn actor() -> Actor {
    Actor {
        subject: "tester".into(),
        request_id: "req-1".into(),
    }
}

fn region(id: &str) -> RegionId {
    RegionId::parse(id).unwrap()
}

/// Runs the catalog suite against SQLite and, when MERIDIAN_TEST_POSTGRES_URL is set, PostgreSQL.
pub(crate) async fn catalogs_under_test(dir: &tempfile::TempDir) -> Vec<Catalog> {
    let mut catalogs = vec![sqlite_catalog(dir).await];
    match std::env::var("MERIDIAN_TEST_POSTGRES_URL") {
        Ok(base_url) => {
            let database = format!("cat_{}", uuid::Uuid::new_v4().simple());
            let admin = Catalog::connect(&base_url).await.unwrap();
            admin
                .execute_raw(&format!("CREATE DATABASE {database}"))
                .await
                .unwrap();
            admin.close().await;
            let url = match base_url.rsplit_once('/') {
                Some((server, _)) => format!("{server}/{database}"),
                None => panic!("MERIDIAN_TEST_POSTGRES_URL needs a database path"),
            };
            catalogs.push(Catalog::connect(&url).await.unwrap());
        }
        Err(_) if std::env::var("MERIDIAN_REQUIRE_SERVICES").is_ok_and(|value| value == "1") => {
            panic!("MERIDIAN_REQUIRE_SERVICES=1 but MERIDIAN_TEST_POSTGRES_URL is not set");
        }
        Err(_) => {}
    }
    catalogs
}

#[tokio::test]
async fn projects_keys_and_rotation_with_grace() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("acme", "Acme", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let duplicate = catalog
            .create_org("acme", "Acme", &region("eu-west-1"), &actor())
            .await;
        assert!(matches!(
            duplicate,
            Err(CatalogError::Conflict {
                code: "org_exists",
                ..
            })
        ));
        let (project, key) = catalog
            .create_project(
                "acme",
                NewProject {
                    name: "Web".into(),
                    region: region("us-east-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        assert_eq!(project.region, "us-east-1");
        let cache = KeyCache::load(catalog.clone()).await.unwrap();
        let resolved = cache.resolve(&key).unwrap();
        assert_eq!(&*resolved.project_id, project.project_id.as_str());
        assert_eq!(resolved.region.as_str(), "us-east-1");
        assert!(cache.resolve("wk_unknown").is_none());

        let rotated = catalog
            .rotate_key(&project.project_id, Duration::from_millis(300), &actor())
            .await
            .unwrap();
        assert!(cache.refresh().await.unwrap());
        assert!(
            cache.resolve(&key).is_some(),
            "old key works during its grace period"
        );
        assert!(cache.resolve(&rotated.write_key).is_some());
        let keys = catalog.list_keys(&project.project_id).await.unwrap();
        assert_eq!(keys.len(), 2);
        assert!(
            keys.iter()
                .all(|info| info.prefix.len() == 8 && !info.prefix.contains(&key[8..]))
        );
        let deadline = rotated.previous_key_expires_at_ms;
        while meridian_core::timestamp::now_unix_ms() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cache.resolve(&key).is_none(),
            "old key refused after its grace period"
        );
        assert!(cache.resolve(&rotated.write_key).is_some());

        let immediate = catalog
            .rotate_key(&project.project_id, Duration::ZERO, &actor())
            .await
            .unwrap();
        cache.refresh().await.unwrap();
        assert!(
            cache.resolve(&rotated.write_key).is_none(),
            "grace 0 revokes at once"
        );
        assert!(cache.resolve(&immediate.write_key).is_some());

        let missing = catalog
            .create_project(
                "nobody",
                NewProject {
                    name: "x".into(),
                    region: region("eu-west-1"),
                },
                &actor(),
            )
            .await;
        assert!(matches!(missing, Err(CatalogError::NotFound(_))));
    }
}

#[tokio::test]
async fn listing_pages_through_projects() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("paged", "Paged", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        for index in 0..5 {
            catalog
                .create_project(
                    "paged",
                    NewProject {
                        name: format!("p{index}"),
                        region: region("eu-west-1"),
                    },
                    &actor(),
                )
                .await
                .unwrap();
        }
        let first = catalog.list_projects("paged", 2, None).await.unwrap();
        assert_eq!(first.items.len(), 2);
        let second = catalog
            .list_projects("paged", 2, first.next_cursor.as_deref())
            .await
            .unwrap();
        let third = catalog
            .list_projects("paged", 2, second.next_cursor.as_deref())
            .await
            .unwrap();
        assert_eq!(third.items.len(), 1);
        assert!(third.next_cursor.is_none());
        let mut all: Vec<_> = [first.items, second.items, third.items]
            .concat()
            .into_iter()
            .map(|p| p.project_id)
            .collect();
        all.dedup();
        assert_eq!(all.len(), 5);
    }
}

#[tokio::test]
async fn suppressions_reach_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("sup", "Sup", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let (project, _) = catalog
            .create_project(
                "sup",
                NewProject {
                    name: "p".into(),
                    region: region("eu-west-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        let cache = KeyCache::load(catalog.clone()).await.unwrap();
        assert!(!cache.has_suppressions(&project.project_id));
        let added = catalog
            .suppress_users(
                &project.project_id,
                &["u1".into(), "u2".into(), "u1".into()],
                &actor(),
            )
            .await
            .unwrap();
        assert_eq!(added, 2);
        cache.refresh().await.unwrap();
        assert!(cache.is_suppressed(&project.project_id, "u1"));
        assert!(!cache.is_suppressed(&project.project_id, "u3"));
        assert!(
            catalog
                .unsuppress_user(&project.project_id, "u1", &actor())
                .await
                .unwrap()
        );
        assert!(
            !catalog
                .unsuppress_user(&project.project_id, "u1", &actor())
                .await
                .unwrap()
        );
        cache.refresh().await.unwrap();
        assert!(!cache.is_suppressed(&project.project_id, "u1"));
        let listed = catalog
            .list_suppressions(&project.project_id, 10, None)
            .await
            .unwrap();
        assert_eq!(listed.items, vec!["u2".to_string()]);
    }
}

#[tokio::test]
async fn the_audit_chain_detects_tampering_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("aud", "Aud", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let (project, _) = catalog
            .create_project(
                "aud",
                NewProject {
                    name: "p".into(),
                    region: region("eu-west-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        catalog
            .rename_project(&project.project_id, "renamed", &actor())
            .await
            .unwrap();
        let report = catalog.verify_audit_chain().await.unwrap();
        assert_eq!(report.first_broken, None);
        assert!(report.entries_checked >= 3);
        let page = catalog.list_audit("aud", 0, 10).await.unwrap();
        let actions: Vec<_> = page
            .items
            .iter()
            .map(|entry| entry.action.as_str())
            .collect();
        assert_eq!(
            actions,
            vec!["org.create", "project.create", "project.rename"]
        );
        assert_eq!(page.items[2].before.as_ref().unwrap()["name"], "p");

        let rename_seq = page.items[2].seq;
        catalog
            .execute_raw(&format!("UPDATE audit_log SET after_json = '{{\"name\":\"forged\"}}' WHERE seq = {rename_seq}"))
            .await
            .unwrap();
        let report = catalog.verify_audit_chain().await.unwrap();
        assert_eq!(
            report.first_broken.as_ref().map(|(seq, _)| *seq),
            Some(rename_seq)
        );

        catalog
            .execute_raw(&format!("DELETE FROM audit_log WHERE seq = {rename_seq}"))
            .await
            .unwrap();
        let report = catalog.verify_audit_chain().await.unwrap();
        assert!(
            report.first_broken.is_some(),
            "a deleted last entry is noticed"
        );
    }
}

#[tokio::test]
async fn migrations_are_recorded_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = sqlite_catalog(&dir).await;
    assert_eq!(catalog.applied_migrations().await.unwrap(), vec![1, 2, 3]);
    catalog.close().await;
    let again = sqlite_catalog(&dir).await;
    assert_eq!(again.applied_migrations().await.unwrap(), vec![1, 2, 3]);
}

#[tokio::test]
async fn known_keys_keep_resolving_while_the_catalog_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("outage", "Outage", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let (_, key) = catalog
            .create_project(
                "outage",
                NewProject {
                    name: "p".into(),
                    region: region("eu-west-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        let cache = KeyCache::load(catalog.clone()).await.unwrap();
        catalog.close().await;
        assert!(cache.refresh().await.is_err(), "the catalog is gone");
        assert!(
            cache.resolve(&key).is_some(),
            "the last snapshot still serves known keys"
        );
    }
}

#[tokio::test]
async fn an_in_flight_region_migration_blocks_assigning_the_org_region() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("mover", "Mover", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let new = |name: &str, id: &str| NewProject {
            name: name.into(),
            region: region(id),
        };
        let (eu, _) = catalog
            .create_project("mover", new("eu", "eu-west-1"), &actor())
            .await
            .unwrap();
        let (us, _) = catalog
            .create_project("mover", new("us", "us-east-1"), &actor())
            .await
            .unwrap();
        let (eu2, _) = catalog
            .create_project("mover", new("eu2", "eu-west-1"), &actor())
            .await
            .unwrap();
        let same_region = catalog
            .create_migration("mover", &eu.project_id, &eu2.project_id, &actor())
            .await;
        assert!(matches!(same_region, Err(CatalogError::Invalid(_))));
        let migration = catalog
            .create_migration("mover", &eu.project_id, &us.project_id, &actor())
            .await
            .unwrap();
        assert_eq!(migration.status, MigrationStatus::Pending);
        let second = catalog
            .create_migration("mover", &eu.project_id, &us.project_id, &actor())
            .await;
        assert!(matches!(
            second,
            Err(CatalogError::Conflict {
                code: "migration_in_flight",
                ..
            })
        ));
        let blocked = catalog
            .set_primary_region("mover", &region("us-east-1"), &actor())
            .await;
        assert!(matches!(
            blocked,
            Err(CatalogError::Conflict {
                code: "migration_in_flight",
                ..
            })
        ));
        let skip = catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::Done,
                None,
                &actor(),
            )
            .await;
        assert!(matches!(
            skip,
            Err(CatalogError::Conflict {
                code: "invalid_transition",
                ..
            })
        ));
        let started = catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::Copying,
                None,
                &actor(),
            )
            .await
            .unwrap();
        assert_eq!(started.status, MigrationStatus::Copying);
        catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::Cancelled,
                None,
                &actor(),
            )
            .await
            .unwrap();
        let org = catalog
            .set_primary_region("mover", &region("us-east-1"), &actor())
            .await
            .unwrap();
        assert_eq!(org.primary_region, "us-east-1");
        let actions: Vec<String> = catalog
            .list_audit("mover", 0, 100)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|entry| entry.action)
            .collect();
        for expected in [
            "migration.create",
            "migration.copying",
            "migration.cancelled",
            "org.assign_region",
        ] {
            assert!(
                actions.iter().any(|action| action == expected),
                "{expected} audited: {actions:?}"
            );
        }
    }
}

#[tokio::test]
async fn deletions_of_unserved_regions_never_starve_a_nodes_own() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("starve", "Starve", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let project_in = |region_id: &'static str| NewProject {
            name: format!("in {region_id}"),
            region: region(region_id),
        };
        let (elsewhere, _) = catalog
            .create_project("starve", project_in("af-south-1"), &actor())
            .await
            .unwrap();
        let (home, _) = catalog
            .create_project("starve", project_in("eu-west-1"), &actor())
            .await
            .unwrap();
        // More pending deletions of a region this node does not serve than one page holds, all
        // older than the one it can run.
        for index in 0..60 {
            catalog
                .create_deletion(&elsewhere.project_id, &[format!("user-{index}")], &actor())
                .await
                .unwrap();
        }
        let own = catalog
            .create_deletion(&home.project_id, &["mine".to_string()], &actor())
            .await
            .unwrap();
        let claimed = catalog
            .claim_deletion("node-eu", &["eu-west-1".to_string()], i64::MAX)
            .await
            .unwrap()
            .expect("the node's own deletion is claimed");
        assert_eq!(claimed.deletion_id, own.deletion_id);
        assert_eq!(claimed.region, "eu-west-1");
        assert!(
            catalog
                .claim_deletion("node-none", &[], i64::MAX)
                .await
                .unwrap()
                .is_none()
        );
    }
}
