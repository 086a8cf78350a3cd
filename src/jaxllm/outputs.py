"""RequestOutput / CompletionOutput: what generate returns, shaped like the LLM API's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """A token's log probability under the model, its rank among all tokens (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    finish_reason is None while the sequence runs, then "stop" (EOS, a stop token id or a stop
    string; stop_reason holds the id or string, None for EOS), "length" (max_tokens) or
    "cancelled" (aborted).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token, with SamplingParams.logprobs
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Streaming: what this snapshot added since the previous one of the same request.
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """When things happened to a request (``time.perf_counter()`` seconds, like vLLM's metrics):
    accepted by the engine, first output token applied, finished (None until then)."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    # with SamplingParams.prompt_logprobs: per prompt token {token_id: Logprob}, None for the first
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
