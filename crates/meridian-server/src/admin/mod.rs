//! The admin API (`/admin/...`), authenticated by JWT (see `crate::auth`): one module per
//! aggregate, each with its routes; `access` holds what they share.

pub mod access;
mod audit_log;
mod gdpr;
mod insights;
mod ledger;
mod migration;
mod orgs;
mod projects;
mod regions;
mod replay;
mod retention;
mod storage;
mod suppressions;
mod token_revocation;
mod volume;

use crate::routes::ApiRoutes;

/// Every admin route.
pub fn routes() -> ApiRoutes {
    regions::routes()
        .merge(orgs::routes())
        .merge(projects::routes())
        .merge(audit_log::routes())
        .merge(suppressions::routes())
        .merge(storage::routes())
        .merge(gdpr::routes())
        .merge(replay::routes())
        .merge(retention::routes())
        .merge(migration::routes())
        .merge(volume::routes())
        .merge(insights::routes())
        .merge(ledger::routes())
        .merge(token_revocation::routes())
}
