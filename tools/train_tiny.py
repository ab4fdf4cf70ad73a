#!/usr/bin/env python3
"""Trains mbq's bundled small VLM (models/tiny-shapes) on the synthetic shapes task of `mbq shapes`.

Run from the repository root (CPU, one thread; the venv pinned by tools/requirements.txt, e.g. /opt/fixenv):

    /opt/fixenv/bin/python tools/train_tiny.py --steps 1200 --out models/tiny-shapes

1. Builds `mbq` (cargo, release) and calls `mbq shapes --seed 1 --count 4000` for the training set and
   `--seed 1000` for a held-out check (seed 2000 is reserved for calibration; never train on 1000 or 2000).
2. Trains a ByteLevel BPE tokenizer (Qwen2 pre-tokenizer) on the task's text, with <|endoftext|>, <|im_start|>,
   <|im_end|> and <image>; the chat template is chatml (as tests/fixtures/make_fixtures.py's llava_qwen).
3. Trains LlavaForConditionalGeneration: SigLIP vision tower (64x64, patch 8 -> 64 image tokens, layer -1,
   "full") + 2-layer GELU projector + untied Qwen2 (hidden 128, intermediate 384: every decoder linear's input is a
   multiple of 128, so W3/W4 g128 applies). Each training sequence is one image with a random number of its
   questions in random order as a multi-turn chat (the image in the first user turn, as the chat template puts
   it); the loss is on the answer tokens and their <|im_end|> only. AdamW, warmup + cosine decay, fixed seeds.
4. Saves with save_pretrained: f16 weights, processor (SiglipImageProcessor 64x64, tokenizer, chat template in
   chat_template.json) and generation_config (eos <|im_end|>), then reports greedy exact match on held-out
   questions with transformers.

How the committed models/tiny-shapes was made (two stages, 2 busy CPU cores, one thread; ~40 min of training):

    # stage 1 (2000 steps, 23.9 min), with `mbq shapes` as of commit 49cbf83 (five kinds incl. star, half-extents
    # 6-11 px, "a orange" captions):
    python tools/train_tiny.py --steps 2000 --text-layers 4 --out /tmp/tiny-shapes-run1
    # stage 2 (1500 steps, 16.0 min), with the current generator (four kinds, half-extents 8-13 px):
    python tools/train_tiny.py --init /tmp/tiny-shapes-run1 --data /tmp/mbq_shapes_train3 \
        --eval-data /tmp/mbq_shapes_eval3 --steps 1500 --lr 1e-3 --warmup 30 --out models/tiny-shapes

`--measure N` only times N training steps and prints the extrapolation (to size --steps to a time budget).
"""
import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SEED, EVAL_SEED = 1, 1000  # 2000: calibration (not used here)
IMAGE_SIZE, PATCH = 64, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py (as make_fixtures.py)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------ data
def mbq_shapes(seed, count, out):
    """The Rust generator, built once (release)."""
    out = Path(out)
    if (out / "questions.jsonl").is_file():
        return out
    subprocess.run(["cargo", "build", "--release", "--bin", "mbq"], cwd=ROOT, check=True)
    exe = ROOT / "target" / "release" / "mbq"
    subprocess.run([str(exe), "shapes", "--seed", str(seed), "--count", str(count), "--out", str(out)],
                   cwd=ROOT, check=True)
    return out


def load_items(d):
    """image path -> [(question, answer, type)] in file order."""
    items = {}
    for line in open(Path(d) / "questions.jsonl"):
        r = json.loads(line)
        q = r["conversations"][0]["value"]
        assert q.startswith("<image>\n"), q
        items.setdefault(r["image"], []).append((q[len("<image>\n"):], r["answer"], r["type"]))
    return list(items.items())


# ------------------------------------------------------------------------------------------------- tokenizer
def make_tokenizer(items, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AddedToken, Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = ["user\nassistant\n", "system\nYou are a helpful assistant."]
    for _, qas in items:
        for q, a, _ in qas:
            lines += [q, a]
    tok.train_from_iterator(lines, trainer=trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    t = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", clean_up_tokenization_spaces=False, model_max_length=512,
                           errors="replace", split_special_tokens=False, padding_side="right")
    t.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    return t


def padded_vocab(tok, multiple=64):
    return int(math.ceil(len(tok) / multiple) * multiple)


# ----------------------------------------------------------------------------------------------------- model
def build_model(tok, args):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=args.vision_hidden,
                                num_hidden_layers=args.vision_layers, num_attention_heads=4,
                                intermediate_size=2 * args.vision_hidden, vision_use_head=False)
    text = Qwen2Config(vocab_size=padded_vocab(tok), hidden_size=128, num_hidden_layers=args.text_layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=args.intermediate,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       max_position_embeddings=512, use_sliding_window=False,
                       bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
                      image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return LlavaForConditionalGeneration(cfg)


def build_processor(tok):
    from transformers import LlavaProcessor, SiglipImageProcessor

    ip = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                              image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, image_token="<image>", chat_template=CHATML_TEMPLATE)


def pixel_values(processor, folder, images):
    from PIL import Image

    out = []
    for i in range(0, len(images), 256):
        imgs = [Image.open(Path(folder) / p).convert("RGB") for p in images[i:i + 256]]
        out.append(processor.image_processor(imgs, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


# -------------------------------------------------------------------------------------------------- sequences
class Encoder:
    """Token ids of chatml turns, matching the chat template + the processor's <image> expansion."""

    def __init__(self, tok):
        self.tok = tok
        self.cache = {}
        self.image_id = tok.convert_tokens_to_ids("<image>")

    def enc(self, s):
        if s not in self.cache:
            self.cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self.cache[s]

    def user_prefix(self, question, with_image):
        """'<|im_start|>user\n[<image>\n]Q<|im_end|>\n<|im_start|>assistant\n' (the generation prompt)."""
        if with_image:
            ids = self.enc("<|im_start|>user\n<image>\n" + question + "<|im_end|>\n<|im_start|>assistant\n")
            at = ids.index(self.image_id)
            return ids[:at] + [self.image_id] * N_IMAGE_TOKENS + ids[at + 1:]
        return self.enc("<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n")

    def answer(self, a):
        return self.enc(a + "<|im_end|>"), self.enc("\n")

    def conversation(self, qas):
        ids, labels = [], []
        for i, (q, a, _) in enumerate(qas):
            p = self.user_prefix(q, i == 0)
            ans, nl = self.answer(a)
            ids += p + ans + nl
            labels += [-100] * len(p) + ans + [-100] * len(nl)
        return ids, labels


def check_encoder(enc, processor, qas):
    """The hand-built ids equal the processor's for the single-turn prompt + answer."""
    q, a, _ = qas[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from PIL import Image

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    ref = processor(images=img, text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert ref == enc.user_prefix(q, True), "prompt ids differ from the processor's"
    full = enc.tok(text + a + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ans, nl = enc.answer(a)
    mine = enc.enc(text + "") + ans + nl
    assert full == mine, "answer tokenization is not context free"


def make_batch(enc, batch, pad_id):
    seqs = [enc.conversation(qas) for qas in batch]
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, l) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, labels, mask


# ------------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def greedy_eval(model, enc, pix, items, limit, max_new=24):
    """Greedy exact match (trimmed, lowercased) on single-turn questions, as `mbq eval` scores them."""
    model.eval()
    eos = enc.tok.convert_tokens_to_ids("<|im_end|>")
    per = {}
    n = 0
    for (img, qas), pv in zip(items, pix):
        for q, a, t in qas:
            if n >= limit:
                break
            ids = torch.tensor([enc.user_prefix(q, True)])
            out = model.generate(input_ids=ids, pixel_values=pv[None], max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos, pad_token_id=enc.tok.pad_token_id)
            text = enc.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            ok = text.strip().lower() == a.strip().lower()
            c = per.setdefault(t, [0, 0])
            c[0] += ok
            c[1] += 1
            n += 1
    model.train()
    short = [v for k, v in per.items() if k != "caption"]
    acc = sum(v[0] for v in short) / max(1, sum(v[1] for v in short))
    return acc, {k: (v[0] / v[1], v[1]) for k, v in sorted(per.items())}


# ------------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "models" / "tiny-shapes"))
    ap.add_argument("--data", default="/tmp/mbq_shapes_train", help="where `mbq shapes --seed 1` writes")
    ap.add_argument("--eval-data", default="/tmp/mbq_shapes_eval1000")
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--init", default=None, help="continue from this saved model directory (its tokenizer too)")
    ap.add_argument("--measure", type=int, default=0, help="time this many steps, extrapolate, exit")
    args = ap.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    train_dir = mbq_shapes(TRAIN_SEED, args.count, args.data)
    eval_dir = mbq_shapes(EVAL_SEED, 200, args.eval_data)
    items = load_items(train_dir)
    eval_items = load_items(eval_dir)
    if args.init:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.init)
    else:
        tok = make_tokenizer(items, args.vocab)
    processor = build_processor(tok)
    enc = Encoder(tok)
    check_encoder(enc, processor, items[0][1])
    log(f"tokenizer: {len(tok)} tokens (vocab padded to {padded_vocab(tok)})")

    pix = pixel_values(processor, train_dir, [p for p, _ in items])
    eval_pix = pixel_values(processor, eval_dir, [p for p, _ in eval_items])
    log(f"data: {len(items)} train images, {sum(len(q) for _, q in items)} questions; pixels {tuple(pix.shape)}")

    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, torch_dtype=torch.float32)
    else:
        model = build_model(tok, args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    steps = args.measure or args.steps

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        p = (s - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    ema = None
    for step in range(steps):
        if len(order) < args.batch:
            perm = list(range(len(items)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:args.batch], order[args.batch:]
        batch = []
        for i in idx:
            qas = list(items[i][1])
            rng.shuffle(qas)
            k = rng.randint(1, len(qas))
            batch.append(qas[:k])
        ids, labels, mask = make_batch(enc, batch, tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix[idx], labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
        if step % 20 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"step {step}/{steps} loss {out.loss.item():.4f} ema {ema:.4f} lr {lr_at(step):.2e} "
                f"{el / (step + 1):.2f} s/step, {el / 60:.1f} min")
        if step > 0 and step % 400 == 0 and not args.measure:
            acc, per = greedy_eval(model, enc, eval_pix, eval_items, 120)
            log(f"  held-out greedy (120 q): short-answer acc {acc:.3f} {per}")
    if args.measure:
        per_step = (time.time() - t0) / steps
        log(f"measure: {per_step:.2f} s/step -> 1000 steps = {per_step * 1000 / 60:.1f} min")
        return

    from transformers import GenerationConfig

    tc = model.config.text_config
    model.generation_config = GenerationConfig(bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    out_dir = Path(args.out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.half().save_pretrained(tmp)
    processor.save_pretrained(tmp, save_jinja_files=False)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    log(f"saved {out_dir} ({size / 1e6:.2f} MB); training {((time.time() - t0) / 60):.1f} min")

    model = model.float()
    acc, per = greedy_eval(model, enc, eval_pix, eval_items, args.eval_limit)
    log(f"held-out (seed {EVAL_SEED}, {args.eval_limit} q, f16 weights): short-answer acc {acc:.4f} per type {per}")
    log(f"total {((time.time() - t_start) / 60):.1f} min")


if __name__ == "__main__":
    sys.exit(main())
