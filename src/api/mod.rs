//! OpenAI wire types and their validation into the server's own types.
//!
//! Raw requests are parsed strictly: a field we do not know, or know and do
//! not support, is a 400 that names it, and every value is range-checked here
//! once so nothing downstream checks again.

pub mod chat;
pub mod completion;
pub mod error;
pub mod params;
pub mod response;

pub use error::ApiError;
