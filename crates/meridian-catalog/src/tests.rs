use std::sync::Arc;
use std::time::Duration;

use meridian_core::RegionId;

use crate::*;

pub(crate) fn test_key() -> CatalogKey {
    CatalogKey::from_bytes(b"catalog-test-key-catalog-test-key-0123").unwrap()
}

async fn sqlite_catalog(dir: &tempfile::TempDir) -> Catalog {
    let url = format!("sqlite://{}/catalog.db?mode=rwc", dir.path().display());
    Catalog::connect(&url, test_key()).await.unwrap()
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
            let admin = Catalog::connect(&base_url, test_key()).await.unwrap();
            admin
                .execute_raw(&format!("CREATE DATABASE {database}"))
                .await
                .unwrap();
            admin.close().await;
            let url = match base_url.rsplit_once('/') {
                Some((server, _)) => format!("{server}/{database}"),
                None => panic!("MERIDIAN_TEST_POSTGRES_URL needs a database path"),
            };
            catalogs.push(Catalog::connect(&url, test_key()).await.unwrap());
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
            .suppress_users(&project, &["u1".into(), "u2".into(), "u1".into()], &actor())
            .await
            .unwrap();
        assert_eq!(added, 2);
        cache.refresh().await.unwrap();
        assert!(cache.is_suppressed(&project.project_id, "u1"));
        assert!(!cache.is_suppressed(&project.project_id, "u3"));
        assert!(
            catalog
                .unsuppress_user(&project, "u1", &actor())
                .await
                .unwrap()
        );
        assert!(
            !catalog
                .unsuppress_user(&project, "u1", &actor())
                .await
                .unwrap()
        );
        cache.refresh().await.unwrap();
        assert!(!cache.is_suppressed(&project.project_id, "u1"));
        let listed = catalog
            .list_suppressions(&project.project_id, 10, None)
            .await
            .unwrap();
        assert_eq!(
            listed.items,
            vec![test_key().user_hash(&project.project_id, "u2")],
            "only keyed hashes are kept"
        );
        assert!(
            catalog
                .is_user_suppressed(&project.project_id, "u2")
                .await
                .unwrap()
        );
        let audit = catalog.list_audit("sup", 0, 100).await.unwrap();
        let text = serde_json::to_string(&audit.items).unwrap();
        assert!(
            !text.contains("\"u1\"") && !text.contains("\"u2\""),
            "no user id in the audit log: {text}"
        );
    }
}

#[tokio::test]
async fn the_audit_chain_cannot_be_rewritten_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("keyed", "Keyed", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        catalog
            .set_primary_region("keyed", &region("us-east-1"), &actor())
            .await
            .unwrap();
        let page = catalog.list_audit("keyed", 0, 10).await.unwrap();
        assert!(page.items.iter().all(AuditEntry::is_keyed));
        // A database writer rewrites the last entry and the head together, with plain SHA-256
        // as entries were hashed before: the chain no longer verifies.
        let last = page.items.last().unwrap().clone();
        let mut forged = last.clone();
        forged.after = Some(serde_json::json!({"primary_region": "af-south-1"}));
        let forged_hash = forged.compute_unkeyed_hash();
        catalog
            .execute_raw(&format!(
                "UPDATE audit_log SET after_json = '{}', hash = '{forged_hash}' WHERE seq = {}",
                forged.after.as_ref().unwrap(),
                forged.seq
            ))
            .await
            .unwrap();
        catalog
            .execute_raw(&format!(
                "UPDATE catalog_state SET audit_head_hash = '{forged_hash}' WHERE id = 1"
            ))
            .await
            .unwrap();
        let report = catalog.verify_audit_chain().await.unwrap();
        assert_eq!(
            report.first_broken.as_ref().map(|(seq, _)| *seq),
            Some(last.seq),
            "{report:?}"
        );
        // Nor with a keyed hash made with another key.
        let other_key = CatalogKey::from_bytes(&[9u8; 32]).unwrap();
        let other_hash = forged.compute_hash(&other_key);
        catalog
            .execute_raw(&format!(
                "UPDATE audit_log SET hash = '{other_hash}' WHERE seq = {}",
                forged.seq
            ))
            .await
            .unwrap();
        catalog
            .execute_raw(&format!(
                "UPDATE catalog_state SET audit_head_hash = '{other_hash}' WHERE id = 1"
            ))
            .await
            .unwrap();
        let report = catalog.verify_audit_chain().await.unwrap();
        assert_eq!(
            report.first_broken.as_ref().map(|(seq, _)| *seq),
            Some(last.seq)
        );
    }
}

#[tokio::test]
async fn an_audit_log_from_before_keyed_hashes_is_anchored_without_its_user_ids() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = sqlite_catalog(&dir).await;
    catalog
        .create_org("old", "Old", &region("eu-west-1"), &actor())
        .await
        .unwrap();
    let (project, _) = catalog
        .create_project(
            "old",
            NewProject {
                name: "p".into(),
                region: region("eu-west-1"),
            },
            &actor(),
        )
        .await
        .unwrap();
    // Rewrite the log as an earlier version wrote it: plain SHA-256, user ids in the open.
    let mut entries = catalog.list_audit("old", 0, 10).await.unwrap().items;
    entries.push(AuditEntry {
        seq: entries.len() as i64 + 1,
        org_id: "old".into(),
        at_ms: 1,
        actor: "tester".into(),
        action: "suppression.add".into(),
        target: project.project_id.clone(),
        before: None,
        after: Some(serde_json::json!({"user_ids": ["alice@example.com"]})),
        request_id: "req-old".into(),
        prev_hash: String::new(),
        hash: String::new(),
    });
    let mut previous = String::new();
    for entry in &mut entries {
        entry.prev_hash = previous.clone();
        entry.hash = entry.compute_unkeyed_hash();
        previous = entry.hash.clone();
    }
    catalog.execute_raw("DELETE FROM audit_log").await.unwrap();
    for entry in &entries {
        catalog
            .execute_raw(&format!(
                "INSERT INTO audit_log (seq, org_id, at_ms, actor, action, target, before_json, after_json, request_id, prev_hash, hash) \
                 VALUES ({}, '{}', {}, '{}', '{}', '{}', {}, {}, '{}', '{}', '{}')",
                entry.seq, entry.org_id, entry.at_ms, entry.actor, entry.action, entry.target,
                entry.before.as_ref().map(|value| format!("'{value}'")).unwrap_or("NULL".into()),
                entry.after.as_ref().map(|value| format!("'{value}'")).unwrap_or("NULL".into()),
                entry.request_id, entry.prev_hash, entry.hash
            ))
            .await
            .unwrap();
    }
    catalog
        .execute_raw(&format!(
            "UPDATE catalog_state SET audit_seq = {}, audit_head_hash = '{previous}' WHERE id = 1",
            entries.len()
        ))
        .await
        .unwrap();
    let report = catalog.verify_audit_chain().await.unwrap();
    assert!(
        report.first_broken.is_some(),
        "an unanchored chain does not pass: {report:?}"
    );
    assert!(!catalog.audit_chain_is_anchored().await.unwrap());

    let outcome = catalog.anchor_audit_chain(&actor()).await.unwrap();
    assert_eq!(
        outcome,
        AnchorOutcome::Anchored {
            entries: entries.len() as u64
        }
    );
    let report = catalog.verify_audit_chain().await.unwrap();
    assert_eq!(report.first_broken, None, "{report:?}");
    let anchored = catalog.list_audit("old", 0, 10).await.unwrap().items;
    let text = serde_json::to_string(&anchored).unwrap();
    assert!(!text.contains("alice@example.com"), "{text}");
    assert!(text.contains(&test_key().user_hash(&project.project_id, "alice@example.com")));
    assert_eq!(
        catalog.anchor_audit_chain(&actor()).await.unwrap(),
        AnchorOutcome::AlreadyAnchored
    );
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
async fn the_key_cache_reloads_only_the_projects_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("inc", "Inc", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let mut projects = Vec::new();
        for name in ["a", "b", "c"] {
            projects.push(
                catalog
                    .create_project(
                        "inc",
                        NewProject {
                            name: name.into(),
                            region: region("eu-west-1"),
                        },
                        &actor(),
                    )
                    .await
                    .unwrap(),
            );
        }
        let cache = KeyCache::load(catalog.clone()).await.unwrap();
        // One full load of the control rows and one of the end-user rows (one store here).
        assert_eq!(cache.reload_counts(), (2, 0));
        let (a, b, c) = (&projects[0], &projects[1], &projects[2]);
        catalog
            .suppress_users(&a.0, &["gone".into()], &actor())
            .await
            .unwrap();
        let rotated = catalog
            .rotate_key(&b.0.project_id, Duration::ZERO, &actor())
            .await
            .unwrap();
        let (d, d_key) = catalog
            .create_project(
                "inc",
                NewProject {
                    name: "d".into(),
                    region: region("us-east-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        assert!(cache.refresh().await.unwrap());
        assert_eq!(
            cache.reload_counts(),
            (2, 2),
            "one incremental refresh of each kind of rows, no full reload"
        );
        assert!(cache.is_suppressed(&a.0.project_id, "gone"));
        assert!(cache.resolve(&a.1).is_some(), "a keeps its key");
        assert!(cache.resolve(&b.1).is_none(), "b's old key is revoked");
        assert!(cache.resolve(&rotated.write_key).is_some());
        assert!(
            cache.resolve(&c.1).is_some(),
            "c, unchanged, still resolves"
        );
        assert_eq!(
            cache
                .resolve(&d_key)
                .map(|resolved| resolved.region.to_string()),
            Some("us-east-1".to_string()),
            "{}",
            d.project_id
        );
        assert_eq!(cache.project_count(), 4);
        assert!(!cache.refresh().await.unwrap(), "nothing changed since");
    }
}

#[tokio::test]
async fn migrations_are_recorded_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = sqlite_catalog(&dir).await;
    assert_eq!(
        catalog.applied_migrations().await.unwrap(),
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    );
    catalog.close().await;
    let again = sqlite_catalog(&dir).await;
    assert_eq!(
        again.applied_migrations().await.unwrap(),
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    );
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
                .create_deletion(&elsewhere, &[format!("user-{index}")], &actor())
                .await
                .unwrap();
        }
        let own = catalog
            .create_deletion(&home, &["mine".to_string()], &actor())
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

#[tokio::test]
async fn a_replay_is_claimed_in_its_region_by_one_node_and_ends_once() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("replays", "Replays", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let (project, _) = catalog
            .create_project(
                "replays",
                NewProject {
                    name: "web".into(),
                    region: region("eu-west-1"),
                },
                &actor(),
            )
            .await
            .unwrap();
        let day = 86_400_000;
        assert!(matches!(
            catalog
                .create_replay(&project, 2 * day, day, &actor())
                .await,
            Err(CatalogError::Invalid(_))
        ));
        let replay = catalog
            .create_replay(&project, day, 2 * day, &actor())
            .await
            .unwrap();
        assert_eq!(replay.status, ReplayStatus::Pending);
        assert!(matches!(
            catalog.create_replay(&project, day, day, &actor()).await,
            Err(CatalogError::Conflict {
                code: "replay_in_progress",
                ..
            })
        ));
        // Only a node of the project's region claims it, and only one node at a time.
        assert!(
            catalog
                .claim_replay("node-us", &["us-east-1".to_string()], i64::MAX)
                .await
                .unwrap()
                .is_none()
        );
        let eu = vec!["eu-west-1".to_string()];
        let claimed = catalog
            .claim_replay("node-a", &eu, i64::MAX)
            .await
            .unwrap()
            .expect("claimed in its region");
        assert_eq!(claimed.status, ReplayStatus::Running);
        assert!(
            catalog
                .claim_replay("node-b", &eu, i64::MAX)
                .await
                .unwrap()
                .is_none()
        );
        let progress = ReplayProgress {
            objects_total: 3,
            objects_done: 1,
            last_object: Some("regional:a".into()),
            messages_read: 10,
            messages_inserted: 4,
            messages_present: 6,
            ..ReplayProgress::default()
        };
        assert!(matches!(
            catalog
                .record_replay_progress(&replay.replay_id, "node-b", &progress, i64::MAX)
                .await,
            Err(CatalogError::Conflict {
                code: "lease_lost",
                ..
            })
        ));
        let stored = catalog
            .record_replay_progress(&replay.replay_id, "node-a", &progress, i64::MAX)
            .await
            .unwrap();
        assert_eq!(stored.progress, progress);
        // A cancel of a running replay is a request its executor acts on.
        let requested = catalog
            .cancel_replay(&replay.replay_id, &actor())
            .await
            .unwrap();
        assert_eq!(requested.status, ReplayStatus::Running);
        assert!(requested.cancel_requested);
        let ended = catalog
            .finish_replay(&replay.replay_id, ReplayStatus::Cancelled, None, &actor())
            .await
            .unwrap();
        assert_eq!(ended.status, ReplayStatus::Cancelled);
        assert!(matches!(
            catalog.cancel_replay(&replay.replay_id, &actor()).await,
            Err(CatalogError::Conflict {
                code: "replay_finished",
                ..
            })
        ));
        // A pending replay is cancelled at once; a deletion in flight blocks new replays.
        let pending = catalog
            .create_replay(&project, day, day, &actor())
            .await
            .unwrap();
        let cancelled = catalog
            .cancel_replay(&pending.replay_id, &actor())
            .await
            .unwrap();
        assert_eq!(cancelled.status, ReplayStatus::Cancelled);
        catalog
            .create_deletion(&project, &["gone".to_string()], &actor())
            .await
            .unwrap();
        assert!(matches!(
            catalog.create_replay(&project, day, day, &actor()).await,
            Err(CatalogError::Conflict {
                code: "deletion_in_progress",
                ..
            })
        ));
        let audit = catalog.list_audit("replays", 0, 100).await.unwrap();
        let actions: Vec<&str> = audit
            .items
            .iter()
            .map(|entry| entry.action.as_str())
            .collect();
        for action in ["replay.start", "replay.cancel", "replay.cancelled"] {
            assert!(actions.contains(&action), "{action} in {actions:?}");
        }
    }
}

#[tokio::test]
async fn retention_settings_are_kept_per_project_and_one_node_of_a_region_claims_each_run() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("keep", "Keep", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let mut projects = Vec::new();
        for region_id in ["eu-west-1", "eu-west-1", "us-east-1"] {
            let (project, _) = catalog
                .create_project(
                    "keep",
                    NewProject {
                        name: "web".into(),
                        region: region(region_id),
                    },
                    &actor(),
                )
                .await
                .unwrap();
            projects.push(project);
        }
        let first = &projects[0].project_id;
        assert_eq!(
            catalog.retention_of(first).await.unwrap(),
            ProjectRetention::default()
        );
        let set = ProjectRetention {
            warehouse: RetentionSetting::Days(30),
            archive: RetentionSetting::Keep,
        };
        catalog.set_retention(first, set, &actor()).await.unwrap();
        assert_eq!(catalog.retention_of(first).await.unwrap(), set);
        assert!(matches!(
            catalog
                .set_retention(
                    first,
                    ProjectRetention {
                        warehouse: RetentionSetting::Days(0),
                        archive: RetentionSetting::Keep,
                    },
                    &actor(),
                )
                .await,
            Err(CatalogError::Invalid(_))
        ));
        assert!(matches!(
            catalog.set_retention("prj_missing", set, &actor()).await,
            Err(CatalogError::NotFound(_))
        ));

        // The janitor of eu-west-1 sees both of its projects, with their settings, and no other.
        let subjects = catalog.retention_subjects("eu-west-1").await.unwrap();
        let mut expected: Vec<(String, ProjectRetention)> = vec![
            (first.clone(), set),
            (projects[1].project_id.clone(), ProjectRetention::default()),
        ];
        expected.sort_by(|left, right| left.0.cmp(&right.0));
        let found: Vec<(String, ProjectRetention)> = subjects
            .into_iter()
            .map(|subject| (subject.project_id, subject.retention))
            .collect();
        assert_eq!(found, expected);

        // One node wins a due run; the next is due only at its time, or at once after a change.
        let now = 1_000_000;
        assert!(
            catalog
                .claim_retention_run("eu-west-1", "node-a", now, now + 3_600_000)
                .await
                .unwrap()
        );
        assert!(
            !catalog
                .claim_retention_run("eu-west-1", "node-b", now + 1, now + 3_600_001)
                .await
                .unwrap()
        );
        assert!(
            catalog
                .claim_retention_run("us-east-1", "node-b", now + 1, now + 3_600_001)
                .await
                .unwrap(),
            "regions are scheduled apart"
        );
        assert!(
            catalog
                .claim_retention_run("eu-west-1", "node-b", now + 3_600_000, now + 7_200_000)
                .await
                .unwrap()
        );
        catalog
            .set_retention(first, ProjectRetention::default(), &actor())
            .await
            .unwrap();
        assert!(
            catalog
                .claim_retention_run("eu-west-1", "node-a", now + 3_600_001, now + 7_200_001)
                .await
                .unwrap(),
            "a change makes the region's run due at once"
        );
        assert_eq!(
            catalog.retention_of(first).await.unwrap(),
            ProjectRetention::default()
        );
        let audit = catalog.list_audit("keep", 0, 100).await.unwrap();
        let changes = audit
            .items
            .iter()
            .filter(|entry| entry.action == "project.retention")
            .count();
        assert_eq!(changes, 2);
    }
}

#[tokio::test]
async fn a_migration_copy_is_leased_to_a_node_of_both_regions_and_the_cutover_refuses_the_source() {
    let dir = tempfile::tempdir().unwrap();
    for catalog in catalogs_under_test(&dir).await {
        catalog
            .create_org("movers", "Movers", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let mut projects = Vec::new();
        for region_id in ["eu-west-1", "us-east-1"] {
            let (project, key) = catalog
                .create_project(
                    "movers",
                    NewProject {
                        name: "web".into(),
                        region: region(region_id),
                    },
                    &actor(),
                )
                .await
                .unwrap();
            projects.push((project, key));
        }
        let (source, target) = (&projects[0].0.project_id, &projects[1].0.project_id);
        let migration = catalog
            .create_migration("movers", source, target, &actor())
            .await
            .unwrap();
        let both = vec!["eu-west-1".to_string(), "us-east-1".to_string()];
        assert!(
            catalog
                .claim_migrations("node-a", &both, i64::MAX, 0)
                .await
                .unwrap()
                .is_empty(),
            "a pending migration copies nothing"
        );
        catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::Copying,
                None,
                &actor(),
            )
            .await
            .unwrap();
        assert!(
            catalog
                .claim_migrations("node-eu", &["eu-west-1".to_string()], i64::MAX, 0)
                .await
                .unwrap()
                .is_empty(),
            "a node of one of the two regions cannot copy"
        );
        let claimed = catalog
            .claim_migrations("node-a", &both, i64::MAX, 0)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            catalog
                .claim_migrations("node-b", &both, i64::MAX, 0)
                .await
                .unwrap()
                .is_empty(),
            "one node at a time"
        );
        let progress = MigrationProgress {
            objects_copied: 3,
            messages_copied: 30,
            messages_present: 2,
            lag_objects: 0,
        };
        let stored = catalog
            .record_migration_progress(&migration.migration_id, "node-a", &progress, true, i64::MAX)
            .await
            .unwrap();
        assert_eq!(stored.progress, progress);
        assert!(stored.last_pass_at_ms.is_some());
        assert!(matches!(
            catalog
                .record_migration_progress(
                    &migration.migration_id,
                    "node-b",
                    &progress,
                    true,
                    i64::MAX
                )
                .await,
            Err(CatalogError::Conflict {
                code: "lease_lost",
                ..
            })
        ));
        assert!(matches!(
            catalog
                .complete_migration(&migration.migration_id, &actor())
                .await,
            Err(CatalogError::Conflict {
                code: "invalid_transition",
                ..
            })
        ));
        catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::DualWrite,
                None,
                &actor(),
            )
            .await
            .unwrap();
        let done = catalog
            .complete_migration(&migration.migration_id, &actor())
            .await
            .unwrap();
        assert_eq!(done.status, MigrationStatus::Done);
        let cutover = done.cutover_at_ms.expect("cutover time");
        // The source's keys now name the target; the target's keys work as before.
        let cache = KeyCache::load(catalog.clone()).await.unwrap();
        let source_key = cache
            .resolve(&projects[0].1)
            .expect("the source key resolves");
        assert_eq!(source_key.migrated_to.as_deref(), Some(target.as_str()));
        let target_key = cache
            .resolve(&projects[1].1)
            .expect("the target key resolves");
        assert_eq!(target_key.migrated_to, None);
        // The copy goes on after the cutover while the drain window lasts, then stops.
        assert_eq!(
            catalog
                .claim_migrations("node-a", &both, i64::MAX, cutover - 1)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            catalog
                .claim_migrations("node-a", &both, i64::MAX, cutover)
                .await
                .unwrap()
                .is_empty()
        );
        // Finished: the org may change its region.
        catalog
            .set_primary_region("movers", &region("us-east-1"), &actor())
            .await
            .unwrap();
    }
}

/// An older deployment kept suppressions, deletions and replays in the one catalog: moving them
/// into eu-west-1's own store takes exactly the eu-west-1 project's rows, leaves the other
/// region's where they were, runs again without copying twice, and the key cache then finds the
/// suppression in the regional store.
#[tokio::test]
async fn end_user_rows_move_into_their_regions_store_and_only_theirs() {
    let dir = tempfile::tempdir().unwrap();
    for global in catalogs_under_test(&dir).await {
        let store_url = format!(
            "sqlite://{}/store-{}.db?mode=rwc",
            dir.path().display(),
            uuid::Uuid::new_v4().simple()
        );
        let eu_store = Catalog::connect(&store_url, test_key()).await.unwrap();
        global
            .create_org("mover", "Mover", &region("eu-west-1"), &actor())
            .await
            .unwrap();
        let new_project = |region_id: &'static str| NewProject {
            name: region_id.into(),
            region: region(region_id),
        };
        let (eu, _) = global
            .create_project("mover", new_project("eu-west-1"), &actor())
            .await
            .unwrap();
        let (us, _) = global
            .create_project("mover", new_project("us-east-1"), &actor())
            .await
            .unwrap();
        for project in [&eu, &us] {
            global
                .suppress_users(project, &["quiet-user".into()], &actor())
                .await
                .unwrap();
            global
                .create_deletion(project, &["erased-user".into()], &actor())
                .await
                .unwrap();
        }
        let day = 86_400_000;
        global
            .create_replay(&us, day, day, &actor())
            .await
            .expect_err("a deletion of the project is pending");

        let store = RegionalStore {
            catalog: eu_store.clone(),
            regions: vec![region("eu-west-1")],
            is_global: false,
            display_url: store_url.clone(),
        };
        let moved = move_end_user_rows(&global, &store).await.unwrap();
        assert_eq!(
            moved,
            vec![("suppressions", 2), ("deletions", 1), ("replays", 0)],
            "the deletion also suppressed its user: two suppression rows"
        );
        assert_eq!(
            move_end_user_rows(&global, &store).await.unwrap(),
            vec![("suppressions", 0), ("deletions", 0), ("replays", 0)]
        );

        assert!(
            eu_store
                .is_user_suppressed(&eu.project_id, "quiet-user")
                .await
                .unwrap()
        );
        assert!(
            !global
                .is_user_suppressed(&eu.project_id, "quiet-user")
                .await
                .unwrap()
        );
        assert!(
            global
                .is_user_suppressed(&us.project_id, "quiet-user")
                .await
                .unwrap()
        );
        assert_eq!(
            eu_store
                .recent_deletions(&eu.project_id, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            global
                .recent_deletions(&eu.project_id, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            global
                .recent_deletions(&us.project_id, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            eu_store.end_user_project_ids().await.unwrap(),
            vec![
                ("suppressions", eu.project_id.clone()),
                ("deletions", eu.project_id.clone())
            ]
        );

        // eu-west-1 in its own store, us-east-1 still in the global catalog.
        let cache = KeyCache::load_from(global.clone(), vec![eu_store.clone(), global.clone()])
            .await
            .unwrap();
        for project in [&eu, &us] {
            assert!(cache.is_suppressed(&project.project_id, "quiet-user"));
            assert!(cache.is_suppressed(&project.project_id, "erased-user"));
            assert!(!cache.is_suppressed(&project.project_id, "someone-else"));
        }
        // A new suppression in the regional store reaches the cache on refresh.
        eu_store
            .suppress_users(&eu, &["later-user".into()], &actor())
            .await
            .unwrap();
        assert!(!cache.is_suppressed(&eu.project_id, "later-user"));
        assert!(cache.refresh().await.unwrap());
        assert!(cache.is_suppressed(&eu.project_id, "later-user"));
        // Its audit entry is in the regional store's chain, which verifies.
        let regional_audit = eu_store.list_audit("mover", 0, 100).await.unwrap();
        assert_eq!(regional_audit.items.len(), 1);
        assert_eq!(regional_audit.items[0].action, "suppression.add");
        assert_eq!(
            eu_store.verify_audit_chain().await.unwrap().first_broken,
            None
        );
        assert_eq!(
            global.verify_audit_chain().await.unwrap().first_broken,
            None
        );
    }
}

#[tokio::test]
async fn a_key_made_a_moment_ago_resolves_on_its_first_request_and_misses_share_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = sqlite_catalog(&dir).await;
    catalog
        .create_org("acme", "Acme", &region("eu-west-1"), &actor())
        .await
        .unwrap();
    let cache = KeyCache::load(catalog.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // A refresher that would not run on its own for an hour: only misses wake it.
    let refresher =
        tokio::spawn(Arc::clone(&cache).run_refresher(Duration::from_secs(3600), stopped));
    let (project, key) = catalog
        .create_project(
            "acme",
            NewProject {
                name: "Made by the CLI".into(),
                region: region("us-east-1"),
            },
            &actor(),
        )
        .await
        .unwrap();
    assert!(
        cache.resolve(&key).is_none(),
        "the snapshot does not know it yet"
    );
    let resolved = cache
        .resolve_or_refresh(&key)
        .await
        .expect("found after one refresh");
    assert_eq!(&*resolved.project_id, project.project_id.as_str());
    // Many unknown keys at once wait for the same refreshes, not one each.
    let before = cache.refresh_runs();
    let misses: Vec<_> = (0..50)
        .map(|index| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .resolve_or_refresh(&format!("wk_unknown_{index}"))
                    .await
            })
        })
        .collect();
    for miss in misses {
        assert!(miss.await.unwrap().is_none());
    }
    let runs = cache.refresh_runs() - before;
    assert!(
        (1..=3).contains(&runs),
        "50 misses at once share the refresher's runs: {runs}"
    );
    let _ = stop.send(true);
    refresher.await.unwrap();
}
