"""pyattr's vLLM worker extension (``worker_extension_cls``): loads weights into the model a
vLLM worker holds, in place, so that a sweep updates one engine per point instead of saving and
loading the whole model. Runs inside vLLM's worker processes; imports nothing of pyattr's."""

from __future__ import annotations


class WeightLoader:
    """Mixed into vLLM's worker class by ``vllm.LLM(..., worker_extension_cls=...)``; called
    through ``LLM.collective_rpc("pyattr_load_weights", args=(weights,))``."""

    def pyattr_load_weights(self, weights: list) -> int:
        """Load ``(Hugging Face name, tensor)`` pairs through the model's own ``load_weights``
        (which packs q/k/v and gate/up and shards for tensor parallelism); returns how many."""
        self.model_runner.model.load_weights(weights=iter(weights))
        return len(weights)
