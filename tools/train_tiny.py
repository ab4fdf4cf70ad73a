#!/usr/bin/env python3
"""Trains mbq's bundled small VLM (models/tiny-shapes) on the synthetic shapes task of `mbq shapes`.

Run from the repository root (CPU, one thread; the venv pinned by tools/requirements.txt, e.g. /opt/fixenv).
The committed models/tiny-shapes is exactly this one command, from scratch:

    /opt/fixenv/bin/python tools/train_tiny.py --steps 4800 --batch 48 --turns 1 --text-layers 4 --vision-layers 3 \
        --vision-intermediate 512 --attn-sup 1 --attn-layer 1 --copy-sup 1 --caption-sup 1 --aux-pos 2 \
        --rel-sup 1 --rel-layer 3 --type-weights exists=2,relation=3,color=2,count=0.5,caption=1.5 --ckpt-every 1200 \
        --eval-limit 0 --out models/tiny-shapes

Measured: 55.0 min wall (54.0 min of training, 4800 steps at 0.675 s/step) on this project's 2-core x86 machine
with the other core busy (a second training for 40 min, then cargo builds), torch 2.9.1 / transformers 4.57.6, one
thread (the committed files came from `--out /tmp/tF`, then copied; --out does not change the weights). Alone on
the machine, `--measure 200` with the same options runs at 0.584 s/step: about 47 min for the 4800 steps. Held-out
`mbq eval --backend cpu` on `mbq shapes --seed 1000 --count 100` (512 questions): 0.980 (caption 0.92, color 1.0,
count 0.98, exists 1.0, relation 1.0, shape 1.0); see the README for the 1034-question set.
What made relations work (they were at chance in every earlier model): --rel-sup, a training-only linear head at the
last prompt position after decoder layer 2 that predicts which of the two named shapes comes first on the asked axis
(the label is exact: it follows from the relation word and the answer). Its loss stayed near 0.69 for ~1000 steps,
reached 0.1 at step 2900 and 0.01 by 3300; held-out relations (246 questions of `--seed 7 --count 600`) went 0.45
(step 2400) -> 0.89 (3600). With --aux-pos 2 (row and column as numbers, a linear coordinate) but without --rel-sup,
the same run had relations at 0.54 at step 3600 (stopped). Whether --aux-pos 1 (classes) with --rel-sup works as well
was not tried.
Tried and left out before that (same machine, held-out 512 questions): the previous committed model (this command
with --aux-pos 1 and no --rel-sup) 0.943, relations 0.46; without --caption-sup and the relation-word copy head,
4200 steps: 0.934; plus a training-only probe making the residual stream after --attn-layer hold the looked-up
shape's row and column: half the accuracy at 2400 steps, stopped; the same probe at the last prompt position as a
1000-step fine-tune: 0.910, relations unchanged; --rel-sup as a 600-step fine-tune of the previous model: relations
0.51-0.54 (too short: from scratch it took ~3000 steps).
Each training sequence is one image and one question (--turns 1): with several questions per sequence, later
questions can copy from earlier answers (the caption names every shape), which single-turn eval never allows.

1. Builds `mbq` (cargo, release) and calls `mbq shapes --seed 1 --count 60000` for the training set (~40 s),
   `--seed 1000 --count 100` for the held-out check and `--seed 7 --count 100` for the checkpoint evals (seed 2000
   is reserved for calibration; never train on 1000 or 2000). Images are kept as uint8 and normalized per batch
   exactly as SiglipImageProcessor does at 64x64 (checked against it at start-up).
2. Trains a ByteLevel BPE tokenizer (Qwen2 pre-tokenizer) on the task's text, with <|endoftext|>, <|im_start|>,
   <|im_end|> and <image>; the chat template is chatml (as tests/fixtures/make_fixtures.py's llava_qwen).
3. Trains LlavaForConditionalGeneration: SigLIP vision tower (64x64, patch 8 -> 64 image tokens, layer -1,
   "full"; hidden 128, --vision-layers, MLP --vision-intermediate) + 2-layer GELU projector + untied Qwen2
   (hidden 128, intermediate 384: every decoder linear's input is a multiple of 128, so W3/W4 g128 applies). Each
   training sequence is one image and one of its questions (--turns 1; more turns make a multi-turn chat with the
   image in the first user turn, as the chat template puts it); the loss is on the answer tokens and their
   <|im_end|> only. Plus an auxiliary loss (--aux, weight 1) of a linear head on the projector's output that
   predicts, for every image token, the colour and the kind of the shape covering its 8x8 patch (labels from the
   pixels' distance to the generator's base colours and the caption's colour -> kind; see `patch_labels`). The
   head is training-only and not saved; without it the vision tower does not learn to tell the kinds apart within
   an hour (1000-step pilots: held-out shape accuracy 0.20 without it, 0.54 with it). --aux-pos adds each image
   token's row and column to that head (relations and caption order need positions; --aux-pos 2 as two numbers, so
   that attention over a shape's tokens averages them to its centre).
   With --attn-sup (weight 1), attention supervision, training-only like the aux head: the answer loss alone never
   taught the decoder to look a shape up by its kind (4200 steps: "Is there a square?" and the relations stayed
   at chance, "What color is the square?" at 0.69; fine-tuning with more of those questions did not move them).
   So the decoder's attention probabilities (eager attention) get targets, each loss -log(attention mass on the
   target): at a kind (colour) named in the question, head 0 (2) of layer --attn-layer attends to that kind's
   (colour's) image tokens (patch labels as above); at the last prompt position, heads 0 and 1 of the next layer
   attend to the first and second named kind/colour and head 2 to the relation word (--copy-sup); in a caption,
   at each shape phrase's article, head 3 of the next layer attends to that shape's image tokens (--caption-sup).
   With --rel-sup, for relation questions, a linear head on the last prompt position after layer --rel-layer - 1
   predicts whether the first named shape is left of (x output) or above (y output) the second, on the asked axis
   only; without it the relations stayed at chance in every run.
   --type-weights samples each image's question by type (more of the hard ones). AdamW, warmup + cosine decay
   to 2% of the LR, fixed seeds.
4. Saves with save_pretrained: f16 weights, processor (SiglipImageProcessor 64x64, tokenizer, chat template in
   chat_template.json) and generation_config (eos <|im_end|>), then reports `mbq eval --backend cpu` on the 100
   held-out images (and greedy exact match with transformers on --eval-limit of them).

`--measure N` only times N training steps and prints the extrapolation (to size --steps to a time budget). Use one
thread (--threads 1, the default): with the machine's other core busy, two threads were 5x slower per step.
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SEED, EVAL_SEED, VAL_SEED = 1, 1000, 7  # 2000: calibration (not used here)
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
    """The Rust generator, built once (release). An existing `out` is reused: name it by seed and count (a stale
    folder from an older generator would silently change the data)."""
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
                                num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                                intermediate_size=args.vision_intermediate or 2 * args.vision_hidden,
                                vision_use_head=False)
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
    """uint8 (N, 3, 64, 64); `normalize` turns a batch into the processor's pixel_values (checked in main)."""
    import numpy as np
    from PIL import Image

    out = torch.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for i, p in enumerate(images):
        with Image.open(Path(folder) / p) as im:
            a = np.array(im.convert("RGB"), dtype=np.uint8)
        assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), a.shape
        out[i] = torch.from_numpy(a).permute(2, 0, 1)
    return out


def normalize(u8):
    """SiglipImageProcessor at 64x64 input (no resize): x / 255, mean 0.5, std 0.5."""
    return (u8.float() * (1 / 255) - 0.5) / 0.5


def check_pixels(processor, folder, images, u8):
    from PIL import Image

    imgs = [Image.open(Path(folder) / p).convert("RGB") for p in images]
    ref = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    err = (ref - normalize(u8)).abs().max().item()
    assert err < 1e-5, f"pixel preprocessing differs from the processor's: {err}"


# ------------------------------------------------------------------------------------------- patch labels
# The generator's colours (src/shapes.rs: each shape is its base RGB jittered by at most 12 per channel) and kinds.
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (230, 200, 20),
           "purple": (135, 55, 175), "orange": (245, 125, 25)}
KINDS = ["circle", "square", "triangle", "cross", "star"]
RELATIONS = ["left of", "right of", "above", "below"]


def patch_labels(pix, items):
    """Per image token (8x8 patch): the colour class (0 background, 1..6) of the shape covering most of it (at
    least 6 of its pixels within RGB distance 40 of a base colour), and that shape's kind (0 background, 1..5;
    -100 where the colour is on shapes of different kinds). Colour -> kind comes from the image's caption. Training
    signal for an auxiliary linear head on the projector's output (not saved): it teaches the vision tower what
    the answers need, much faster than the answer loss alone."""
    import re

    names = list(COLOURS)
    base = torch.tensor([COLOURS[c] for c in names], dtype=torch.float32)  # (6, 3)
    g = IMAGE_SIZE // PATCH
    col = torch.empty((len(items), g * g), dtype=torch.long)
    kind = torch.empty((len(items), g * g), dtype=torch.long)
    pat = re.compile(r"\b(" + "|".join(names) + r") (" + "|".join(KINDS) + r")\b")
    for lo in range(0, len(items), 1000):
        x = pix[lo:lo + 1000].float().permute(0, 2, 3, 1)  # (n, 64, 64, 3)
        d = ((x[..., None, :] - base) ** 2).sum(-1)  # (n, 64, 64, 6)
        dmin, cls = d.min(-1)
        cls = torch.where(dmin < 40 ** 2, cls + 1, torch.zeros_like(cls))
        onehot = torch.nn.functional.one_hot(cls, 7)[..., 1:]  # (n, 64, 64, 6)
        n = x.shape[0]
        cnt = onehot.reshape(n, g, PATCH, g, PATCH, 6).sum((2, 4)).reshape(n, g * g, 6)
        m, c = cnt.max(-1)
        col[lo:lo + n] = torch.where(m >= 6, c + 1, torch.zeros_like(c))
    for i, (_, qas) in enumerate(items):
        cap = [a for _, a, t in qas if t == "caption"][0].lower()
        kinds = {}
        for c, k in pat.findall(cap):
            kinds.setdefault(names.index(c) + 1, set()).add(KINDS.index(k) + 1)
        lut = torch.full((7,), -100, dtype=torch.long)
        lut[0] = 0
        for c, ks in kinds.items():
            if len(ks) == 1:
                lut[c] = next(iter(ks))
        kind[i] = lut[col[i]]
    return col, kind


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

    def lookups(self, question):
        """Where the single-turn prompt names a shape kind, a colour or a relation: [(position in the expanded
        prompt, "kind" | "colour" | "relation", label)] at the word's last token ("left" of "left of"; labels as
        `patch_labels`: kinds 1..5, colours 1..6; relations 0). Targets of the attention supervision (--attn-sup)."""
        import re

        head = "<|im_start|>user\n<image>\n"
        text = head + question + "<|im_end|>\n<|im_start|>assistant\n"
        e = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = e["input_ids"], e["offset_mapping"]
        assert ids == self.enc(text)
        at = ids.index(self.image_id)
        out = []
        for m in re.finditer(r"\b(" + "|".join(KINDS + list(COLOURS) + RELATIONS) + r")\b", question):
            w = m.group(1)
            end = len(head) + m.start(1) + len(w.split()[0])  # 'left' of 'left of'
            j = max(i for i, (a, _) in enumerate(offs) if a < end)
            pos = j + N_IMAGE_TOKENS - 1 if j > at else j
            if w in RELATIONS:
                out.append((pos, "relation", 0))
            else:
                out.append((pos, "kind", KINDS.index(w) + 1) if w in KINDS else (pos, "colour", list(COLOURS).index(w) + 1))
        return out

    def caption_lookups(self, caption):
        """Per shape phrase of a caption ('a red circle'): (index of its article token among the answer's tokens,
        colour label, kind label); phrases that occur twice are left out (their shape is ambiguous)."""
        import re

        text = caption + "<|im_end|>"
        e = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert e["input_ids"] == self.answer(caption)[0]
        offs = e["offset_mapping"]
        pat = r"\b([Aa]n?) (" + "|".join(COLOURS) + r") (" + "|".join(KINDS) + r")\b"
        found = [(m.end(1), m.group(2), m.group(3)) for m in re.finditer(pat, caption)]
        out = []
        for end, c, k in found:
            if sum(1 for _, c2, k2 in found if (c2, k2) == (c, k)) > 1:
                continue
            j = max(i for i, (a, _) in enumerate(offs) if a < end)
            out.append((j, list(COLOURS).index(c) + 1, KINDS.index(k) + 1))
        return out

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
def mbq_eval(model_dir, data_dir):
    """`mbq eval` (the Rust runtime, CPU backend) of a saved model: its JSON summary."""
    exe = ROOT / "target" / "release" / "mbq"
    r = subprocess.run([str(exe), "eval", "--model", str(model_dir), "--data", str(Path(data_dir) / "questions.jsonl"),
                        "--backend", "cpu", "--json"], cwd=ROOT, check=True, capture_output=True, text=True)
    j = json.loads(r.stdout)
    per = {k: round(v["accuracy"], 3) for k, v in sorted(j["per_type"].items())}
    return j["accuracy"], per


def save(model, processor, tok, out_dir):
    from transformers import GenerationConfig

    tc = model.config.text_config
    model.generation_config = GenerationConfig(bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = copy.deepcopy(model).half()
    half.save_pretrained(tmp)
    processor.save_pretrained(tmp, save_jinja_files=False)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return sum(f.stat().st_size for f in out_dir.iterdir())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "models" / "tiny-shapes"))
    ap.add_argument("--data", default="/tmp/mbq_shapes_s1_60k", help="where `mbq shapes --seed 1` writes")
    ap.add_argument("--count", type=int, default=60000)
    ap.add_argument("--eval-data", default="/tmp/mbq_shapes_s1000_100", help="`mbq shapes --seed 1000 --count 100`")
    ap.add_argument("--val-data", default="/tmp/mbq_shapes_s7_100", help="`mbq shapes --seed 7 --count 100` (checkpoints)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=0.02, help="final LR as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--vision-intermediate", type=int, default=0, help="default 2 x --vision-hidden")
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--turns", type=int, default=1, help="at most this many questions per training sequence")
    ap.add_argument("--type-weights", default="", help="e.g. exists=4,relation=4: sampling weight of a question "
                    "type when --turns 1 picks an image's question (default 1 each)")
    ap.add_argument("--attn-sup", type=float, default=0.0, help="weight of the attention supervision: one head "
                    "of --attn-layer, at a named kind (colour), attends to the image tokens of that kind (colour)")
    ap.add_argument("--attn-layer", type=int, default=1)
    ap.add_argument("--caption-sup", type=int, default=0, help="with --attn-sup: caption shape phrases attend to their shape")
    ap.add_argument("--copy-sup", type=int, default=1, help="with --attn-sup: also the copy heads of the next layer")
    ap.add_argument("--rel-sup", type=float, default=0.0, help="weight of a training-only linear head at the last "
                    "prompt position of relation questions, after decoder layer --rel-layer, that predicts whether the "
                    "first named shape comes first (left, top) on the asked axis (x and y outputs)")
    ap.add_argument("--rel-layer", type=int, default=3, help="hidden_states index the --rel-sup head reads")
    ap.add_argument("--aux-pos", type=int, default=0, help="the aux head also predicts each image token's row and "
                    "column: 1 as classes, 2 as two numbers (MSE; a linear coordinate, so that attention over a "
                    "shape's tokens averages it to the shape's centre and two centres compare linearly)")
    ap.add_argument("--aux-pos-weight", type=float, default=4.0, help="weight of the --aux-pos 2 MSE")
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the per-image-token colour/kind loss")
    ap.add_argument("--eval-limit", type=int, default=100, help="held-out questions for the transformers check")
    ap.add_argument("--ckpt-every", type=int, default=0, help="save + `mbq eval` on the seed-7 set every N steps")
    ap.add_argument("--init", default=None, help="continue from this saved model directory (its tokenizer too)")
    ap.add_argument("--measure", type=int, default=0, help="time this many steps, extrapolate, exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    train_dir = mbq_shapes(TRAIN_SEED, args.count, args.data)
    eval_dir = mbq_shapes(EVAL_SEED, 100, args.eval_data)
    val_dir = mbq_shapes(VAL_SEED, 100, args.val_data)
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
    check_pixels(processor, train_dir, [p for p, _ in items[:16]], pix[:16])
    log(f"data: {len(items)} train images, {sum(len(q) for _, q in items)} questions; pixels {tuple(pix.shape)} "
        f"({(time.time() - t_start) / 60:.1f} min)")

    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, torch_dtype=torch.float32)
    else:
        model = build_model(tok, args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters")
    # auxiliary per-image-token head on the projector's output (colour 7 + kind 6 classes); not saved
    pcol, pkind = patch_labels(pix, items)
    log(f"patch labels: {(pcol > 0).float().mean():.3f} of tokens on a shape, "
        f"{(pkind == -100).float().mean():.4f} without a kind")
    grid = IMAGE_SIZE // PATCH
    n_pos = {0: 0, 1: 2 * grid, 2: 2}[args.aux_pos]
    head = torch.nn.Linear(model.config.text_config.hidden_size, 7 + 6 + n_pos)
    prow = torch.arange(N_IMAGE_TOKENS) // grid  # the patch's row and column (--aux-pos: relations need them)
    pcolumn = torch.arange(N_IMAGE_TOKENS) % grid
    feats = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    rel_head = torch.nn.Linear(model.config.text_config.hidden_size, 2)  # --rel-sup: x and y order; not saved
    params = (list(model.named_parameters()) + [("aux_head." + n, p) for n, p in head.named_parameters()]
              + ([("rel_head." + n, p) for n, p in rel_head.named_parameters()] if args.rel_sup > 0 else []))
    decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    steps = args.measure or args.steps

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        p = (s - args.warmup) / max(1, steps - args.warmup)
        m = args.min_lr
        return args.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    tw = {k: float(v) for k, v in (kv.split("=") for kv in args.type_weights.split(",") if kv)}
    if args.attn_sup > 0:
        assert args.turns == 1, "--attn-sup needs --turns 1"
        model.set_attn_implementation("eager")
    img_at = enc.user_prefix("x", True).index(enc.image_id)
    sup_ema = None
    rel_ema = None
    rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    ema = None
    aux_ema = 0.0
    for step in range(steps):
        if len(order) < args.batch:
            perm = list(range(len(items)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:args.batch], order[args.batch:]
        batch = []
        for i in idx:
            qas = list(items[i][1])
            if args.turns == 1 and tw:
                batch.append(rng.choices(qas, weights=[tw.get(t, 1.0) for _, _, t in qas])[:1])
                continue
            rng.shuffle(qas)
            k = rng.randint(1, min(len(qas), args.turns))
            batch.append(qas[:k])
        ids, labels, mask = make_batch(enc, batch, tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=normalize(pix[idx]), labels=labels,
                    output_attentions=args.attn_sup > 0, output_hidden_states=args.rel_sup > 0)
        loss = out.loss
        if args.rel_sup > 0:
            # the order of the two named shapes on the asked axis, known exactly from the relation and the answer
            rb, ra, ry = [], [], []
            for b, qas in enumerate(batch):
                q, a, t = qas[0]
                if t != "relation":
                    continue
                rel = next(r for r in RELATIONS if f" {r} " in q)
                first = (rel in ("left of", "above")) == (a == "yes")
                rb.append(b), ra.append(0 if rel in ("left of", "right of") else 1), ry.append(float(first))
            if rb:
                last = torch.tensor([len(enc.user_prefix(batch[b][0][0], True)) - 1 for b in rb])
                h = out.hidden_states[args.rel_layer][torch.tensor(rb), last]
                logit = rel_head(h).gather(1, torch.tensor(ra)[:, None])[:, 0]
                rl = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor(ry))
                loss = loss + args.rel_sup * rl
                rel_ema = rl.item() if rel_ema is None else 0.95 * rel_ema + 0.05 * rl.item()
        if args.attn_sup > 0:
            # retrieval: at a named kind (colour), head 0 (2) of --attn-layer attends to that kind's (colour's)
            # image tokens; copy: at the last prompt position, head j of the next layer attends to the j-th named
            # kind/colour and head 2 to the relation word; captions: at each shape phrase's article, head 3 of the
            # next layer attends to that shape's image tokens
            rb, rp, rh, rm = [], [], [], []
            cb, cp, ch, ct = [], [], [], []
            for b, (i, qas) in enumerate(zip(idx, batch)):
                q, a, t = qas[0]
                looks = enc.lookups(q)
                named = [x for x in looks if x[1] != "relation"]
                for pos, what, lab in named:
                    m = (pkind[i] if what == "kind" else pcol[i]) == lab
                    if m.any():
                        rb.append((args.attn_layer, b, 0 if what == "kind" else 2, pos)), rm.append(m)
                last = len(enc.user_prefix(q, True)) - 1
                if args.copy_sup:
                    for j, (pos, _, _) in enumerate(named[:2]):
                        cb.append(b), cp.append(last), ch.append(j), ct.append(pos)
                    for pos, what, _ in looks:
                        if what == "relation":
                            cb.append(b), cp.append(last), ch.append(2), ct.append(pos)
                if args.caption_sup and t == "caption":
                    for j, c, k in enc.caption_lookups(a):
                        m = (pcol[i] == c) & (pkind[i] == k)
                        if m.any():
                            rb.append((args.attn_layer + 1, b, 3, last + 1 + j)), rm.append(m)
            sup = torch.zeros(())
            if rb:
                att = torch.stack([out.attentions[l][b, h, p, img_at:img_at + N_IMAGE_TOKENS] for l, b, h, p in rb])
                sup = sup - (att * torch.stack(rm)).sum(-1).clamp_min(1e-6).log().mean()
            if cb:
                att = out.attentions[args.attn_layer + 1][torch.tensor(cb), torch.tensor(ch), torch.tensor(cp)]
                sup = sup - att.gather(1, torch.tensor(ct)[:, None]).clamp_min(1e-6).log().mean()
            if rb or cb:
                loss = loss + args.attn_sup * sup
                sup_ema = sup.item() if sup_ema is None else 0.95 * sup_ema + 0.05 * sup.item()
        if args.aux > 0:
            logits = head(feats["x"])  # (B, 64, 13)
            aux = (torch.nn.functional.cross_entropy(logits[..., :7].reshape(-1, 7), pcol[idx].reshape(-1))
                   + torch.nn.functional.cross_entropy(logits[..., 7:13].reshape(-1, 6), pkind[idx].reshape(-1),
                                                       ignore_index=-100))
            if args.aux_pos == 2:
                b = len(idx)
                target = torch.stack([prow, pcolumn], -1).float() / (grid - 1) * 2 - 1  # (64, 2) in [-1, 1]
                aux = aux + args.aux_pos_weight * torch.nn.functional.mse_loss(logits[..., 13:], target.expand(b, -1, -1))
            elif args.aux_pos:
                b = len(idx)
                aux = aux + (torch.nn.functional.cross_entropy(logits[..., 13:13 + grid].reshape(-1, grid),
                                                               prow.repeat(b))
                             + torch.nn.functional.cross_entropy(logits[..., 13 + grid:].reshape(-1, grid),
                                                                 pcolumn.repeat(b)))
            loss = loss + args.aux * aux
            aux_ema = aux.item() if step == 0 else 0.95 * aux_ema + 0.05 * aux.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"step {step}/{steps} loss {out.loss.item():.4f} ema {ema:.4f} aux {aux_ema:.4f} sup {sup_ema or 0:.4f} rel {rel_ema or 0:.4f} lr {lr_at(step):.2e} "
                f"{el / (step + 1):.3f} s/step, {el / 60:.1f} min")
        if args.ckpt_every and step > 0 and step % args.ckpt_every == 0 and not args.measure:
            ck = Path(tempfile.gettempdir()) / (Path(args.out).name + ".ckpt")
            save(model, processor, tok, ck)
            acc, per = mbq_eval(ck, val_dir)
            log(f"  step {step}: mbq eval (seed {VAL_SEED}): acc {acc:.3f} {per}")
    if args.measure:
        per_step = (time.time() - t0) / steps
        log(f"measure: {per_step:.3f} s/step -> 1000 steps = {per_step * 1000 / 60:.1f} min")
        return

    train_min = (time.time() - t0) / 60
    size = save(model, processor, tok, args.out)
    log(f"saved {args.out} ({size / 1e6:.2f} MB); training {train_min:.1f} min, total {(time.time() - t_start) / 60:.1f} min")
    acc, per = mbq_eval(args.out, eval_dir)
    log(f"held-out (seed {EVAL_SEED}) mbq eval --backend cpu: accuracy {acc:.4f} per type {per}")
    if args.eval_limit:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.out, torch_dtype=torch.float32)
        acc, per = greedy_eval(model, enc, normalize(eval_pix), eval_items, args.eval_limit)
        log(f"held-out (seed {EVAL_SEED}, {args.eval_limit} q, f16 weights, transformers): short-answer acc {acc:.4f} "
            f"per type {per}")
    log(f"total {((time.time() - t_start) / 60):.1f} min")


if __name__ == "__main__":
    sys.exit(main())
