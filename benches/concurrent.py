#!/usr/bin/env python3
"""Many users, one model: edgechat's release binary and llama.cpp's llama-server on the same
GGUF and threads, over HTTP on loopback, one after the other, for BENCHMARKS.md.

  batch N   N concurrent streamed chat requests (different prompts, max_tokens each):
            aggregate tok/s, time to first token (min / max), each request's finish time.
  turns     a conversation of six turns whose history reaches ~1,500 tokens; the 6th turn's
            time to first token with the prompt cache and without it.

Usage: python3 benches/concurrent.py MODEL.gguf THREADS [batch N...] [turns]
  e.g. python3 benches/concurrent.py models/SmolLM2-135M-Instruct.Q4_1.gguf 2 batch 1 4 8 turns
Needs `cargo build --release` (or EDGECHAT_BIN) and llama-server from
`bash benches/llama-bench.sh` (or LLAMA_SERVER). Bounded: every request times out after
TIMEOUT seconds (default 300). Standard library only.
"""

import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = float(os.environ.get("TIMEOUT", "300"))
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "128"))
TOPICS = ["the sea", "a mountain village", "a robot learning to paint", "an old library",
          "a winter market", "a lighthouse keeper", "a desert caravan", "a city at night"]
SYSTEM = "You are a helpful assistant. Answer in English."


class Server:
    """A running server: its process, port, bearer token and model name."""

    def __init__(self, proc, port, token, model):
        self.proc, self.port, self.token, self.model = proc, port, token, model

    def request(self, method, path, body=None, token=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        return conn, conn.getresponse()

    def json(self, method, path, body=None, token=None):
        conn, r = self.request(method, path, body, token)
        data = r.read()
        conn.close()
        assert r.status == 200, (path, r.status, data[:300])
        return json.loads(data)

    def stream(self, messages, extra=None):
        """One streamed chat: seconds to the first content and to the end, tokens, text and
        usage."""
        body = {"model": self.model, "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        body.update(extra or {})
        start = time.monotonic()
        conn, r = self.request("POST", "/v1/chat/completions", body)
        assert r.status == 200, (r.status, r.read()[:300])
        first, chunks, usage, text = None, 0, None, []
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.monotonic() - start
                    chunks += 1
                    text.append(content)
        conn.close()
        tokens = (usage or {}).get("completion_tokens") or chunks
        return first, time.monotonic() - start, tokens, "".join(text), usage or {}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def wait_for(proc, pattern):
    """Reads the process's output until `pattern` matches; returns the match."""
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return m
        assert time.monotonic() < deadline, f"no line matching {pattern}"
    raise SystemExit(f"the server exited before printing {pattern}")


def edgechat(model, threads, batch, cache_mb):
    """edgechat serving `model` alone (remote providers off), with a user and a token."""
    binary = os.environ.get("EDGECHAT_BIN", os.path.join(ROOT, "target/release/edgechat"))
    data = tempfile.mkdtemp(prefix="ec-bench-")
    config = os.path.join(data, "config.toml")
    with open(config, "w") as f:
        f.write(f"""[local]
model = "{os.path.abspath(model)}"
name = "bench"
threads = {threads}
max_batch = {batch}
max_queue = 64
prompt_cache_mb = {cache_mb}
[rate_limit.chat_per_user]
requests = {{ requests = 100000, per_secs = 60, burst = 100000 }}
tokens = {{ requests = 100000000, per_secs = 60, burst = 100000000 }}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECHAT_")}
    env["EDGECHAT_AUTH__JWT_SECRET"] = "bench-secret-bench-secret-bench-secret-01"
    env["RUST_LOG"] = "warn"
    proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data,
                             "--config", config], cwd=data, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    port = int(wait_for(proc, r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    s = Server(proc, port, None, "bench")
    user = {"username": "bench", "email": "bench@example.com", "password": "password-123"}
    s.json("POST", "/auth/register", user)
    s.token = s.json("POST", "/auth/login", user)["access_token"]
    return s


def llama_server(model, threads, parallel, cache):
    """llama-server on the same file: `parallel` slots sharing one context of 2,048 each."""
    binary = os.environ.get("LLAMA_SERVER", os.path.join(
        ROOT, "benches/.cache/llama.cpp-0.3.36/build/bin/llama-server"))
    port = free_port()
    args = [binary, "-m", model, "-t", str(threads), "-np", str(parallel),
            "-c", str(2048 * parallel), "--host", "127.0.0.1", "--port", str(port),
            "--cache-prompt" if cache else "--no-cache-prompt"]
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(binary))
    proc = subprocess.Popen(args, text=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    wait_for(proc, r"listening on http")
    return Server(proc, port, None, "model")


def free_port():
    """A loopback port nobody listens on now (llama-server cannot report one it picked)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(server, n):
    """n concurrent requests; returns the row's figures."""
    results = [None] * n

    def one(i):
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Write a long story about {topic}."}]
        results[i] = server.stream(messages)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wall = time.monotonic() - start
    assert all(results), "a request did not finish"
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    ends = [r[1] for r in results]
    return (f"{n} concurrent: {tokens / wall:.1f} tok/s aggregate ({tokens} tokens in "
            f"{wall:.1f} s); first token {min(ttft) * 1000:.0f}-{max(ttft) * 1000:.0f} ms; "
            f"slowest/fastest finish {max(ends) / min(ends):.2f}")


def turns(server):
    """Six turns of one conversation, answers of up to 280 tokens: the last turn's time to
    first token and its prompt's tokens."""
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(6):
        topic = TOPICS[turn]
        messages.append({"role": "user", "content":
                         f"Tell me everything you know about {topic}, in detail."})
        first, _, _, text, usage = server.stream(messages, {"max_tokens": 280})
        messages.append({"role": "assistant", "content": text})
    return first, usage.get("prompt_tokens", 0)


def main():
    model, threads, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    print(f"model {os.path.basename(model)}, {threads} threads, max_tokens {MAX_TOKENS}")
    i = 0
    while i < len(args):
        if args[i] == "batch":
            i += 1
            while i < len(args) and args[i].isdigit():
                n = int(args[i])
                for name, start in [("llama-server", lambda: llama_server(model, threads, n, True)),
                                    ("edgechat", lambda: edgechat(model, threads, n, 256))]:
                    s = start()
                    try:
                        print(f"{name:12} {batch(s, n)}", flush=True)
                    finally:
                        s.stop()
                i += 1
        elif args[i] == "turns":
            i += 1
            for name, cache in [("llama-server", True), ("llama-server", False),
                                ("edgechat", True), ("edgechat", False)]:
                if name == "edgechat":
                    s = edgechat(model, threads, 1, 256 if cache else 0)
                else:
                    s = llama_server(model, threads, 1, cache)
                try:
                    first, prompt = turns(s)
                    state = "cache on" if cache else "cache off"
                    print(f"{name:12} 6th turn ({prompt} prompt tokens), {state}: first token in "
                          f"{first * 1000:.0f} ms", flush=True)
                finally:
                    s.stop()
        else:
            raise SystemExit(f"unknown argument {args[i]}: batch N... or turns")


if __name__ == "__main__":
    main()
