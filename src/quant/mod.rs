//! Quantization: the packed format ([`format`]), the MBQ reference
//! pseudo-quantizer ([`pseudo`]) and writing quantized model directories
//! ([`writer`]).

pub mod format;
pub mod pseudo;
pub mod safetensors_out;
pub mod writer;
