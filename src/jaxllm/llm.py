"""The facade: ``LLM(model=...)`` and ``generate``, with every argument checked before work starts."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from .engine import Engine, Request
from .loader import DTYPES, LOAD_FORMATS, load_model
from .outputs import RequestOutput
from .runner import ModelRunner
from .sampling_params import SamplingParams
from .sharding import make_mesh


PromptInput = str | list[int] | dict


def _check_positive_int(name: str, value, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class LLM:
    """An LLM loaded on the local devices, ready to generate.

    Args:
        model: an HF model id ("org/name", downloaded through huggingface_hub), a local HF folder
            (safetensors), or a .gguf file.
        tokenizer: a folder, .gguf file or HF id to take the tokenizer from, or a tokenizer object.
        dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32".
        revision: the hub revision (branch, tag or commit) for an HF id.
        load_format: "auto" (read the weights) or "dummy" (random weights of the right shapes).
        max_seq_len: the longest prompt + output, default the model's max_position_embeddings.
        max_batch_size: how many requests run on device together.
        decode_steps: decode steps per device call (tokens per host round trip).
        trust_remote_code: must stay False: code from checkpoints is never executed.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: Any = None,
        *,
        dtype: str = "auto",
        revision: str | None = None,
        load_format: str = "auto",
        max_seq_len: int | None = None,
        max_batch_size: int = 256,
        decode_steps: int = 16,
        trust_remote_code: bool = False,
    ):
        if trust_remote_code:
            raise ValueError(
                "trust_remote_code=True is not supported: jaxllm never runs code shipped with a "
                "checkpoint; use a supported architecture (see jaxllm.models.supported_architectures())"
            )
        if dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
        _check_positive_int("max_seq_len", max_seq_len)
        _check_positive_int("max_batch_size", max_batch_size, allow_none=False)
        _check_positive_int("decode_steps", decode_steps, allow_none=False)

        self._mesh = make_mesh()
        loaded = load_model(
            model, dtype=dtype, load_format=load_format, tokenizer=tokenizer, revision=revision, mesh=self._mesh
        )
        self.model_config = loaded.config
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        limit = loaded.config.max_position_embeddings
        if max_seq_len is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len must be <= the model's max_position_embeddings ({limit}), got {max_seq_len}")
        self.max_seq_len = max_seq_len or limit
        self.max_batch_size = max_batch_size
        self._eos_ids = self._find_eos_ids(loaded)
        runner = ModelRunner(loaded.model, loaded.config, loaded.dtype)
        self._engine: Engine | None = Engine(runner, self.tokenizer, max_batch_size, self.max_seq_len, decode_steps)
        self._next_id = 0
        self._seed_rng = np.random.default_rng()  # seeds for requests that set none

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release the model and its device memory; later calls to generate raise RuntimeError."""
        if self._engine is not None:
            runner = self._engine.runner
            self._engine = None
            for leaf in jax.tree.leaves(runner.params):
                if hasattr(leaf, "delete"):
                    leaf.delete()

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate completions; a list of RequestOutput for list input, else one RequestOutput."""
        if self._engine is None:
            raise RuntimeError("this LLM has been shut down; create a new one")
        prompts, single = self._normalize_inputs(inputs)
        params = self._normalize_params(sampling_params, len(prompts))
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params)]

        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Generating", unit="req", leave=False)
        try:
            self._engine.run(requests, on_finish=(lambda r: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        outputs = [r.to_output() for r in requests]
        return outputs[0] if single else outputs

    # -- input handling ------------------------------------------------------------------------
    @staticmethod
    def _is_token_list(x) -> bool:
        return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    def _normalize_inputs(self, inputs) -> tuple[list, bool]:
        if isinstance(inputs, (str, dict)) or self._is_token_list(inputs):
            return [inputs], True
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 0:
                raise ValueError("inputs must not be empty")
            return list(inputs), False
        raise TypeError(
            "inputs must be a str, a list of token ids, a dict with 'prompt' or 'prompt_token_ids', "
            f"or a list of these; got {type(inputs).__name__}"
        )

    def _normalize_params(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(
                    f"sampling_params must be one SamplingParams or one per prompt ({n}), got {len(sampling_params)}"
                )
            for sp in sampling_params:
                if not isinstance(sp, SamplingParams):
                    raise TypeError(f"sampling_params entries must be SamplingParams, got {type(sp).__name__}")
            return list(sampling_params)
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a dict input needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def _check_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError("prompt_token_ids must be a non-empty list of int")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids must be ints in [0, {vocab}), got {t!r}")
        return list(ids)

    def _make_request(self, prompt, sp: SamplingParams) -> Request:
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt must not be empty (it tokenized to no tokens)")
        vocab = self.model_config.vocab_size
        for t in sp.stop_token_ids or []:
            if t >= vocab:
                raise ValueError(f"stop_token_ids must be ints in [0, {vocab}), got {t}")
        if sp.end_id is not None and sp.end_id >= vocab:
            raise ValueError(f"end_id must be in [0, {vocab}), got {sp.end_id}")
        total = len(ids) + sp.max_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) = {total} exceeds "
                f"max_seq_len ({self.max_seq_len}); shorten the prompt or lower max_tokens"
            )
        seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(0, 2**31 - 1))
        rid = self._next_id
        self._next_id += 1
        return Request(rid, text, ids, sp, seed, sp.all_stop_token_ids(self._eos_ids))

    @staticmethod
    def _find_eos_ids(loaded) -> list[int]:
        ids = list(loaded.config.eos_token_ids)
        gen_cfg = loaded.source.path / "generation_config.json" if not loaded.source.is_gguf else None
        if gen_cfg is not None and gen_cfg.exists():
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(str(loaded.source.path)).eos_token_id
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.append(tok_eos)
        return sorted(set(int(i) for i in ids))
