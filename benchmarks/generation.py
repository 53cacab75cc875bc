"""Generation for ASR: batched (left-padded, KV cache) against one prompt at a time.

    python -m benchmarks.generation            # the toy model on its 108 held-out harmful
                                               # prompts (CPU), or a 7B-shaped random Llama in
                                               # bf16 when CUDA is there
    python -m benchmarks.generation --quick    # a few prompts: a smoke run

Every method runs ``pyattr.evaluate.generate_batches`` on the same formatted prompts, greedy:
batched with a dynamic KV cache, one prompt at a time, and batched with a static KV cache (which
transformers compiles on a GPU; its shapes are compiled before the timed run). On the GPU the
batch is the largest that fits (``auto_batch_size``) unless ``--batch-size`` is given.
Throughput is prompts/s and generated tokens/s (tokens up to and including EOS,
the ones a reader gets). On the toy model the texts of every method must agree (greedy, fp32:
left padding changes nothing); the random model's texts are not compared (bf16 rounding depends
on the batch shape).

The floor: each decoding step reads every weight once (7B in bf16: 13.5 GB, about 4 ms at the
H100's 3.35 TB/s), so one prompt at a time is bound by ``steps × weights`` and a batch shares that
read across its rows until the matrix products become compute-bound.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import header, table

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, heads=32)


def _toy(quick: bool):
    from pyattr import toy
    from pyattr.data import load_prompts, prompt_ids

    model, tok = toy.load(progress=False)
    prompts = load_prompts(toy.data(progress=False)["harmful_eval"])
    prompts = prompts[:6] if quick else prompts
    return model, tok, [prompt_ids(tok, p) for p in prompts], "toy model (fp32), CPU"


def _random_7b(prompts: int, device: str):
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(32000)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
        bos_token="w1",
        eos_token="w2",
        pad_token="w0",
    )
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=SEVEN_B["hidden_size"],
        intermediate_size=SEVEN_B["intermediate_size"],
        num_hidden_layers=SEVEN_B["num_hidden_layers"],
        num_attention_heads=SEVEN_B["heads"],
        num_key_value_heads=SEVEN_B["heads"],
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 120, (prompts,), generator=gen).tolist()
    encoded = [[1, *torch.randint(3, 32000, (n - 1,), generator=gen).tolist()] for n in lengths]
    return model, tok, encoded, "random 7B-shaped Llama (bf16)"


def _run(model, tok, encoded, batch_size: int, max_new_tokens: int, device: str, cache="dynamic"):
    from pyattr.evaluate.generate import generate_batches

    texts = [""] * len(encoded)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _, indices, batch in generate_batches(
        model, tok, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache
    ):
        for i, text in zip(indices, batch, strict=True):
            texts[i] = text
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    eos = tok.eos_token_id
    tokens = 0
    for text in texts:  # re-encode: a random model's texts end at max_new_tokens or EOS
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        tokens += min(max_new_tokens, n + (eos is not None))
    return seconds, tokens, texts


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few prompts: a smoke run")
    parser.add_argument("--batch-size", type=int, default=None, help="of the batched method")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=64, help="random-model prompts (GPU)")
    parser.add_argument(
        "--single-prompts", type=int, default=16, help="how many the one-at-a-time run does (GPU)"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cuda":
        from pyattr.evaluate.generate import auto_batch_size

        model, tok, encoded, what = _random_7b(args.prompts, device)
        max_new = args.max_new_tokens or 256
        batch = args.batch_size or auto_batch_size(model, encoded, max_new)
        single = encoded[: args.single_prompts]
    else:
        model, tok, encoded, what = _toy(args.quick)
        max_new, batch = args.max_new_tokens or 32, args.batch_size or 32
        single = encoded
    _run(model, tok, encoded[: min(4, len(encoded))], 2, 4, device)  # warm-up
    static = "static cache, compiled" if device == "cuda" else "static cache"
    if device == "cuda":  # compiles the shapes of the timed run first
        _run(model, tok, encoded, batch, 4, device, "static")
    rows = []
    results = {}
    for name, prompts, size, cache in (
        (f"batched ({batch} per batch)", encoded, batch, "dynamic"),
        ("one prompt at a time", single, 1, "dynamic"),
        (f"batched, {static}", encoded, batch, "static"),
    ):
        seconds, tokens, texts = _run(model, tok, prompts, size, max_new, device, cache)
        results[name] = (seconds, len(prompts), texts)
        rows.append(
            {
                "method": name,
                "prompts": len(prompts),
                "s": f"{seconds:.2f}",
                "prompts/s": f"{len(prompts) / seconds:.1f}",
                "tokens/s": f"{tokens / seconds:.0f}",
            }
        )
    (b_s, b_n, b_texts), (s_s, s_n, s_texts), (c_s, c_n, c_texts) = results.values()
    rows[0]["speed-up"] = f"{(b_n / b_s) / (s_n / s_s):.1f}×"
    rows[1]["speed-up"] = "1.0×"
    rows[2]["speed-up"] = f"{(c_n / c_s) / (s_n / s_s):.1f}×"
    same = (
        ""
        if device == "cuda"
        else f"; same texts: {'yes' if b_texts == s_texts == c_texts else 'NO'}"
    )
    out = "\n".join(
        [
            f"# generation · {header(device)}",
            f"{what}, greedy, max_new_tokens={max_new}{same}",
            "",
            table(
                rows,
                [
                    ("method", "method"),
                    ("prompts", "prompts"),
                    ("s", "s"),
                    ("prompts/s", "prompts/s"),
                    ("tokens/s", "tokens/s"),
                    ("speed-up", "prompts/s ratio"),
                ],
            ),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
