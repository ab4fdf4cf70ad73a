//! Walks one image and prompt through the model stage by stage with the
//! library API, printing shapes and the five most likely next tokens.
//!
//! cargo run --release --example stages -- tests/fixtures/models/onevision tests/fixtures/images/wide.png "What is in the image?"

use std::path::PathBuf;

use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::config::VlmConfig;
use mbq::generate::{build_prompt, prefill};
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(image), Some(prompt)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: stages MODEL_DIR IMAGE PROMPT");
    };
    let dir = PathBuf::from(model);
    let cfg = VlmConfig::load(&dir)?;
    let proc = Processor::load(&dir, cfg.image_token_index)?;
    let pre = preprocess(
        &ImageProcessorConfig::load(&dir)?,
        &load_image(image.as_ref())?,
    )?;
    println!(
        "pixel values: {} tile(s) of 3x{}x{} (image {}x{})",
        pre.num_tiles, pre.height, pre.width, pre.image_size.0, pre.image_size.1
    );
    let be = Cpu;
    let vlm = Vlm::load(&be, &dir)?;
    let emb = vlm.encode_image(&be, &pre)?;
    println!(
        "vision features per tile: {:?}",
        emb.vision_features[0].shape
    );
    println!(
        "projector output per tile: {:?}",
        emb.projector_output[0].shape
    );
    println!("image rows in the prompt: {}", emb.num_tokens);
    let p = build_prompt(&vlm, &proc, &prompt, Some(&pre))?;
    println!(
        "prompt: {} ids, image tokens at {:?}",
        p.ids.len(),
        p.image_spans
    );
    let mut cache = be.new_cache(vlm.text.layers.len(), vlm.text.kv_dim(), p.ids.len())?;
    let logits = prefill(&be, &vlm, &p, Some(&emb.features), &mut cache)?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in order.iter().take(5) {
        println!(
            "  {:>6} {:>10.4}  {:?}",
            i,
            logits[i],
            proc.decode(&[i as u32])?
        );
    }
    Ok(())
}
