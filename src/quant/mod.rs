//! Quantization: the packed format ([`format`]), the MBQ reference
//! pseudo-quantizer ([`pseudo`]), the W4A8 weight and activation quantizers
//! ([`w4a8`]), writing quantized model directories ([`writer`]) and
//! reading GPTQ / AWQ checkpoints into the packed format ([`import`]).

pub mod format;
pub mod import;
pub mod pseudo;
pub mod safetensors_out;
pub mod w4a8;
pub mod writer;
