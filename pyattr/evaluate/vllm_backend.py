"""vLLM as the generation backend of ``attack_success`` (GPU only; ``pip install 'pyattr[vllm]'``).

vLLM loads models from a folder, so the model in memory (edited or not) is saved once to a
temporary folder in safetensors and loaded from there; the folder is removed when the engine
goes. Prompts go in as token ids (the same formatting as the Hugging Face backend) in the same
batches, with the same per-batch seeds, and come back in the same result format. Greedy is
temperature 0; sampling is plain temperature sampling (top_p 1, no top_k). vLLM's kernels are not
bit-identical to Hugging Face's, so greedy texts may differ in rare near-ties.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .generate import batches, check_request

__all__ = ["VllmEngine"]


class VllmEngine:
    """A vLLM ``LLM`` over a saved copy of ``model``; ``options`` go to ``vllm.LLM`` (for
    example ``gpu_memory_utilization`` or ``tensor_parallel_size``). A ``Generator``."""

    name = "vllm"

    def __init__(self, model: nn.Module, tokenizer, **options) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                f"backend='vllm' needs vLLM ({exc}); install it on a GPU machine with "
                "`pip install 'pyattr[vllm]'`, or use backend='hf'"
            ) from None
        self.model = model
        self._vllm = vllm
        self._folder = tempfile.TemporaryDirectory(prefix="pyattr-vllm-")
        model.save_pretrained(self._folder.name, safe_serialization=True)
        tokenizer.save_pretrained(self._folder.name)
        dtype = next(model.parameters()).dtype
        settings = {"dtype": str(dtype).removeprefix("torch."), "seed": 0} | options
        self.llm = vllm.LLM(model=self._folder.name, tokenizer=self._folder.name, **settings)

    def batches(
        self,
        encoded: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        skip: frozenset[int] = frozenset(),
    ) -> Iterator[tuple[int, list[int], list[str]]]:
        """Like ``generate_batches``: ``(batch index, prompt indices, responses)``."""
        check_request(self.model, encoded, max_new_tokens, batch_size, do_sample, temperature)
        for index, chunk in batches(encoded, batch_size, skip):
            params = self._vllm.SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_p=1.0,
                seed=seed * 1_000_003 + index,
                skip_special_tokens=True,
            )
            prompts = [{"prompt_token_ids": [int(t) for t in encoded[i]]} for i in chunk]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            yield index, chunk, [o.outputs[0].text.strip() for o in outputs]

    def close(self) -> None:
        """Free the engine and remove the saved copy."""
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._folder.cleanup()
