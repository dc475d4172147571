//! The OpenAPI 3.1 document of the ingest, admin and operations APIs, built from the routes the
//! router really registered (`routes::ApiRoutes`) and the descriptions below. A test checks that
//! every registered route is described and every described route is registered.

use axum::http::Method;
use serde_json::{Map, Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    WriteKey,
    AdminJwt,
    Open,
}

/// What the document says about one route.
#[derive(Clone, Copy, Debug)]
pub struct Operation {
    pub summary: &'static str,
    pub tag: &'static str,
    pub security: Security,
    /// Component schema of the JSON request body.
    pub request: Option<&'static str>,
    /// Success status and its component schema (`None`: no body, or not JSON).
    pub success: (u16, Option<&'static str>),
    pub errors: &'static [u16],
}

const INGEST_ERRORS: &[u16] = &[400, 401, 403, 408, 413, 415, 429, 503];
const ADMIN_ERRORS: &[u16] = &[400, 401, 403, 404, 409, 503];

const fn ingest(summary: &'static str, request: &'static str) -> Operation {
    Operation {
        summary,
        tag: "ingest",
        security: Security::WriteKey,
        request: Some(request),
        success: (200, Some("IngestAccepted")),
        errors: INGEST_ERRORS,
    }
}

const fn admin(
    summary: &'static str,
    request: Option<&'static str>,
    success: (u16, Option<&'static str>),
) -> Operation {
    Operation {
        summary,
        tag: "admin",
        security: Security::AdminJwt,
        request,
        success,
        errors: ADMIN_ERRORS,
    }
}

const fn console(summary: &'static str) -> Operation {
    Operation {
        summary,
        tag: "console",
        security: Security::Open,
        request: None,
        success: (200, None),
        errors: &[404],
    }
}

/// The description of every route: method, path template, operation.
pub fn descriptions() -> Vec<(Method, &'static str, Operation)> {
    vec![
        (
            Method::POST,
            "/v1/track",
            ingest("Record a track message", "Message"),
        ),
        (
            Method::POST,
            "/v1/t",
            ingest("Record a track message", "Message"),
        ),
        (
            Method::POST,
            "/v1/identify",
            ingest("Record an identify message", "Message"),
        ),
        (
            Method::POST,
            "/v1/i",
            ingest("Record an identify message", "Message"),
        ),
        (
            Method::POST,
            "/v1/page",
            ingest("Record a page message", "Message"),
        ),
        (
            Method::POST,
            "/v1/p",
            ingest("Record a page message", "Message"),
        ),
        (
            Method::POST,
            "/v1/screen",
            ingest("Record a screen message", "Message"),
        ),
        (
            Method::POST,
            "/v1/s",
            ingest("Record a screen message", "Message"),
        ),
        (
            Method::POST,
            "/v1/group",
            ingest("Record a group message", "Message"),
        ),
        (
            Method::POST,
            "/v1/g",
            ingest("Record a group message", "Message"),
        ),
        (
            Method::POST,
            "/v1/alias",
            ingest("Record an alias message", "Message"),
        ),
        (
            Method::POST,
            "/v1/a",
            ingest("Record an alias message", "Message"),
        ),
        (
            Method::POST,
            "/v1/batch",
            ingest("Record a batch of messages", "Batch"),
        ),
        (
            Method::POST,
            "/v1/import",
            ingest("Record a batch of messages", "Batch"),
        ),
        (
            Method::POST,
            "/v1/b",
            ingest("Record a batch of messages", "Batch"),
        ),
        (
            Method::POST,
            "/beacon/v1/batch",
            Operation {
                summary: "Record a batch sent as a beacon (RudderStack's sendBeacon mode): the write key in the `writeKey` query parameter, a text/plain JSON body",
                tag: "ingest",
                security: Security::Open,
                request: Some("Batch"),
                success: (200, Some("IngestAccepted")),
                errors: INGEST_ERRORS,
            },
        ),
        (
            Method::POST,
            "/v1/m",
            Operation {
                summary: "analytics.js client metrics (counted, never stored)",
                tag: "ingest",
                security: Security::Open,
                request: Some("ClientMetrics"),
                success: (200, Some("IngestAccepted")),
                errors: &[400, 408, 413, 415],
            },
        ),
        (
            Method::GET,
            "/v1/projects/{write_key}/settings",
            Operation {
                summary: "analytics.js boot settings for a write key",
                tag: "ingest",
                security: Security::Open,
                request: None,
                success: (200, Some("BrowserSettings")),
                errors: &[400, 401, 403],
            },
        ),
        (
            Method::GET,
            "/admin/regions",
            admin(
                "List the configured regions",
                None,
                (200, Some("RegionList")),
            ),
        ),
        (
            Method::GET,
            "/admin/node/status",
            admin(
                "This node's state in detail: queues, each sink's position, restarts and last error (platform token)",
                None,
                (200, Some("NodeStatus")),
            ),
        ),
        (
            Method::POST,
            "/admin/token-revocations",
            admin(
                "Revoke admin tokens: one by its jti, or every token issued before a time, of a user, an org (owner of the org) or everyone (platform)",
                Some("TokenRevocationRequest"),
                (201, Some("TokenRevocation")),
            ),
        ),
        (
            Method::GET,
            "/admin/token-revocations",
            admin(
                "The token revocations of an org (owner; ?org_id=) or of every org (platform)",
                None,
                (200, Some("TokenRevocationList")),
            ),
        ),
        (
            Method::GET,
            "/admin/regions/{region}/residency",
            admin(
                "Residency report of a region this node serves: every project found in its ClickHouse, archive and customer buckets, and any data of a project pinned elsewhere (platform token)",
                None,
                (200, Some("ResidencyReport")),
            ),
        ),
        (
            Method::GET,
            "/admin/regions/orgs/{org_id}",
            admin(
                "An org's primary region and its projects' regions (owner)",
                None,
                (200, Some("OrgRegions")),
            ),
        ),
        (
            Method::POST,
            "/admin/regions/orgs/{org_id}/assign",
            admin(
                "Set the org's primary region (owner; 409 while a migration is in flight)",
                Some("AssignRegion"),
                (200, Some("AssignedRegion")),
            ),
        ),
        (
            Method::POST,
            "/admin/orgs",
            admin(
                "Create an org (platform token)",
                Some("CreateOrg"),
                (201, Some("Org")),
            ),
        ),
        (
            Method::POST,
            "/admin/orgs/{org_id}/projects",
            admin(
                "Create a project pinned to a region, with its first write key (owner/admin)",
                Some("CreateProject"),
                (201, Some("CreatedProject")),
            ),
        ),
        (
            Method::GET,
            "/admin/orgs/{org_id}/projects",
            admin(
                "List the org's projects (member+)",
                None,
                (200, Some("ProjectPage")),
            ),
        ),
        (
            Method::GET,
            "/admin/orgs/{org_id}/audit",
            admin(
                "Page through the org's audit log: the global catalog's entries and those of the regional stores of the regions this node serves, merged by time; `store` names each entry's hash chain (owner)",
                None,
                (200, Some("AuditPage")),
            ),
        ),
        (
            Method::POST,
            "/admin/orgs/{org_id}/migrations",
            admin(
                "Record a region migration between two projects (owner)",
                Some("CreateMigration"),
                (201, Some("Migration")),
            ),
        ),
        (
            Method::GET,
            "/admin/migrations/{migration_id}",
            admin(
                "A region migration's status (owner)",
                None,
                (200, Some("Migration")),
            ),
        ),
        (
            Method::POST,
            "/admin/migrations/{migration_id}/start",
            admin(
                "Start a pending migration: the source project's archive is copied into the target's region (its archive and ClickHouse), on a node serving both regions (owner)",
                None,
                (200, Some("Migration")),
            ),
        ),
        (
            Method::POST,
            "/admin/migrations/{migration_id}/complete",
            admin(
                "Cut over a dual_write migration: done, the source project refuses new events (403 project_migrated) and what its queues still deliver is copied; 409 invalid_transition before the copy has caught up (owner)",
                None,
                (200, Some("Migration")),
            ),
        ),
        (
            Method::POST,
            "/admin/migrations/{migration_id}/cancel",
            admin(
                "Cancel a migration that is not finished (owner)",
                None,
                (200, Some("Migration")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}",
            admin(
                "A project, with its region and key prefixes (member+)",
                None,
                (200, Some("Project")),
            ),
        ),
        (
            Method::PATCH,
            "/admin/projects/{project_id}",
            admin(
                "Rename a project or set its retention ({\"retention\": {\"warehouse_days\", \"archive_days\"}}); changing its region is 409 region_immutable (owner/admin)",
                Some("UpdateProject"),
                (200, Some("Project")),
            ),
        ),
        (
            Method::POST,
            "/admin/projects/{project_id}/keys/rotate",
            admin(
                "Mint a new write key; old keys stop after the grace period (owner/admin)",
                Some("RotateKey"),
                (200, Some("RotatedKey")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/suppressions",
            admin(
                "List suppressed users (owner/admin)",
                None,
                (200, Some("SuppressionPage")),
            ),
        ),
        (
            Method::POST,
            "/admin/projects/{project_id}/suppressions",
            admin(
                "Suppress up to 5,000 users (owner/admin)",
                Some("UserIds"),
                (200, Some("SuppressionResult")),
            ),
        ),
        (
            Method::PUT,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            admin(
                "Suppress one user (owner/admin)",
                None,
                (200, Some("SuppressedUser")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            admin(
                "Whether a user is suppressed, looked up by the user's keyed hash (owner/admin)",
                None,
                (200, Some("SuppressionLookup")),
            ),
        ),
        (
            Method::DELETE,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            admin("Lift a suppression (owner/admin)", None, (204, None)),
        ),
        (
            Method::PUT,
            "/admin/projects/{project_id}/storage",
            admin(
                "Archive the project to the customer's own bucket, verified by a test write (owner)",
                Some("StorageRequest"),
                (200, Some("Project")),
            ),
        ),
        (
            Method::DELETE,
            "/admin/projects/{project_id}/storage",
            admin(
                "Return the project's archive to the regional bucket (owner)",
                None,
                (204, None),
            ),
        ),
        (
            Method::POST,
            "/admin/projects/{project_id}/deletions",
            admin(
                "Request a GDPR deletion of up to 5,000 users, carried out in the project's region; also suppresses them (owner/admin)",
                Some("UserIds"),
                (202, Some("Deletion")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/deletions",
            admin(
                "Was this user deleted, and when? The project's deletions that covered ?user_id=, found by recomputing its keyed hash; without user_id the project's latest 50 deletions (owner/admin)",
                None,
                (200, Some("UserDeletions")),
            ),
        ),
        (
            Method::GET,
            "/admin/deletions/{deletion_id}",
            admin(
                "A GDPR deletion's status, per-store progress and deadline (owner/admin)",
                None,
                (200, Some("Deletion")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/retention",
            admin(
                "Dry run of the retention janitor: the archive objects and warehouse rows past the project's retention now (or past ?warehouse_days=&archive_days=), deleting nothing; 503 region_not_served on a node of another region (owner/admin)",
                None,
                (200, Some("RetentionPreview")),
            ),
        ),
        (
            Method::POST,
            "/admin/projects/{project_id}/replays",
            admin(
                "Replay the project's archive of a received-day range into its region's ClickHouse: only messages the warehouse lacks are inserted, users deleted since stay deleted; 409 while a deletion or another replay of the project is unfinished (owner/admin)",
                Some("ReplayRequest"),
                (202, Some("Replay")),
            ),
        ),
        (
            Method::GET,
            "/admin/replays/{replay_id}",
            admin(
                "A replay's status and counts (owner/admin)",
                None,
                (200, Some("Replay")),
            ),
        ),
        (
            Method::POST,
            "/admin/replays/{replay_id}/cancel",
            admin(
                "Cancel a replay: a pending one at once, a running one after its current object; 409 once it has finished (owner/admin)",
                None,
                (200, Some("Replay")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/replays",
            admin(
                "The project's latest 50 replays, newest first (owner/admin)",
                None,
                (200, Some("ReplayList")),
            ),
        ),
        (
            Method::GET,
            "/admin/orgs/{org_id}/migrations",
            admin(
                "The org's latest 50 migrations, newest first (owner)",
                None,
                (200, Some("MigrationList")),
            ),
        ),
        (
            Method::GET,
            "/admin/orgs/{org_id}/volume",
            admin(
                "Events per project received in the last hour, from the warehouses of the regions this node serves; the others listed as unavailable (member+)",
                None,
                (200, Some("Volume")),
            ),
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/insights/volume",
            Operation {
                summary: "Events and users per UTC day or hour (`interval=day|hour`) of `[from, to)` by event time, every bucket listed; at most 366 days or 744 hours; 422 too_much_data past insights.max_rows_to_read; 503 region_not_served (with the region and its public_url) on a node of another region (member+)",
                tag: "admin",
                security: Security::AdminJwt,
                request: None,
                success: (200, None),
                errors: &[400, 401, 403, 404, 409, 422, 503],
            },
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/insights/events",
            Operation {
                summary: "The most frequent track events of `[from, to)` with their users (`limit` 1-100); the same bounds and region rule as the volume (member+)",
                tag: "admin",
                security: Security::AdminJwt,
                request: None,
                success: (200, None),
                errors: &[400, 401, 403, 404, 409, 422, 503],
            },
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/ledger",
            Operation {
                summary: "The delivery ledger: per received day (UTC) of `[from, to]` (dates; default the last 7 days, at most 366), the messages acknowledged, suppressed, archived, in the warehouse (null without one), erased by GDPR deletions, still queued, and whether the day reconciles; 503 region_not_served on a node of another region (member+)",
                tag: "admin",
                security: Security::AdminJwt,
                request: None,
                success: (200, None),
                errors: &[400, 401, 403, 404, 503],
            },
        ),
        (
            Method::GET,
            "/admin/projects/{project_id}/events/live",
            Operation {
                summary: "Server-Sent Events of the project's messages as they are accepted (`accepted`, `suppressed`, `rejected` with its reason, `skipped` with a count), sampled above console.live_events_per_second; 429 too_many_subscribers past console.live_subscribers_per_project; 503 region_not_served on a node of another region (owner/admin/member)",
                tag: "admin",
                security: Security::AdminJwt,
                request: None,
                success: (200, None),
                errors: &[401, 403, 404, 429, 503],
            },
        ),
        (Method::GET, "/console", console("The admin console (HTML)")),
        (
            Method::GET,
            "/console/",
            console("The admin console (HTML)"),
        ),
        (
            Method::GET,
            "/console/{asset}",
            console("The console's script and style sheet (app.js, app.css)"),
        ),
        (
            Method::GET,
            "/healthz",
            Operation {
                summary: "The process is alive",
                tag: "operations",
                security: Security::Open,
                request: None,
                success: (200, Some("Health")),
                errors: &[],
            },
        ),
        (
            Method::GET,
            "/readyz",
            Operation {
                summary: "Catalog loaded and every served region's queue writable",
                tag: "operations",
                security: Security::Open,
                request: None,
                success: (200, Some("Readiness")),
                errors: &[503],
            },
        ),
        (
            Method::GET,
            "/metrics",
            Operation {
                summary: "Prometheus metrics (OpenMetrics text)",
                tag: "operations",
                security: Security::Open,
                request: None,
                success: (200, None),
                errors: &[],
            },
        ),
    ]
}

/// The description of one route.
pub fn describe(method: &Method, path: &str) -> Option<Operation> {
    descriptions()
        .into_iter()
        .find(|(described_method, described_path, _)| {
            described_method == method && *described_path == path
        })
        .map(|(_, _, operation)| operation)
}

fn nullable(schema: Value) -> Value {
    json!({"oneOf": [schema, {"type": "null"}]})
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let nullable_string = json!({"type": ["string", "null"]});
    let retention_setting = json!({"oneOf": [
        {"type": "integer", "minimum": 1, "maximum": meridian_catalog::MAX_RETENTION_DAYS},
        {"type": "null", "description": "kept for good"},
        {"enum": ["keep", "region_default"]}]});
    let page = |item: Value| json!({"type": "object", "required": ["items", "next_cursor"], "properties": {"items": {"type": "array", "items": item}, "next_cursor": nullable(json!({"type": "string"}))}});
    json!({
        "Error": {"type": "object", "required": ["success", "code", "message"], "properties": {
            "success": {"const": false}, "code": string, "message": string,
            "rejected": {"type": "array", "items": reference("Rejection")}}},
        "Rejection": {"type": "object", "required": ["index", "code", "message"], "properties": {
            "index": {"type": "integer", "minimum": 0},
            "last_index": {"type": "integer", "minimum": 0, "description": "Set on the one entry for the messages past the batch limit: they are index..=last_index."},
            "code": string, "message": string}},
        "IngestAccepted": {"type": "object", "required": ["success"], "properties": {
            "success": {"const": true}, "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "array", "items": reference("Rejection"), "maxItems": 101},
            "rejected_omitted": {"type": "integer", "minimum": 1, "description": "Rejections not listed (at most 100 are)."},
            "envelope_problems": {"type": "array", "description": "Batch-level fields that were unusable: the messages were stored without them.", "items": {
                "type": "object", "required": ["field", "message"], "properties": {
                    "field": {"enum": ["sentAt", "context", "integrations"]}, "message": string}}}}},
        "Message": {"type": "object", "description": "A Segment message (track, identify, page, screen, group, alias).", "properties": {
            "type": {"enum": ["track", "identify", "page", "screen", "group", "alias"]},
            "userId": {"type": ["string", "number", "null"]}, "anonymousId": {"type": ["string", "number", "null"]},
            "messageId": {"type": ["string", "number", "null"]}, "event": {"type": ["string", "null"]},
            "name": {"type": ["string", "null"]}, "groupId": {"type": ["string", "number", "null"]},
            "previousId": {"type": ["string", "number", "null"]},
            "properties": {"type": ["object", "null"]}, "traits": {"type": ["object", "null"]},
            "context": {"type": ["object", "null"]}, "integrations": {"type": ["object", "null"]},
            "timestamp": {"type": ["string", "null"]}, "sentAt": {"type": ["string", "null"]},
            "writeKey": {"type": "string"}}},
        "Batch": {"type": "object", "required": ["batch"], "properties": {
            "batch": {"type": "array", "items": reference("Message")}, "context": {"type": ["object", "null"]},
            "integrations": {"type": ["object", "null"]}, "sentAt": {"type": ["string", "null"]}, "writeKey": string}},
        "ClientMetrics": {"type": "object", "properties": {"series": {"type": "array"}}},
        "BrowserSettings": {"type": "object", "required": ["integrations"], "properties": {
            "integrations": {"type": "object"}, "metrics": {"type": "object"}, "plan": {"type": "object"}}},
        "Region": {"type": "object", "required": ["id", "display_name", "status", "default"], "properties": {
            "id": string, "display_name": string, "status": {"enum": ["available", "unavailable"]}, "default": {"type": "boolean"}}},
        "RegionList": {"type": "array", "items": reference("Region")},
        "CreateOrg": {"type": "object", "required": ["org_id", "name"], "properties": {
            "org_id": {"type": "string", "pattern": "^[a-z0-9_-]{2,64}$"}, "name": string, "primary_region": string}},
        "Org": {"type": "object", "required": ["org_id", "name", "primary_region", "created_at"], "properties": {
            "org_id": string, "name": string, "primary_region": string, "created_at": string}},
        "OrgRegions": {"type": "object", "required": ["org_id", "primary_region", "projects"], "properties": {
            "org_id": string, "primary_region": string, "projects": {"type": "array", "items": {"type": "object",
                "required": ["project_id", "name", "region"], "properties": {"project_id": string, "name": string, "region": string}}}}},
        "AssignRegion": {"type": "object", "required": ["region"], "properties": {"region": string}},
        "AssignedRegion": {"type": "object", "required": ["org_id", "primary_region"], "properties": {"org_id": string, "primary_region": string}},
        "CreateProject": {"type": "object", "required": ["name"], "properties": {"name": string, "region": string}},
        "CreatedProject": {"type": "object", "required": ["project_id", "name", "region", "write_key"], "properties": {
            "project_id": string, "name": string, "region": string, "write_key": string}},
        "KeyInfo": {"type": "object", "required": ["prefix", "created_at", "expires_at"], "properties": {
            "prefix": string, "created_at": string, "expires_at": nullable(json!({"type": "string"}))}},
        "Storage": {"type": "object", "required": ["bucket", "role_arn"], "properties": {
            "bucket": string, "prefix": {"type": ["string", "null"]}, "role_arn": string, "external_id": string,
            "kms_key_arn": {"type": ["string", "null"]}, "label": {"type": ["string", "null"]}}},
        "Project": {"type": "object", "required": ["project_id", "org_id", "name", "region", "created_at", "keys", "storage", "storage_external_id"], "properties": {
            "project_id": string, "org_id": string, "name": string, "region": string, "created_at": string,
            "keys": {"type": "array", "items": reference("KeyInfo")}, "storage": nullable(reference("Storage")),
            "storage_external_id": string, "retention": reference("Retention")}},
        "ProjectPage": page(reference("Project")),
        "UpdateProject": {"type": "object", "properties": {"name": string, "region": string,
            "retention": reference("RetentionChange")}},
        "RetentionChange": {"type": "object", "additionalProperties": false, "properties": {
            "warehouse_days": retention_setting.clone(), "archive_days": retention_setting.clone()}},
        "Retention": {"type": "object", "required": ["warehouse_days", "archive_days", "project_settings", "region_default"], "properties": {
            "warehouse_days": nullable(json!({"type": "integer"})), "archive_days": nullable(json!({"type": "integer"})),
            "project_settings": {"type": "object"}, "region_default": {"type": "object"}}},
        "RetentionPreview": {"type": "object", "required": ["project_id", "region", "dry_run", "as_of", "retention", "warehouse", "archive"], "properties": {
            "project_id": string, "region": string, "dry_run": {"type": "boolean"}, "as_of": string,
            "retention": reference("Retention"),
            "warehouse": {"type": "object", "required": ["days", "cutoff", "rows", "by_day"]},
            "archive": {"type": "object", "required": ["days", "cutoff", "objects", "listed", "listed_omitted"]}}},
        "RotateKey": {"type": "object", "properties": {"grace_seconds": {"type": "integer", "minimum": 0, "maximum": 2_592_000}}},
        "RotatedKey": {"type": "object", "required": ["write_key", "previous_key_expires_at"], "properties": {
            "write_key": string, "previous_key_expires_at": string}},
        "UserIds": {"type": "object", "required": ["user_ids"], "properties": {
            "user_ids": {"type": "array", "minItems": 1, "maxItems": 5000, "items": {"type": "string", "minLength": 1, "maxLength": 1024}}}},
        "SuppressionPage": page(string.clone()),
        "SuppressionResult": {"type": "object", "required": ["suppressed", "newly_suppressed"], "properties": {
            "suppressed": {"type": "integer"}, "newly_suppressed": {"type": "integer"}}},
        "SuppressedUser": {"type": "object", "required": ["project_id", "user_id", "suppressed"], "properties": {
            "project_id": string, "user_id": string, "suppressed": {"type": "boolean"}}},
        "SuppressionLookup": {"type": "object", "required": ["project_id", "user_id", "user_hash", "suppressed"], "properties": {
            "project_id": string, "user_id": string, "user_hash": string, "suppressed": {"type": "boolean"}}},
        "UserDeletions": {"type": "object", "required": ["user_id", "items"], "properties": {
            "user_id": nullable(json!({"type": "string"})), "items": {"type": "array", "items": reference("Deletion")}}},
        "StorageRequest": {"type": "object", "required": ["bucket", "role_arn"], "properties": {
            "bucket": string, "prefix": string, "role_arn": string, "external_id": string, "kms_key_arn": string, "label": string}},
        "AuditEntry": {"type": "object", "required": ["seq", "store", "at", "actor", "action", "target", "request_id", "hash", "prev_hash"], "properties": {
            "seq": {"type": "integer"}, "store": string, "at": string, "actor": string, "action": string, "target": string,
            "before": {}, "after": {}, "request_id": string, "hash": string, "prev_hash": string}},
        "AuditPage": page(reference("AuditEntry")),
        "CreateMigration": {"type": "object", "required": ["source_project", "target_project"], "properties": {
            "source_project": string, "target_project": string}},
        "Migration": {"type": "object", "required": ["migration_id", "org_id", "source_project", "target_project", "source_region", "target_region", "status", "error", "created_at", "updated_at"], "properties": {
            "migration_id": string, "org_id": string, "source_project": string, "target_project": string,
            "source_region": string, "target_region": string,
            "status": {"enum": ["pending", "copying", "dual_write", "done", "failed", "cancelled"]},
            "error": nullable(json!({"type": "string"})), "created_at": string, "updated_at": string,
            "objects_copied": {"type": "integer"}, "messages_copied": {"type": "integer"},
            "messages_present": {"type": "integer"}, "lag_objects": {"type": "integer"},
            "last_pass_at": nullable(json!({"type": "string"})), "cutover_at": nullable(json!({"type": "string"}))}},
        "ReplayList": {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": reference("Replay")}}},
        "MigrationList": {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": reference("Migration")}}},
        "Volume": {"type": "object", "required": ["org_id", "since", "window_secs", "projects", "unavailable"], "properties": {
            "org_id": string, "since": string, "window_secs": {"type": "integer"},
            "projects": {"type": "object", "additionalProperties": {"type": "integer"}},
            "unavailable": {"type": "array", "items": {"type": "object"}}}},
        "ReplayRequest": {"type": "object", "required": ["from", "to"], "additionalProperties": false, "properties": {
            "from": {"type": "string", "description": "first received-day: a date (2026-11-30) or an RFC 3339 timestamp (its UTC day)"},
            "to": {"type": "string", "description": "last received-day, included"}}},
        "Replay": {"type": "object", "required": ["replay_id", "project_id", "region", "from", "to", "status", "objects_total", "objects_done", "messages_read", "messages_inserted", "messages_present", "messages_erased", "messages_refused", "created_at"], "properties": {
            "replay_id": string, "project_id": string, "region": string, "from": string, "to": string,
            "status": {"type": "string", "enum": ["pending", "running", "done", "failed", "cancelled"]},
            "cancel_requested": {"type": "boolean"},
            "objects_total": {"type": "integer"}, "objects_done": {"type": "integer"},
            "messages_read": {"type": "integer"}, "messages_inserted": {"type": "integer"},
            "messages_present": {"type": "integer"}, "messages_erased": {"type": "integer"},
            "messages_refused": {"type": "integer"},
            "error": nullable(json!({"type": "string"})), "created_at": string,
            "started_at": nullable(json!({"type": "string"})), "finished_at": nullable(json!({"type": "string"}))}},
        "Deletion": {"type": "object", "required": ["deletion_id", "project_id", "region", "status", "stage", "user_count", "created_at", "deadline", "stores"], "properties": {
            "deletion_id": string, "project_id": string, "region": string,
            "status": {"enum": ["pending", "running", "done", "failed"]},
            "stage": {"enum": ["settle", "clickhouse", "archive", "finished"]},
            "user_count": {"type": "integer"}, "created_at": string,
            "started_at": nullable(json!({"type": "string"})), "finished_at": nullable(json!({"type": "string"})),
            "deadline": string, "error": nullable(json!({"type": "string"})),
            "also_requested": {"type": "array", "description": "on a request: the same deletion in the targets of the project's region migrations", "items": {"type": "object"}},
            "stores": {"type": "object"}}},
        "ResidencyReport": {"type": "object", "required": ["region", "scanned_at", "clean", "stores", "projects", "findings"], "properties": {
            "region": string, "scanned_at": string, "clean": {"type": "boolean"},
            "stores": {"type": "array", "items": string}, "projects": {"type": "object"},
            "findings": {"type": "array", "items": {"type": "object"}}}},
        "TokenRevocationRequest": {"type": "object", "properties": {
            "org_id": string, "sub": string, "jti": string,
            "issued_before": {"type": "string", "description": "\"now\" or an RFC 3339 time"}}},
        "TokenRevocation": {"type": "object", "required": ["revocation_id", "created_at", "created_by"], "properties": {
            "revocation_id": string, "org_id": nullable_string, "sub": nullable_string, "jti": nullable_string,
            "issued_before": nullable_string, "created_at": string, "created_by": string}},
        "TokenRevocationList": {"type": "object", "required": ["revocations"], "properties": {
            "revocations": {"type": "array", "items": reference("TokenRevocation")}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": string}},
        "Readiness": {"type": "object", "required": ["ready", "failing", "regions"], "properties": {"ready": {"type": "boolean"}, "failing": {"type": "array", "items": string}, "regions": {"type": "object"}}},
        "NodeStatus": {"type": "object", "required": ["ready", "failing", "node_id", "regions"], "properties": {"ready": {"type": "boolean"}, "failing": {"type": "array", "items": string}, "node_id": string, "catalog_version": {"type": "integer"}, "regions": {"type": "object"}}},
    })
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect()
}

fn query_parameters(method: &Method, path: &str) -> Vec<Value> {
    if method == Method::GET && path.ends_with("/deletions") {
        return vec![
            json!({"name": "user_id", "in": "query", "required": true, "schema": {"type": "string", "minLength": 1}}),
        ];
    }
    let is_list = method == Method::GET
        && (path.ends_with("/projects")
            || path.ends_with("/suppressions")
            || path.ends_with("/audit"));
    if !is_list {
        return Vec::new();
    }
    vec![
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1}}),
        json!({"name": "cursor", "in": "query", "required": false, "schema": {"type": "string"}}),
    ]
}

/// The OpenAPI document for the registered routes.
pub fn document(registered: &[(Method, &'static str)]) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for (method, path) in registered {
        let Some(operation) = describe(method, path) else {
            continue;
        };
        let mut responses = Map::new();
        let (status, schema) = operation.success;
        let success = match schema {
            Some(name) => {
                json!({"description": "Success", "content": {"application/json": {"schema": reference(name)}}})
            }
            None if path == &"/metrics" => {
                json!({"description": "Metrics", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}})
            }
            None if path.ends_with("/events/live") => {
                json!({"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}})
            }
            None if path.starts_with("/console") => {
                json!({"description": "A console page or asset", "content": {"text/html": {"schema": {"type": "string"}}}})
            }
            None => json!({"description": "Success, no body"}),
        };
        responses.insert(status.to_string(), success);
        for error in operation.errors {
            responses.insert(
                error.to_string(),
                json!({"description": "Error", "content": {"application/json": {"schema": reference("Error")}}}),
            );
        }
        let mut parameters = path_parameters(path);
        parameters.extend(query_parameters(method, path));
        let mut entry = json!({
            "summary": operation.summary,
            "operationId": format!("{}{}", method.as_str().to_lowercase(), path.replace(['/', '{', '}', '-'], "_")),
            "tags": [operation.tag],
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(request) = operation.request {
            entry["requestBody"] = json!({"required": true, "content": {
                "application/json": {"schema": reference(request)},
            }});
        }
        entry["security"] = match operation.security {
            Security::WriteKey => json!([{"writeKeyBasic": []}, {"writeKeyBearer": []}, {}]),
            Security::AdminJwt => json!([{"adminJwt": []}]),
            Security::Open => json!([]),
        };
        let path_item = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        path_item[method.as_str().to_lowercase()] = entry;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Meridian",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Multi-region, Segment-compatible event ingestion: the ingest API (SDKs), the admin API (JWT) and operations routes. Every response carries X-Region and X-Request-Id.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "writeKeyBasic": {"type": "http", "scheme": "basic", "description": "base64(<writeKey>:)"},
                "writeKeyBearer": {"type": "http", "scheme": "bearer", "description": "the write key"},
                "adminJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_route_is_described_and_every_description_is_registered() {
        let registered = crate::server::api_routes().registered();
        for (method, path) in &registered {
            assert!(
                describe(method, path).is_some(),
                "{method} {path} is registered but not in the OpenAPI document"
            );
        }
        let document = document(&registered);
        let documented: usize = document["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(
            documented,
            registered.len(),
            "one operation per registered route"
        );
        for (method, path, _) in descriptions() {
            assert!(
                registered.contains(&(method.clone(), path)),
                "{method} {path} is documented but not registered"
            );
        }
        let schema_names: Vec<String> = document["components"]["schemas"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for (method, path) in &registered {
            let operation = describe(method, path).unwrap();
            for name in operation.request.into_iter().chain(operation.success.1) {
                assert!(
                    schema_names.iter().any(|known| known == name),
                    "{method} {path} refers to unknown schema {name}"
                );
            }
        }
        assert_eq!(document["openapi"], "3.1.0");
    }
}
