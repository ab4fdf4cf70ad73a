//! The decoder-only language model (`LlamaModel` / `Qwen2Model` + lm_head):
//! token embeddings, the decoder layers ([`super::decoder`]), the final
//! RMSNorm and the output projection (tied or untied), each written once.

use super::decoder::{DecoderSpec, Kv, KvBatch, Layer, NoTap, RopePos, SeqKv};
use crate::backend::{AttnShape, Backend, Rope};
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::weights::Prefixed;

pub struct TextModel<B: Backend> {
    pub cfg: TextConfig,
    pub spec: DecoderSpec,
    pub embed_tokens: B::Weight,
    pub layers: Vec<Layer<B>>,
    pub norm: B::Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<B::Weight>,
}

impl<B: Backend> TextModel<B> {
    /// `base` is the decoder prefix (`language_model.model` or
    /// `model.language_model`), `head` the lm_head prefix.
    pub fn load(be: &B, base: &Prefixed, head: &Prefixed, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed = base
            .pp("embed_tokens")
            .stored("weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(Layer::load_on(be, &base.pp(format!("layers.{i}")), cfg)?);
        }
        let norm = be.upload(&base.pp("norm").get("weight", &[h])?)?;
        let lm_head = Self::load_lm_head(be, base, head, cfg)?;
        Ok(TextModel {
            cfg: cfg.clone(),
            spec: DecoderSpec::new(cfg),
            embed_tokens: be.stored_weight(&embed)?,
            layers,
            norm,
            lm_head,
        })
    }

    /// The untied output projection, `None` when tied to the embeddings.
    fn load_lm_head(
        be: &B,
        base: &Prefixed,
        head: &Prefixed,
        cfg: &TextConfig,
    ) -> Result<Option<B::Weight>> {
        if cfg.tie_word_embeddings {
            Ok(None)
        } else if head.contains("weight") {
            Ok(Some(be.stored_weight(
                &head.stored("weight", &[cfg.vocab_size, cfg.hidden_size])?,
            )?))
        } else {
            Err(Error::MissingTensor {
                name: head.name("weight"),
                path: base.files.location(),
            })
        }
    }

    pub fn rope(&self) -> &Rope {
        &self.spec.rope
    }

    pub fn attn_shape(&self) -> AttnShape {
        self.spec.attn
    }

    pub fn kv_dim(&self) -> usize {
        self.spec.kv_dim()
    }

    pub fn embed(&self, be: &B, ids: &[u32]) -> Result<B::Tensor> {
        be.embedding(&self.embed_tokens, ids)
    }

    /// The output projection's weight `[vocab, hidden]` (the embeddings when tied).
    pub fn lm_head_weight(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final norm and lm_head: hidden states `[n, hidden]` -> logits `[n, vocab]`.
    pub fn logits(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let z = be.rms_norm(x, &self.norm, self.spec.eps)?;
        be.linear(&z, self.lm_head_weight(), None)
    }

    /// One decoder layer on `x` `[n, hidden]` at positions `pos0..pos0+n`.
    pub fn layer_forward(
        &self,
        be: &B,
        i: usize,
        x: &B::Tensor,
        cache: &mut B::Cache,
        pos0: usize,
        rope: RopePos<'_>,
    ) -> Result<B::Tensor> {
        let kv = Kv {
            cache,
            layer: i,
            pos0,
            rope,
        };
        self.layers[i].forward(&self.spec, be, x, kv, &mut NoTap)
    }

    /// Every layer on `x` `[n, hidden]` at cache rows `pos0..pos0+n`
    /// (RoPE positions from `rope`), filling the cache: the last layer's
    /// hidden states `[n, hidden]`.
    pub fn hidden_at(
        &self,
        be: &B,
        x: B::Tensor,
        cache: &mut B::Cache,
        pos0: usize,
        rope: RopePos<'_>,
    ) -> Result<B::Tensor> {
        let mut x = x;
        for i in 0..self.layers.len() {
            x = self.layer_forward(be, i, &x, cache, pos0, rope)?;
        }
        Ok(x)
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
        self.forward_at(be, x, cache, pos0, RopePos::Sequential)
    }

    /// [`Self::forward`] with the sequence's RoPE positions (M-RoPE).
    pub fn forward_at(
        &self,
        be: &B,
        x: B::Tensor,
        cache: &mut B::Cache,
        pos0: usize,
        rope: RopePos<'_>,
    ) -> Result<B::Tensor> {
        let x = self.hidden_at(be, x, cache, pos0, rope)?;
        let (n, _) = be.dims(&x);
        self.logits(be, &be.rows(&x, n - 1, 1)?)
    }

    /// One step of several sequences together (the server's batch): `x` is
    /// their embeddings one after the other (`seqs[i].rows` rows each, at
    /// positions `seqs[i].pos0..` of `seqs[i].cache`); fills each cache and
    /// returns the logits of each sequence's last row, `[seqs.len(), vocab]`.
    pub fn forward_batch(
        &self,
        be: &B,
        x: B::Tensor,
        seqs: &mut [SeqKv<'_, B>],
    ) -> Result<B::Tensor> {
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = KvBatch {
                seqs: &mut *seqs,
                layer: i,
            };
            x = layer.forward(&self.spec, be, &x, kv, &mut NoTap)?;
        }
        let mut last = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for seq in seqs.iter() {
            at += seq.rows;
            last.push(be.rows(&x, at - 1, 1)?);
        }
        self.logits(be, &be.concat_all(last)?)
    }
}
