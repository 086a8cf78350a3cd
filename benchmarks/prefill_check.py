"""GPU check: the GPU attention paths (cuDNN whole-prompt prefill, the Pallas decode kernel) vs the
jnp reference on a small random Llama (head dim 64, GQA 2) in bf16: first-token logprobs agree,
and the greedy tokens are printed.

    PYTHONPATH=src python benchmarks/prefill_check.py [MODEL_DIR]
"""

import sys
import tempfile


from jaxllm import LLM, SamplingParams

if len(sys.argv) > 1:
    path = sys.argv[1]
else:  # a small random checkpoint whose head dim (64) the GPU paths take
    import torch
    import transformers as tf

    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    sys.path.insert(0, "tests")
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)
prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 200, 33)]
sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
res = {}
for backend in ("auto", "reference"):
    with LLM(path, dtype="bfloat16", max_seq_len=512, attention_backend=backend) as llm:
        r = llm._engine.runner
        print(backend, "decode:", r.attention_backend, "fresh prefill:", r._fresh_impl)
        res[backend] = llm.generate(prompts, sp, use_tqdm=False)
worst = 0.0
for a, b in zip(res["auto"], res["reference"]):
    for step, (ea, eb) in enumerate(zip(a.outputs[0].logprobs, b.outputs[0].logprobs)):
        common = set(ea) & set(eb)  # step 0 comes from prefill, the rest from decode
        worst = max(worst, max(abs(ea[t].logprob - eb[t].logprob) for t in common))
        if a.outputs[0].token_ids[step] != b.outputs[0].token_ids[step]:
            break
    print("tokens auto", a.outputs[0].token_ids, "ref", b.outputs[0].token_ids)
print(f"max |logprob difference| (prefill and decode steps) = {worst:.4f}")
assert worst < 0.05, worst
