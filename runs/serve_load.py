"""
Load test for serve.py: N clients at once stream chat (or text) completions from a running
server; prints the time to first token and the tokens/s each client saw, and the total.

    python serve.py --out_dir=weight/sft_alpaca &
    python runs/serve_load.py --model=sft_alpaca --clients 1 8 [--max_tokens=128] [--json=out.json]

Each client sends a different prompt with its own seed (temperature 0.8, top-k 200), streams the
reply and counts tokens from the usage chunk. One warm-up request runs first. To compare the
batched worker with the older turn-taking one, run it against a server started with
--batching=True and one with --batching=False (docs/serving.md, Continuous batching).
"""
import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Name three primary colors.", "Write a short poem about the sea.",
           "Explain why the sky is blue.", "How do I boil an egg?",
           "Describe a cat in one sentence.", "What is 2 + 2?"]


def one_client(http: httpx.Client, args, i: int) -> dict:
    """Stream one completion; (time to first token, decode tokens/s, tokens, seconds)."""
    body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0.8, "top_k": 200,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    prompt = PROMPTS[i % len(PROMPTS)]
    path = "/v1/completions" if args.text else "/v1/chat/completions"
    body.update({"prompt": prompt} if args.text else {"messages": [{"role": "user", "content": prompt}]})
    t0 = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"error: {r.status_code} {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"]:
                c = chunk["choices"][0]
                if (c.get("text") if args.text else c["delta"].get("content")):
                    first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - t0, "tok_per_s": (tokens - 1) / max(end - first, 1e-9),
            "tokens": tokens, "seconds": end - t0}


def run(http: httpx.Client, args, n: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: one_client(http, args, i), range(n)))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in results]
    return {"clients": n, "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_max_ms": 1000 * max(ttft),
            "per_client_tok_per_s": statistics.median(r["tok_per_s"] for r in results),
            "total_tok_per_s": sum(r["tokens"] for r in results) / wall,
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--text", action="store_true", help="a base model: /v1/completions")
    p.add_argument("--api_key", default="")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=600, trust_env=False,
                      limits=httpx.Limits(max_connections=max(args.clients) + 2)) as http:
        one_client(http, args, 0)  # warm-up
        rows = [run(http, args, n) for n in args.clients]
    print(f"{'clients':>7} {'TTFT median':>12} {'TTFT max':>9} {'tok/s per client':>17} {'tok/s total':>12} {'tokens':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['ttft_median_ms']:>10.0f}ms {r['ttft_max_ms']:>7.0f}ms "
              f"{r['per_client_tok_per_s']:>17.1f} {r['total_tok_per_s']:>12.1f} {r['tokens']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "max_tokens": args.max_tokens, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
