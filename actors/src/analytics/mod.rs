//! Pure per-device statistics: the rolling window and the z-score anomaly rule.
//!
//! Nothing here knows about actors, tokio or the store; the device actor feeds values in
//! and reads results out, so everything can be tested synchronously and exhaustively.

mod anomaly;
mod window;

pub use anomaly::{AnomalyRule, Evaluation, Signal};
pub use window::{Stats, Window};
