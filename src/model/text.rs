//! The decoder-only language model (`LlamaModel` / `Qwen2Model` + lm_head):
//! RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU MLP, tied
//! or untied output embeddings.

use super::Linear;
use crate::backend::{rope_inv_freq, AttnShape, Backend, Rope};
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::weights::Prefixed;

pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: B::Tensor,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub post_attention_layernorm: B::Tensor,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

pub struct TextModel<B: Backend> {
    pub cfg: TextConfig,
    pub embed_tokens: B::Weight,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: B::Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<B::Weight>,
    pub rope: Rope,
}

impl<B: Backend> TextModel<B> {
    /// `base` is the decoder prefix (`language_model.model` or
    /// `model.language_model`), `head` the lm_head prefix.
    pub fn load(be: &B, base: &Prefixed, head: &Prefixed, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let im = cfg.intermediate_size;
        let embed = base
            .pp("embed_tokens")
            .get("weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = base.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(DecoderLayer {
                input_layernorm: be.upload(&l.pp("input_layernorm").get("weight", &[h])?)?,
                q: Linear::load(be, &a.pp("q_proj"), q_dim, h, cfg.qkv_bias)?,
                k: Linear::load(be, &a.pp("k_proj"), kv_dim, h, cfg.qkv_bias)?,
                v: Linear::load(be, &a.pp("v_proj"), kv_dim, h, cfg.qkv_bias)?,
                o: Linear::load(be, &a.pp("o_proj"), h, q_dim, cfg.o_bias)?,
                post_attention_layernorm: be
                    .upload(&l.pp("post_attention_layernorm").get("weight", &[h])?)?,
                gate: Linear::load(be, &m.pp("gate_proj"), im, h, cfg.mlp_bias)?,
                up: Linear::load(be, &m.pp("up_proj"), im, h, cfg.mlp_bias)?,
                down: Linear::load(be, &m.pp("down_proj"), h, im, cfg.mlp_bias)?,
            });
        }
        let norm = be.upload(&base.pp("norm").get("weight", &[h])?)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else if head.contains("weight") {
            Some(be.weight(&head.get("weight", &[cfg.vocab_size, h])?)?)
        } else {
            return Err(Error::MissingTensor {
                name: head.name("weight"),
                path: base.files.location(),
            });
        };
        Ok(TextModel {
            cfg: cfg.clone(),
            embed_tokens: be.weight(&embed)?,
            layers,
            norm,
            lm_head,
            rope: rope_inv_freq(cfg),
        })
    }

    pub fn attn_shape(&self) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: (c.head_dim as f32).powf(-0.5),
        }
    }

    pub fn kv_dim(&self) -> usize {
        self.cfg.num_key_value_heads * self.cfg.head_dim
    }

    pub fn embed(&self, be: &B, ids: &[u32]) -> Result<B::Tensor> {
        be.embedding(&self.embed_tokens, ids)
    }

    /// One decoder layer on `x` `[n, hidden]` at positions `pos0..pos0+n`.
    pub fn layer_forward(
        &self,
        be: &B,
        i: usize,
        x: &B::Tensor,
        cache: &mut B::Cache,
        pos0: usize,
    ) -> Result<B::Tensor> {
        let l = &self.layers[i];
        let c = &self.cfg;
        let h = be.rms_norm(x, &l.input_layernorm, c.rms_norm_eps)?;
        let q = be.rope(
            &l.q.forward(be, &h)?,
            c.num_attention_heads,
            &self.rope,
            pos0,
        )?;
        let k = be.rope(
            &l.k.forward(be, &h)?,
            c.num_key_value_heads,
            &self.rope,
            pos0,
        )?;
        let v = l.v.forward(be, &h)?;
        let a = be.attention_cached(&q, &k, &v, cache, i, pos0, self.attn_shape())?;
        let x = be.add(x, &l.o.forward(be, &a)?)?;
        let h = be.rms_norm(&x, &l.post_attention_layernorm, c.rms_norm_eps)?;
        let g = be.gated(
            &l.gate.forward(be, &h)?,
            &l.up.forward(be, &h)?,
            c.hidden_act,
        )?;
        be.add(&x, &l.down.forward(be, &g)?)
    }

    /// Runs every layer on the embeddings `[n, hidden]` at `pos0..pos0+n`,
    /// filling the cache, and returns the logits of the last position
    /// `[1, vocab]`.
    pub fn forward(
        &self,
        be: &B,
        x: B::Tensor,
        cache: &mut B::Cache,
        pos0: usize,
    ) -> Result<B::Tensor> {
        let mut x = x;
        for i in 0..self.layers.len() {
            x = self.layer_forward(be, i, &x, cache, pos0)?;
        }
        let (n, _) = be.dims(&x);
        let last = be.rows(&x, n - 1, 1)?;
        let last = be.rms_norm(&last, &self.norm, self.cfg.rms_norm_eps)?;
        be.linear(
            &last,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None,
        )
    }
}
