//! Quantization: the packed format ([`mod@format`]), the MBQ reference
//! pseudo-quantizer ([`pseudo`]), the W4A8 weight and activation quantizers
//! ([`w4a8`]), writing quantized model directories ([`writer`]), reading
//! GPTQ / AWQ checkpoints into the packed format ([`import`]), and other
//! formats: GPTQ ([`gptq`]) and compressed-tensors ([`compressed`]) codecs
//! over dense bit streams ([`bitstream`]), and `mbq export` ([`export`]).

pub mod bitstream;
pub mod compressed;
pub mod export;
pub mod format;
pub mod gptq;
pub mod import;
pub mod outdir;
pub mod pseudo;
pub mod safetensors_out;
pub mod w4a8;
pub mod writer;
