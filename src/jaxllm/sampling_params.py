"""SamplingParams: what to generate and when to stop, with the LLM API's names and defaults.

Every field is validated when the object is built, so a bad value fails before any work starts and
the message names the field and the range it must lie in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = True):
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be an int, got None")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def _str_list(name: str, value) -> list[str]:
    """None, a str or a list of str -> a list of str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a str or a list of str, got {value!r}")


def _int_list(name: str, value) -> list[int] | None:
    """None or a list of ints >= 0 (checked)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of int, got {value!r}")
    for t in value:
        _check_int(f"{name}[i]", t, 0, allow_none=False)
    return list(value)


MAX_LOGPROBS = 20  # most likely tokens reported per generated token, at most
MAX_SEQUENCES = 64  # sequences per request (n, best_of), at most


@dataclass
class SamplingParams:
    """Sampling and stopping settings for one request.

    Greedy decoding is used when ``temperature == 0`` or when none of temperature, top_p, top_k and
    min_p is set. ``top_k = 0`` and ``top_p = 1`` and ``min_p = 0`` disable those filters.
    ``logprobs``: None, or K in [0, 20]: each generated token's log probability under the model
    (log_softmax of its logits), its rank, and the K most likely tokens (0: only the chosen one).
    ``prompt_logprobs``: None, or K in [0, 20]: the same for every prompt token after the first
    (``RequestOutput.prompt_logprobs``, whose first entry is None). Such a request does not reuse
    cached prefix blocks (their logits were never kept), and its prefill computes logits at every
    prompt position (vocab x prompt tokens floats per step: lower max_num_tokens for long prompts).
    ``truncate_prompt_tokens``: keep only the last k prompt tokens.
    ``logits_processor``: a Python callable (or a list, applied in order) called on every step with
    ``(output_token_ids, logits)`` or ``(prompt_token_ids, output_token_ids, logits)`` (logits: a
    float32 numpy array [vocab]) and returning the logits to sample from. A slower path: such a
    request runs outside the batched device loop (see jaxllm.engine.logits_processing).
    ``use_beam_search``: beam search with ``best_of`` (default ``n``) beams, returning the n best,
    as transformers' ``generate(num_beams=..., do_sample=False)`` with the same ``length_penalty``
    (scores are summed logprobs / generated length ** length_penalty) and ``early_stopping``
    (True, False or "never"). It runs outside the batched engine, recomputing the beams each step:
    a slower path, meant for short outputs.
    ``add_special_tokens``: let the tokenizer add its special tokens (BOS) to a text prompt.
    ``spaces_between_special_tokens``: with skip_special_tokens=False, set special tokens in the
    output text apart from their neighbours by a space (as transformers' slow tokenizers and vLLM).
    ``bad`` (words, as vLLM's bad_words) and ``bad_token_ids``: never generated. A word is
    tokenized as written and with a leading space; a one-token word bans that token, a longer one
    bans its last token right after the rest of it.
    ``n``: completions returned; ``best_of`` (>= n, default n, at most 64): sequences sampled, of
    which the n with the highest cumulative logprob are returned. Both need sampling (temperature
    > 0). Sequence i of a seeded request draws from the seed's key folded with i (sequence 0 from
    the seed's own key), so each is reproducible on its own.
    Penalties, applied on device to the logits before sampling (and before logprobs):
    ``repetition_penalty`` (> 0; as transformers: a logit of a token seen in the prompt or the
    output is divided by it if positive, multiplied if negative), ``presence_penalty`` and
    ``frequency_penalty`` (in [-2, 2]; as OpenAI: subtract presence * [count > 0] + frequency *
    count, counting output tokens).
    """

    max_tokens: int = 32
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    logits_processor: object = None  # a callable or a list of them (see the docstring)
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Filled by the LLM from the tokenizer; a user may set them to override the model's EOS.
    end_id: int | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)
    _bad_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, 1, allow_none=False)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        _check_float("temperature", self.temperature)
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0)
        _check_float("min_p", self.min_p)
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("seed", self.seed, 0)
        _check_int("end_id", self.end_id, 0)
        self._stop_list = _str_list("stop", self.stop)
        if any(s == "" for s in self._stop_list):
            raise ValueError("stop must not contain an empty string")
        if self._stop_list and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (use stop_token_ids instead)")
        self.stop_token_ids = _int_list("stop_token_ids", self.stop_token_ids)
        self._bad_list = _str_list("bad", self.bad)
        if any(not w.strip() for w in self._bad_list):
            raise ValueError("bad must not contain an empty or blank string")
        self.bad_token_ids = _int_list("bad_token_ids", self.bad_token_ids)
        for name in ("add_special_tokens", "spaces_between_special_tokens", "skip_special_tokens", "ignore_eos", "detokenize", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_int("n", self.n, 1, allow_none=False)
        _check_int("best_of", self.best_of, 1)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n ({self.n}), got {self.best_of}")
        if self.num_sequences > MAX_SEQUENCES:
            raise ValueError(f"best_of (or n) must be <= {MAX_SEQUENCES}, got {self.num_sequences}")
        if self.logits_processor is not None:
            procs = self.logits_processor if isinstance(self.logits_processor, (list, tuple)) else [self.logits_processor]
            if not procs or not all(callable(f) for f in procs):
                raise TypeError(f"logits_processor must be a callable or a list of callables, got {self.logits_processor!r}")
            if self.num_sequences > 1 or self.use_beam_search:
                raise ValueError("logits_processor works with one sequence per request (n = best_of = 1, no beam search)")
        if self.use_beam_search:
            self._check_beam_search()
        elif self.num_sequences > 1 and self.is_greedy:
            raise ValueError(
                f"n and best_of must be 1 with greedy decoding (all {self.num_sequences} sequences would be "
                "identical); set temperature > 0"
            )
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name))
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        _check_int("logprobs", self.logprobs, 0)
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        _check_int("prompt_logprobs", self.prompt_logprobs, 0)
        if self.prompt_logprobs is not None and self.prompt_logprobs > MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")

    def _check_beam_search(self) -> None:
        if not isinstance(self.use_beam_search, bool):
            raise TypeError(f"use_beam_search must be a bool, got {self.use_beam_search!r}")
        _check_float("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
        if not self.is_greedy:
            raise ValueError("use_beam_search needs temperature 0 or unset, and no top_p / top_k / min_p")
        unsupported = [name for name, off in (
            ("logprobs", self.logprobs is None), ("prompt_logprobs", self.prompt_logprobs is None),
            ("stop", not self._stop_list), ("bad", not self._bad_list), ("bad_token_ids", not self.bad_token_ids),
            ("repetition_penalty", self.repetition_penalty == 1.0), ("presence_penalty", self.presence_penalty == 0.0),
            ("frequency_penalty", self.frequency_penalty == 0.0),
        ) if not off]
        if unsupported:
            raise ValueError(f"use_beam_search does not support {', '.join(unsupported)} yet; leave them unset")

    @property
    def beam_width(self) -> int:
        """Beams kept by beam search: best_of, default n."""
        return self.num_sequences

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the request: best_of (default n); the best n are returned."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def bad_words(self) -> list[str]:
        return self._bad_list

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def is_greedy(self) -> bool:
        if self.temperature == 0:
            return True
        return all(v is None for v in (self.temperature, self.top_p, self.top_k, self.min_p))

    def all_stop_token_ids(self, eos_token_ids: list[int]) -> list[int]:
        """Token ids that end the request: the model's EOS ids (unless ignore_eos) and stop_token_ids."""
        ids = list(self.stop_token_ids or [])
        if not self.ignore_eos:
            eos = [self.end_id] if self.end_id is not None else eos_token_ids
            ids = [i for i in eos if i not in ids] + ids
        return ids
