//! Archive maintenance for GDPR deletions: find a project's objects, rewrite them without some
//! users' messages. Works on any [`ObjectStore`]: the regional store or a customer's bucket.

use std::collections::HashSet;

use bytes::Bytes;
use serde::Deserialize;

use crate::error::ArchiveError;
use crate::layout::{decode_object, encode_object};
use crate::store::ObjectStore;

/// One archive object of a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectObject {
    pub key: String,
    pub day_start_ms: i64,
}

/// The project's objects under `[prefix/]segment-logs/<project_id>/`, optionally only those of
/// received-days in `[from_day_ms, to_day_ms]`.
pub async fn list_project_objects(
    store: &dyn ObjectStore,
    prefix: Option<&str>,
    project_id: &str,
    day_range: Option<(i64, i64)>,
) -> Result<Vec<ProjectObject>, ArchiveError> {
    let root = match prefix
        .map(|prefix| prefix.trim_matches('/'))
        .filter(|prefix| !prefix.is_empty())
    {
        Some(prefix) => format!("{prefix}/segment-logs/{project_id}/"),
        None => format!("segment-logs/{project_id}/"),
    };
    let mut objects = Vec::new();
    for key in store.list(&root).await? {
        let Some(rest) = key.strip_prefix(&root) else {
            continue;
        };
        let Some((day, name)) = rest.split_once('/') else {
            continue;
        };
        let Ok(day_start_ms) = day.parse::<i64>() else {
            continue;
        };
        if !name.ends_with(".gz") || name.starts_with('.') {
            continue;
        }
        if let Some((from, to)) = day_range
            && (day_start_ms < from || day_start_ms > to)
        {
            continue;
        }
        objects.push(ProjectObject { key, day_start_ms });
    }
    Ok(objects)
}

#[derive(Deserialize)]
struct UserOfMessage {
    #[serde(rename = "userId", default)]
    user_id: Option<serde_json::Value>,
}

fn user_of(line: &[u8]) -> Option<String> {
    let message: UserOfMessage = serde_json::from_slice(line).ok()?;
    match message.user_id? {
        serde_json::Value::String(user) => Some(user),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// What rewriting one object did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriteOutcome {
    pub messages_removed: u64,
    pub messages_kept: u64,
    /// The object was replaced (or deleted, when nothing was left in it).
    pub rewritten: bool,
}

/// Rewrites `key` without the messages of `users`, then re-reads it to verify none is left.
///
/// The object is replaced under the same key (an atomic overwrite on S3, a rename on local
/// disk), never deleted-then-written: readers see the old or the new object, never neither, and
/// a later redelivery of the same queue range lands on the same key instead of beside it. An
/// object left with no message is deleted.
pub async fn rewrite_without_users(
    store: &dyn ObjectStore,
    key: &str,
    users: &HashSet<String>,
    gzip_level: u32,
) -> Result<RewriteOutcome, ArchiveError> {
    let Some(body) = store.get(key).await? else {
        return Ok(RewriteOutcome::default());
    };
    // Objects reach 64 MiB: inflating, filtering and deflating them is CPU work for a blocking
    // thread, never for the runtime's.
    let owned_key = key.to_string();
    let owned_users = users.clone();
    let (outcome, encoded) = tokio::task::spawn_blocking(
        move || -> Result<(RewriteOutcome, Option<Vec<u8>>), ArchiveError> {
            let lines = decode_object(&owned_key, &body)?;
            let (removed, kept): (Vec<Vec<u8>>, Vec<Vec<u8>>) = lines
                .into_iter()
                .partition(|line| user_of(line).is_some_and(|user| owned_users.contains(&user)));
            let outcome = RewriteOutcome {
                messages_removed: removed.len() as u64,
                messages_kept: kept.len() as u64,
                rewritten: !removed.is_empty(),
            };
            if removed.is_empty() || kept.is_empty() {
                return Ok((outcome, None));
            }
            let encoded =
                encode_object(kept.iter().map(Vec::as_slice), gzip_level).map_err(|error| {
                    ArchiveError::BadObject {
                        key: owned_key.clone(),
                        message: error.to_string(),
                    }
                })?;
            Ok((outcome, Some(encoded)))
        },
    )
    .await
    .map_err(|error| ArchiveError::Refused(format!("the rewrite of {key} panicked: {error}")))??;
    if !outcome.rewritten {
        return Ok(outcome);
    }
    match encoded {
        Some(encoded) => store.put(key, Bytes::from(encoded)).await?,
        None => store.delete(key).await?,
    }
    verify_without_users(store, key, users, outcome.messages_kept).await?;
    Ok(outcome)
}

/// Re-reads the object: no message of `users` may remain, and the kept count must match.
pub async fn verify_without_users(
    store: &dyn ObjectStore,
    key: &str,
    users: &HashSet<String>,
    expected_kept: u64,
) -> Result<(), ArchiveError> {
    let body = store.get(key).await?;
    let owned_key = key.to_string();
    let owned_users = users.clone();
    let (leftover, line_count) =
        tokio::task::spawn_blocking(move || -> Result<(usize, u64), ArchiveError> {
            let lines = match body {
                Some(body) => decode_object(&owned_key, &body)?,
                None => Vec::new(),
            };
            let leftover = lines
                .iter()
                .filter(|line| user_of(line).is_some_and(|user| owned_users.contains(&user)))
                .count();
            Ok((leftover, lines.len() as u64))
        })
        .await
        .map_err(|error| ArchiveError::Refused(format!("verifying {key} panicked: {error}")))??;
    if leftover > 0 || line_count != expected_kept {
        return Err(ArchiveError::Store {
            store: store.describe(),
            message: format!(
                "verifying {key} after the rewrite: {leftover} deleted users' messages remain, {line_count} of {expected_kept} kept"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::object_key;
    use crate::local::LocalDirStore;

    fn message(user: &str, n: u32) -> Vec<u8> {
        format!(r#"{{"userId":"{user}","n":{n},"projectId":"p"}}"#).into_bytes()
    }

    #[tokio::test]
    async fn rewrites_only_affected_objects_and_deletes_emptied_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path());
        let mixed = object_key(None, "p", 86_400_000, "q1-0-3");
        let only_a = object_key(None, "p", 2 * 86_400_000, "q1-3-4");
        let only_b = object_key(None, "p", 3 * 86_400_000, "q1-4-5");
        let other_project = object_key(None, "q", 86_400_000, "q1-0-1");
        let put = |key: &str, lines: Vec<Vec<u8>>| {
            let body = encode_object(lines.iter().map(Vec::as_slice), 1).unwrap();
            let key = key.to_string();
            let store = &store;
            async move { store.put(&key, Bytes::from(body)).await.unwrap() }
        };
        put(
            &mixed,
            vec![message("a", 0), message("b", 1), message("a", 2)],
        )
        .await;
        put(&only_a, vec![message("a", 3)]).await;
        put(&only_b, vec![message("b", 4)]).await;
        put(&other_project, vec![message("a", 9)]).await;

        let objects = list_project_objects(&store, None, "p", None).await.unwrap();
        assert_eq!(objects.len(), 3);
        let in_range =
            list_project_objects(&store, None, "p", Some((2 * 86_400_000, 3 * 86_400_000)))
                .await
                .unwrap();
        assert_eq!(
            in_range
                .iter()
                .map(|object| object.key.clone())
                .collect::<Vec<_>>(),
            vec![only_a.clone(), only_b.clone()]
        );

        let users: HashSet<String> = ["a".to_string()].into();
        let outcome = rewrite_without_users(&store, &mixed, &users, 1)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            RewriteOutcome {
                messages_removed: 2,
                messages_kept: 1,
                rewritten: true
            }
        );
        let outcome = rewrite_without_users(&store, &only_a, &users, 1)
            .await
            .unwrap();
        assert_eq!(outcome.messages_kept, 0);
        assert!(
            store.get(&only_a).await.unwrap().is_none(),
            "an emptied object is deleted"
        );
        let outcome = rewrite_without_users(&store, &only_b, &users, 1)
            .await
            .unwrap();
        assert!(!outcome.rewritten, "untouched");
        let again = rewrite_without_users(&store, &mixed, &users, 1)
            .await
            .unwrap();
        assert_eq!(
            again,
            RewriteOutcome {
                messages_removed: 0,
                messages_kept: 1,
                rewritten: false
            },
            "safe to run twice"
        );
        let remaining = decode_object(&mixed, &store.get(&mixed).await.unwrap().unwrap()).unwrap();
        assert_eq!(remaining, vec![message("b", 1)]);
        assert!(
            store.get(&other_project).await.unwrap().is_some(),
            "other projects are not touched"
        );
    }
}
