"""The command line of the other lenses: ``pyattr direction`` and ``pyattr probe``.

    pyattr direction find --harmful safety.csv --harmless utility.jsonl --out dir/
    pyattr direction apply --direction dir/direction.safetensors --out edited/   # weights
    pyattr probe --harmful safety.csv --harmless utility.jsonl --out probe/ [--top-heads 4]

On the toy model (the default) the harmful set defaults to the toy's safety calibration set and
the harmless one to its benign how-to requests (``toy.contrast_pairs``). The overlap map of
every lens is ``pyattr analyze --direction ... --probe ...``.
"""

from __future__ import annotations

from pathlib import Path

from .cli import _toy_default, check_file_out, model_of, save_model


def _pairs(args, which: str):
    """The safety (``harmful``) or utility (``harmless``) pairs: the file given, or the toy's."""
    from .data import load_pairs

    path = getattr(args, which)
    if path is None:  # the toy's (checked by _toy_default): its refusals, its how-to requests
        from . import toy

        if which == "harmless":
            pairs = toy.contrast_pairs()
            return pairs if args.n is None else pairs[: args.n]
        path = toy.data()["safety_calibration"]
    return load_pairs(
        path, prompt_column=args.prompt_column, response_column=args.response_column, n=args.n
    )


def _prefix_ids(tokenizer, texts: list[str]) -> list[tuple[int, ...]]:
    """Token ids of refusal openings as the model writes them after a prompt."""
    from .data import Example, encode

    out = []
    for text in texts:
        if not text.strip():
            raise SystemExit("pyattr: --prefix must not be empty")
        e = encode(tokenizer, Example("x", text), eos=False)
        out.append(tuple(e.input_ids[e.counted].tolist()))
    return out


def _direction(args) -> int:
    from .direction import load_selection, orthogonalize, random_direction

    if args.action == "apply":
        if args.direction is None:
            raise SystemExit("pyattr: direction apply needs --direction (from direction find)")
        selection = load_selection(args.direction)
        model, tok = model_of(args)
        r = selection.direction
        if args.random_seed is not None:
            r = random_direction(r, args.random_seed)
        names = orthogonalize(model, r)
        path = save_model(model, tok, args.out, args.model)
        what = "a random direction" if args.random_seed is not None else "the refusal direction"
        print(f"{what} orthogonalised out of {len(names)} weights: {path}")
        return 0
    from .analysis import save_table
    from .direction import plot_selection, refusal_direction

    for flag, what in (("--harmful", "harmful prompts with refusals"), ("--harmless", "answers")):
        _toy_default(args, flag, what)
    out = Path(args.out)
    check_file_out(out / "direction.safetensors", "out/direction.safetensors")
    model, tok = model_of(args)
    refusals, answers = _pairs(args, "harmful"), _pairs(args, "harmless")
    prefixes = _prefix_ids(tok, args.prefix) if args.prefix else None
    directions, selection = refusal_direction(
        model,
        tok,
        refusals,
        answers,
        prefixes=prefixes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        positions=args.positions,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        max_layer_fraction=args.max_layer_fraction,
        kl_threshold=args.kl_threshold,
    )
    directions.save(out / "means.safetensors")
    save_table(selection.rows(), out / "candidates.csv")
    plot_selection(selection, out / "selection.png")
    selection.save(out / "direction.safetensors")  # last: its presence means the rest is there
    c = selection.chosen
    print(
        f"refusal direction: block {c.layer}, position {c.position} (bypass {c.bypass:.2f}, "
        f"induce {c.induce:.2f}, KL {c.kl:.3f}; unedited refusal scores: harmful "
        f"{selection.baseline[0]:.2f}, harmless {selection.baseline[1]:.2f})"
    )
    if not selection.settings["any_eligible"]:
        print(f"pyattr: warning: no candidate met every criterion; this one fails: {c.filtered}")
    print(f"written: {out}/direction.safetensors, means.safetensors, candidates.csv, selection.png")
    return 0


def _probe(args) -> int:
    from .analysis import save_table
    from .masks import save_mask
    from .probe import head_features, head_region, plot_probe, probe_heads, prompt_batches

    for flag, what in (("--harmful", "harmful prompts"), ("--harmless", "harmless prompts")):
        _toy_default(args, flag, what)
    out = Path(args.out)
    check_file_out(out / "probe.json", "out/probe.json")
    model, tok = model_of(args)
    features = [
        head_features(
            model,
            prompt_batches(
                tok,
                [e.prompt for e in _pairs(args, which)],
                system_prompt=args.system_prompt,
                batch_size=args.batch_size,
            ),
        )
        for which in ("harmful", "harmless")
    ]
    probe = probe_heads(*features, test_fraction=args.test_fraction, seed=args.seed)
    save_table(probe.rows(), out / "probe.csv")
    plot_probe(probe, out / "probe.png")
    if args.top_heads:
        heads = probe.top(args.top_heads)
        save_mask(
            head_region(model, heads),
            out / "heads.mask.safetensors",
            model_id=args.model,
            options={"heads": heads},
        )
        print(f"top {len(heads)} heads (block, head): {heads}; mask: {out}/heads.mask.safetensors")
    probe.save(out / "probe.json")
    best = probe.top(1)[0]
    print(
        f"best head: block {best[0]}, head {best[1]} (held-out accuracy "
        f"{float(probe.accuracy[best]):.3f} on {probe.n_test}); written: {out}/probe.json, "
        "probe.csv, probe.png"
    )
    return 0


def add_commands(commands, common) -> None:
    """Register ``direction`` and ``probe`` on the subparsers, with the shared options."""
    import argparse

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--harmful", help="safety pairs: harmful prompts with refusals (CSV/JSONL)")
    data.add_argument("--harmless", help="utility pairs: ordinary prompts with answers")
    data.add_argument("--prompt-column", default="prompt")
    data.add_argument("--response-column", default="response")
    data.add_argument("--n", type=int, help="sample this many pairs of each set")
    data.add_argument("--system-prompt", help="system prompt of the chat format (default none)")
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)

    p = commands.add_parser(
        "direction",
        parents=[common, data],
        help="the refusal direction: find it, or orthogonalise it out of the weights",
        description="find: difference of mean residual activations (harmful − harmless) at "
        "every block and post-instruction position, judged on held-out prompts (refusal score "
        "after ablation, induced refusal after addition, KL on harmless prompts). apply: the "
        "direction projected out of every weight writing to the residual stream.",
    )
    p.add_argument("action", choices=["find", "apply"])
    p.add_argument("--prefix", nargs="+", help="refusal openings (default: from the responses)")
    p.add_argument("--positions", type=int, help="last prompt tokens to try (default: template)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="held out for selection")
    p.add_argument("--max-layer-fraction", type=float, default=0.8)
    p.add_argument("--kl-threshold", type=float, default=0.1)
    p.add_argument("--direction", help="apply: direction.safetensors from direction find")
    p.add_argument("--random-seed", type=int, help="apply: a random direction of the same norm")
    p.add_argument("--out", required=True, help="find: folder; apply: model folder")
    p.set_defaults(run=_direction)

    p = commands.add_parser(
        "probe",
        parents=[common, data],
        help="head probing: a linear probe per attention head, harmful vs harmless",
    )
    p.add_argument("--test-fraction", type=float, default=0.3, help="held out per class")
    p.add_argument("--top-heads", type=int, help="write a mask of the k best heads' weights")
    p.add_argument("--out", required=True, help="folder for probe.json, .csv, .png")
    p.set_defaults(run=_probe)
