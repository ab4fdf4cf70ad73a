//! Quantization: the packed format ([`format`]), the MBQ reference
//! pseudo-quantizer ([`pseudo`]), the W4A8 weight and activation quantizers
//! ([`w4a8`]) and writing quantized model directories
//! ([`writer`]).

pub mod bitstream;
pub mod compressed;
pub mod format;
pub mod gptq;
pub mod pseudo;
pub mod safetensors_out;
pub mod w4a8;
pub mod writer;
