#!/usr/bin/env python3
"""`mbq serve` with the official OpenAI Python client (not in CI: it needs
the `openai` package, `pip install openai`).

Starts `mbq serve` on a free port (the binary given by --mbq, default
target/release/mbq), asks the bundled model "What color is the circle?"
about examples/s1000_000000.png sent as a base64 data URL, once plainly and
once streamed, and checks both answers are "purple". Exits non-zero on any
difference. Usage:

    cargo build --release && python3 tools/openai_client_check.py [--backend cpu|wgpu]
"""
import argparse
import base64
import pathlib
import re
import subprocess
import sys
import threading

from openai import OpenAI

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbq", default=str(ROOT / "target/release/mbq"))
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()
    server = subprocess.Popen(
        [args.mbq, "serve", "--port", "0", "--backend", args.backend],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in server.stderr:
            print(f"server: {line.rstrip()}", file=sys.stderr)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            print("mbq serve did not start", file=sys.stderr)
            return 1
        # Keep reading the server's stderr so its pipe never fills.
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        png = base64.b64encode((ROOT / "examples/s1000_000000.png").read_bytes()).decode()
        messages = [{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": "What color is the circle?"},
            ],
        }]
        r = client.chat.completions.create(model=model, messages=messages)
        plain = r.choices[0].message.content
        print(f"not streamed: {plain!r} (finish_reason {r.choices[0].finish_reason}, usage {r.usage})")
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        parts, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        streamed = "".join(parts)
        print(f"streamed: {streamed!r} in {len(parts)} chunk(s) (usage {usage})")
        ok = plain == "purple" and streamed == "purple"
        print("OK" if ok else "FAILED: expected 'purple' both ways")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
