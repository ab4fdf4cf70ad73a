//! Calibration for MBQ, AWQ and SmoothQuant quantization, as clients of
//! the one model definition (`model/`): the vocabulary ([`method`],
//! [`group`]), the checked options ([`plan`]), the calibration set
//! ([`data`]), the sensitivity pass ([`sensitivity`]), the scale search
//! ([`search`], on the FP features of [`features`], kept as [`kept`]
//! says), its checkpoint ([`checkpoint`]), the stages that run them
//! ([`run`]) and the report ([`report`], drawn by [`report_svg`]).

pub mod checkpoint;
pub mod data;
pub mod features;
pub mod group;
pub mod kept;
pub mod method;
pub mod plan;
pub mod qlinear;
pub mod report;
pub mod report_svg;
pub mod run;
pub mod search;
pub mod sensitivity;

pub use group::{Group, HostLayer};
pub use method::{LossKind, Method, QuantKind, Scales, Weighting};
pub use plan::{Plan, QuantizeOptions};
pub use run::{quantize_model, CalibProgress, QuantizeOutcome};
