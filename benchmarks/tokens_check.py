"""The tokens a model makes (and each request's cumulative logprob), written as JSON, so that two
runs under different switches (an XLA flag, a kernel knob) can be compared for equality -- a cheap
check that a speed switch changes no result (Llama-3.1-8B shapes, random weights: deterministic
for a given seed):

    PYTHONPATH=src python benchmarks/tokens_check.py OUT.json [--model DIR] [--quantization fp8] [--batch 1 4]
    python benchmarks/tokens_check.py --compare A.json B.json   # exits 1 where they differ
"""
import argparse
import json
import sys


def compare(a: str, b: str) -> int:
    x, y = (json.load(open(p)) for p in (a, b))
    same_tokens = [r["tokens"] for r in x] == [r["tokens"] for r in y]
    worst = max((abs(r["cumulative_logprob"] - s["cumulative_logprob"]) for r, s in zip(x, y)), default=0.0)
    print(f"{a} vs {b}: tokens {'equal' if same_tokens else 'DIFFER'}, largest cumulative logprob difference "
          f"{worst:.3g}")
    return 0 if same_tokens else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--model", default=".models/llama-3.1-8b-shapes")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="requests decoded together, one run each")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-seq-len", type=int, default=512)
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.out is None:
        ap.error("OUT.json (where to write the tokens) is required unless --compare A.json B.json")
    from jaxllm import LLM, SamplingParams

    rows = []
    with LLM(args.model, load_format="dummy", dtype="bfloat16", quantization=args.quantization,
             max_batch_size=max(args.batch), max_seq_len=args.max_seq_len) as llm:
        vocab = llm.model_config.vocab_size
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)  # the bench's path
        for b in args.batch:
            prompts = [{"prompt_token_ids": [(17 + 7919 * i + 31 * j) % vocab for j in range(40 + 23 * i)]}
                       for i in range(b)]
            for r in llm.generate(prompts, sp, use_tqdm=False):
                c = r.outputs[0]
                rows.append({"batch": b, "tokens": list(c.token_ids), "cumulative_logprob": c.cumulative_logprob})
    json.dump(rows, open(args.out, "w"))
    print(f"{args.out}: {len(rows)} requests, {sum(len(r['tokens']) for r in rows)} tokens")


if __name__ == "__main__":
    main()
