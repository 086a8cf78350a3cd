"""Beam search, step for step as transformers' ``generate(num_beams=W, do_sample=False)``.

Each step scores the W running beams' next tokens (summed log-probabilities), takes the best
max(2, 1 + #EOS) * W continuations, keeps the best W that did not stop as the running beams, and
lets the ones among the first W that stopped (an EOS, or the length limit) compete for W finished
slots with score = summed logprob / generated length ** length_penalty. The early-stopping rule
(True, False, "never") is transformers' heuristic. The beams' logits come from the model runner's
scratch-pool forward pass over the whole sequences (no KV cache reuse between steps): simple and
exact, and slower than the engine's batched decode.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import jax
import numpy as np

NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens only
    score: float  # the ranking score (normalized by length)
    logprob: float  # summed log-probability
    stopped_by_eos: bool


def beam_search(runner, prompt: list[int], width: int, max_tokens: int, eos_ids: list[int], *, min_tokens: int = 0,
                length_penalty: float = 1.0, early_stopping=False, cancelled: threading.Event | None = None
                ) -> list[Hypothesis]:
    """The `width` best hypotheses, best first."""
    p = len(prompt)
    max_len = p + max_tokens
    keep = max(2, 1 + len(eos_ids)) * width
    run_seqs = [list(prompt) for _ in range(width)]
    run_scores = np.full((width,), NEG, np.float64)
    run_scores[0] = 0.0
    slots: list[tuple[float, Hypothesis | None]] = [(NEG, None)] * width  # finished hypotheses, best first
    heuristic_unsatisfied = True
    cur = p
    while True:
        if cancelled is not None and cancelled.is_set():
            break
        lp = np.asarray(jax.nn.log_softmax(runner.last_logits(run_seqs), axis=-1), np.float64)
        if cur - p < min_tokens:
            lp[:, eos_ids] = -np.inf
        vocab = lp.shape[1]
        acc = (lp + run_scores[:, None]).reshape(-1)
        top = np.argsort(-acc, kind="stable")[:keep]
        cand_scores = acc[top]
        cand_beams, cand_toks = top // vocab, top % vocab
        hits = np.array([(int(tok) in eos_ids) or cur + 1 >= max_len for tok in cand_toks])
        # running beams for the next step: the best W continuations that did not stop
        masked = cand_scores + hits * NEG
        nxt = np.argsort(-masked, kind="stable")[:width]
        new_seqs = [run_seqs[cand_beams[i]] + [int(cand_toks[i])] for i in range(len(top))]
        # finished: stopped continuations among the first W compete for the W slots
        all_full = all(h is not None for _, h in slots) and early_stopping is True
        norm = cand_scores / float(cur + 1 - p) ** length_penalty
        merged = list(slots)
        for i in range(len(top)):
            ok = i < width and hits[i] and heuristic_unsatisfied and not all_full
            hyp = Hypothesis(new_seqs[i][p:], float(norm[i]), float(cand_scores[i]), int(cand_toks[i]) in eos_ids)
            merged.append((float(norm[i]) if ok else NEG, hyp if ok else None))
        merged.sort(key=lambda x: -x[0])
        slots = merged[:width]
        run_seqs = [new_seqs[i] for i in nxt]
        run_scores = masked[nxt]
        cur += 1
        best_len = (max_len - p) if (early_stopping == "never" and length_penalty > 0) else (cur - p)
        best_possible = run_scores[0] / float(best_len) ** length_penalty
        worst = min(s for s, _ in slots)
        worst_per_slot = [worst if h is not None else NEG for _, h in slots]
        heuristic_unsatisfied = heuristic_unsatisfied and any(best_possible > w for w in worst_per_slot)
        all_finished = all(h is not None for _, h in slots)
        if not heuristic_unsatisfied or (all_finished and early_stopping is True) or hits.all():
            break
    return [h for _, h in slots if h is not None]
