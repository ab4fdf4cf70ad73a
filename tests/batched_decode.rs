//! The server's batched step on the CPU backend (the reference the device
//! backends' batched steps are compared with in tests/wgpu_model.rs and
//! tests/cuda_model.rs): every step equal to each sequence run alone.

mod backend_model;
mod common;

#[test]
fn batched_steps_match_one_sequence_at_a_time() {
    backend_model::batched_steps_match_one_sequence_at_a_time(&mbq::backend::cpu::Cpu);
}
