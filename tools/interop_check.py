#!/usr/bin/env python3
"""End-to-end interop check (not CI: it needs PyTorch): mbq's exports load in transformers, and existing GPTQ / AWQ
checkpoints run in mbq, with the same greedy ids on both sides.

Run from the repository root, in the venv of tests/fixtures/requirements-interop.txt:

    cargo build --release
    /opt/interop/bin/python tools/interop_check.py [--backends cpu,wgpu] [--keep DIR]

Export (mbq -> transformers): models/tiny-shapes-w3 (MBQ W3 g128, bundled) is exported with `mbq export --format
gptq`; models/tiny-shapes is quantized with MBQ W4 g128 (`mbq quantize --method mbq`, 64 samples of `mbq shapes`) and
exported as gptq and as compressed-tensors. Each export is loaded with transformers (AutoModelForImageTextToText on
the CPU; optimum + gptqmodel for GPTQ, compressed-tensors for compressed-tensors) and its greedy ids for a set of
image questions are compared with `mbq-run` on the mbq model the export came from.

Import (transformers' checkpoints -> mbq): tests/fixtures/interop/llava_qwen128_{gptq_w4g128,gptq_w3g128,awq_w4g128}
(made by the formats' own packers) are loaded with transformers and run with `mbq-run` on each backend.

Prints one markdown table (docs/BENCHMARKS.md keeps the recorded run) and exits non-zero on any mismatch.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MBQ = ROOT / "target" / "release" / "mbq"
MBQ_RUN = ROOT / "target" / "release" / "mbq-run"
MAX_NEW = 12

SHAPES_EVAL = "tests/fixtures/shapes_eval"
N_QUESTIONS = 12  # the first held-out questions of `mbq shapes --seed 1000` (every kind: colour, shape, count, ...)
FIXTURE_QUESTIONS = [("tests/fixtures/images/odd2.png", "Describe this picture briefly.")]


def shapes_questions():
    out = []
    for line in (ROOT / SHAPES_EVAL / "questions.jsonl").read_text().splitlines()[:N_QUESTIONS]:
        q = json.loads(line)
        out.append((f"{SHAPES_EVAL}/{q['image']}", q["conversations"][0]["value"].replace("<image>\n", "")))
    return out


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r.stdout


def mbq_ids(model, image, prompt, backend, ignore_eos):
    args = [MBQ_RUN, "--model", model, "--image", ROOT / image, "--prompt", prompt, "--json",
            "--max-new-tokens", MAX_NEW, "--backend", backend, "--temperature", "0"]
    if ignore_eos:
        args.append("--ignore-eos")
    j = json.loads(sh(args).splitlines()[0])
    tokens = j["tokens"]
    if j["stop"] == "eos":
        tokens = tokens[:-1]  # compared without the end-of-sequence token on both sides
    return tokens, j["prompt_tokens"]


def load_hf(path, fmt):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = {"device_map": "cpu", "dtype": torch.float32}
    if fmt == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # Asymmetric pack-quantized only loads dequantized (transformers' compressed path rejects the zero
        # points), and the compressed W4A8 path has no CPU forward.
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kw)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} - {"Linear"})
    kinds = kinds or ["dequantized to Linear"]
    return model, AutoProcessor.from_pretrained(str(path)), kinds


def hf_ids(model, processor, image, prompt, ignore_eos):
    import torch
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.open(ROOT / image).convert("RGB"), text=text, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    kw = {"max_new_tokens": MAX_NEW, "do_sample": False}
    if ignore_eos:
        kw["min_new_tokens"] = MAX_NEW
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    ids = out[0, n:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    if not ignore_eos and ids and ids[-1] in eos:
        ids = ids[:-1]
    return ids, n


def compare(rows, label, hf_dir, fmt, mbq_dir, questions, backends, ignore_eos):
    """transformers on hf_dir against mbq-run on mbq_dir (each backend) and, for an export, mbq-run on the export
    itself (mbq reads its own exports back)."""
    model, processor, kinds = load_hf(hf_dir, fmt)
    runs = [(b, mbq_dir) for b in backends]
    if hf_dir != mbq_dir:
        runs.append(("cpu, the export", hf_dir))
    for image, prompt in questions:
        want, n = hf_ids(model, processor, image, prompt, ignore_eos)
        for b, d in runs:
            got, m = mbq_ids(d, image, prompt, b.split(",")[0], ignore_eos)
            ok = got == want and m == n
            rows.append({"check": label, "kinds": ", ".join(kinds), "run": b, "tokens": len(want), "ok": ok})
            if not ok:
                print(f"MISMATCH {label} ({b}) {prompt!r}: transformers {want} ({n} prompt tokens), "
                      f"mbq {got} ({m})", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cpu,wgpu")
    ap.add_argument("--keep", type=Path, help="keep the quantized and exported models here")
    args = ap.parse_args()
    backends = args.backends.split(",")
    work = args.keep or Path(tempfile.mkdtemp(prefix="mbq-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    # Import: checkpoints written by the reference packers.
    for name in ("llava_qwen128_gptq_w4g128", "llava_qwen128_gptq_w3g128", "llava_qwen128_awq_w4g128"):
        d = ROOT / "tests/fixtures/interop" / name
        compare(rows, f"import {name}", d, "gptq", d, FIXTURE_QUESTIONS, backends, True)

    # Export: mbq models -> GPTQ / compressed-tensors.
    w3 = ROOT / "models/tiny-shapes-w3"
    w4 = work / "tiny-shapes-w4"
    if not w4.exists():
        calib = work / "calib"
        if not calib.exists():
            sh([MBQ, "shapes", "--seed", "2000", "--count", "20", "--out", calib])
        sh([MBQ, "quantize", "--method", "mbq", "--w-bit", "4", "--group-size", "128", "--n-samples", "64",
            "--calib", calib / "questions.jsonl", "--image-folder", calib, "--model", ROOT / "models/tiny-shapes",
            "--out", w4])
    for src, label, fmt in ((w4, "W4 g128", "gptq"), (w4, "W4 g128", "compressed-tensors"), (w3, "W3 g128", "gptq")):
        out = work / f"{src.name}-{fmt}"
        if out.exists():
            shutil.rmtree(out)
        sh([MBQ, "export", "--format", fmt, "--model", src, "--out", out])
        compare(rows, f"export MBQ {label} -> {fmt}", out, fmt, src, shapes_questions(), backends, False)

    print("| check | transformers' quantized linears | mbq run | questions with the same greedy ids | tokens compared |")
    print("|---|---|---|---:|---:|")
    groups = {}
    for r in rows:
        groups.setdefault((r["check"], r["kinds"], r["run"]), []).append(r)
    for (check, kinds, run), rs in groups.items():
        same = sum(r["ok"] for r in rs)
        print(f"| {check} | {kinds} | {run} | {same}/{len(rs)} | {sum(r['tokens'] for r in rs)} |")
    import gptqmodel, torch, transformers, compressed_tensors  # noqa: E401

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, gptqmodel {gptqmodel.__version__}, "
          f"compressed-tensors {compressed_tensors.__version__}; work dir {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    main()
