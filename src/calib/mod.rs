//! Calibration for MBQ quantization: the calibration set ([`data`]), the
//! sensitivity pass ([`grad`]) and the report ([`report`]).

pub mod data;
pub mod grad;
pub mod report;
pub mod run;
pub mod search;
