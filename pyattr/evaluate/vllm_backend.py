"""vLLM as the generation backend of ``attack_success`` (GPU only; ``pip install 'pyattr[vllm]'``).

vLLM loads models from a folder, so the model in memory (edited or not) is saved once to a
temporary folder in safetensors and loaded from there; the folder is removed when the engine
goes. A sweep keeps one engine and calls ``update(model)`` for each point: where the installed
vLLM takes a worker extension and ``collective_rpc`` (``pyattr.evaluate.vllm_worker``), only the
tensors that differ from what the engine holds are loaded in place and the prefix cache is
reset; where it does not, the engine is saved and loaded again, and ``updates`` counts what each
way cost. Prompts go in as token ids (the same formatting as the Hugging Face backend) in the same
batches, with the same per-batch seeds, and come back in the same result format. Greedy is
temperature 0; sampling is plain temperature sampling (top_p 1, no top_k). vLLM's kernels are not
bit-identical to Hugging Face's, so greedy texts may differ in rare near-ties.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .generate import batches, check_request

__all__ = ["EXTENSION", "VllmEngine"]

EXTENSION = "pyattr.evaluate.vllm_worker.WeightLoader"


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
        self._vllm, self.tokenizer, self.options = vllm, tokenizer, options
        self.in_place = (
            hasattr(vllm.LLM, "collective_rpc") and "worker_extension_cls" not in options
        )
        self.updates = {"in place": 0, "reloaded": 0, "unchanged": 0, "seconds": 0.0}
        self._start(model)

    def _start(self, model: nn.Module) -> None:
        """Save ``model`` to a fresh temporary folder and start an engine on it."""
        from ..io import weight_digest

        self.model = model
        self._folder = tempfile.TemporaryDirectory(prefix="pyattr-vllm-")
        model.save_pretrained(self._folder.name, safe_serialization=True)
        self.tokenizer.save_pretrained(self._folder.name)
        dtype = next(model.parameters()).dtype
        settings = {"dtype": str(dtype).removeprefix("torch."), "seed": 0} | self.options
        where = {"model": self._folder.name, "tokenizer": self._folder.name}
        self.llm = None
        if self.in_place:
            try:
                self.llm = self._vllm.LLM(**where, worker_extension_cls=EXTENSION, **settings)
            except TypeError as exc:  # a vLLM without worker extensions
                if "worker_extension_cls" not in str(exc):
                    raise
                self.in_place = False
        if self.llm is None:
            self.llm = self._vllm.LLM(**where, **settings)
        self._loaded = {n: weight_digest(t) for n, t in model.state_dict().items()}

    def update(self, model: nn.Module) -> str:
        """Make the engine generate with ``model``'s weights (the same architecture): "in
        place" (only the tensors that changed, through the worker extension; the prefix cache
        reset, as its entries came from the old weights), "reloaded" (saved and loaded again:
        this vLLM cannot take weights in place) or "unchanged"."""
        from ..io import weight_digest

        t0 = time.perf_counter()
        state = model.state_dict()
        digests = {n: weight_digest(t) for n, t in state.items()}  # one read of the weights
        changed = [n for n, d in digests.items() if self._loaded.get(n) != d]
        if not changed:
            how = "unchanged"
        elif self.in_place:
            weights = [(n, state[n].detach().cpu()) for n in changed]
            self.llm.collective_rpc("pyattr_load_weights", args=(weights,))
            self.llm.reset_prefix_cache()
            self._loaded.update({n: digests[n] for n in changed})
            self.model, how = model, "in place"
        else:
            if not self.updates["reloaded"]:
                warnings.warn(
                    "this vLLM takes no worker extension: every sweep point saves the model "
                    "and starts a new engine (see VllmEngine.updates for the cost)",
                    stacklevel=2,
                )
            self._stop()
            self._start(model)
            how = "reloaded"
        self.updates[how] += 1
        self.updates["seconds"] += time.perf_counter() - t0
        return how

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

    def _stop(self) -> None:
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._folder.cleanup()

    def close(self) -> None:
        """Free the engine and remove the saved copy."""
        self._stop()
