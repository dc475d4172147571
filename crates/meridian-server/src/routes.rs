//! Route registration that remembers what it registered, so the OpenAPI document can be checked
//! against the real router (every route documented, every documented route real).

use std::collections::BTreeMap;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};

use crate::state::AppState;

#[derive(Default)]
pub struct ApiRoutes {
    by_path: BTreeMap<&'static str, MethodRouter<AppState>>,
    registered: Vec<(Method, &'static str)>,
}

fn filter_of(method: &Method) -> MethodFilter {
    match *method {
        Method::GET => MethodFilter::GET,
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        Method::OPTIONS => MethodFilter::OPTIONS,
        Method::HEAD => MethodFilter::HEAD,
        _ => MethodFilter::TRACE,
    }
}

impl ApiRoutes {
    pub fn new() -> ApiRoutes {
        ApiRoutes::default()
    }

    pub fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> ApiRoutes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        debug_assert!(
            !self.registered.contains(&(method.clone(), path)),
            "{method} {path} registered twice"
        );
        let existing = self.by_path.remove(path).unwrap_or_default();
        self.by_path
            .insert(path, existing.on(filter_of(&method), handler));
        self.registered.push((method, path));
        self
    }

    pub fn merge(mut self, other: ApiRoutes) -> ApiRoutes {
        for (method, path) in &other.registered {
            debug_assert!(
                !self.registered.contains(&(method.clone(), path)),
                "{method} {path} registered twice"
            );
        }
        for (path, method_router) in other.by_path {
            let existing = self.by_path.remove(path).unwrap_or_default();
            self.by_path.insert(path, existing.merge(method_router));
        }
        self.registered.extend(other.registered);
        self
    }

    pub fn registered(&self) -> Vec<(Method, &'static str)> {
        self.registered.clone()
    }

    pub fn into_router(self) -> Router<AppState> {
        self.by_path
            .into_iter()
            .fold(Router::new(), |router, (path, method_router)| {
                router.route(path, method_router)
            })
    }
}
