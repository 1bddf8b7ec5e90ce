//! chassis-oauth-proxy owns the authenticating reverse proxy: it logs users in
//! against an OpenID Connect issuer (authorization code with PKCE and nonce), keeps
//! the session in an encrypted cookie, decides who may pass (groups, email domains,
//! Kubernetes SubjectAccessReview, bearer JWTs), and forwards requests to one
//! upstream with identity headers it sets itself.
//!
//! ```text
//!  client ─▶ [ strip identity headers ] ─▶ /oauth2/* (warp routes) ─▶ IdP
//!                    │
//!                    └─▶ [ skip-auth path? ] ─▶ [ session / bearer ] ─▶ [ authorize ] ─▶ upstream
//! ```
//!
//! Each security-relevant decision lives in a pure module with its attack tests
//! beside it: [`redirect`] (where a login may send the browser back to), [`path`]
//! (the path the skip-auth rules and the upstream both see), [`headers`] (what
//! the upstream can trust), [`session`] (the sealed cookie).

pub mod bearer;
pub mod config;
pub mod discovery;
pub mod headers;
pub mod metrics;
pub mod oidc;
pub mod path;
pub mod redirect;
pub mod server;
pub mod session;
pub mod upstream;
