"""The ``pyattr`` command: one subcommand per stage, each reading and writing the others' files.

    pyattr demo                                   # the paper on the toy model, with a report
    pyattr calibrate --data safety.csv --out safety.stats.safetensors
    pyattr mask --safety safety.stats... --utility utility.stats... --q 0.05 --p 0.05 --out m
    pyattr prune --mask m.mask.safetensors --out pruned/           # a model folder
    pyattr lowrank eigen --stats safety.stats... --out safety.eigen.safetensors
    pyattr lowrank edit --safety safety.eigen... --utility utility.eigen... --keep-u 16 ...
    pyattr eval asr --model pruned/ --variants vanilla adv_decoding --out asr/
    pyattr eval utility --model pruned/ --tasks boolq rte --limit 200 --out utility.json
    pyattr analyze --safety ... --utility ... --out overlap/          # tables and heat maps
    pyattr finetune --n 32 --frozen m.mask.safetensors --out attacked/   # frozen fine-tuning
    pyattr rewind --model attacked/ --mask m.mask.safetensors --source toy --out rewound/

``--model`` is a local Hugging Face folder, ``toy`` (the aligned toy model, the default) or
``toy:base``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str | None = None,
    *,
    device_map: str | None = None,
    offload_folder: str | None = None,
    max_memory: str | None = None,
):
    """(model, tokenizer) from ``toy``, ``toy:base`` or a local folder. ``device_map`` (a
    folder only): accelerate's placement ("auto", "balanced", "sequential", a JSON object or
    file of module → device, "cpu" or "disk"); weights placed on "cpu" or "disk" stay there
    and every edit runs layer by layer (``pyattr.offload``); ``max_memory``: per device,
    "0=70GiB,cpu=200GiB"; ``offload_folder``: where weights that must be re-saved for "disk"
    go (and pyattr's edited ones)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_map is None and (offload_folder or max_memory):
        raise SystemExit("pyattr: --offload-folder and --max-memory need --device-map")
    if spec in ("toy", "toy:aligned", "toy:base"):
        if device_map is not None:
            raise SystemExit("pyattr: --device-map is for model folders; the toy fits anywhere")
        from pyattr import toy

        stage = "base" if spec == "toy:base" else "aligned"
        return toy.load(stage, device=device, dtype=DTYPES[dtype])
    path = Path(spec)
    old = path.with_name(f".{path.name}.old")
    if not path.is_dir() and old.is_dir():
        raise SystemExit(
            f"pyattr: no model folder {path}: a write of it was interrupted, and the folder it "
            f"replaced is kept at {old}; rerun the command that writes {path}, or rename {old}"
        )
    if not path.is_dir():
        raise SystemExit(
            f"pyattr: no model folder {path} (give a local Hugging Face folder, 'toy' or "
            "'toy:base'; edited models are written by `pyattr prune` and `pyattr lowrank edit`)"
        )
    _check_model_folder(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        else:
            placement = _placement(device_map, offload_folder, max_memory)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **placement)
        model.eval()
    except (OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"pyattr: cannot load the model in {path}: {first}") from None
    from pyattr.models import check_finite

    check_finite(model, f"the model in {path}")
    return model, tokenizer


def _placement(device_map: str, offload_folder: str | None, max_memory: str | None) -> dict:
    """from_pretrained's placement arguments from the command line's strings."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise SystemExit(
            "pyattr: --device-map needs accelerate: pip install 'pyattr[scale]'"
        ) from None
    text = device_map.strip()
    if text.startswith("{") or text.endswith(".json"):
        try:
            source = text if text.startswith("{") else Path(text).read_text(encoding="utf-8")
            mapping = json.loads(source)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"pyattr: --device-map {device_map!r}: {exc}") from None
        if not isinstance(mapping, dict):
            raise SystemExit("pyattr: --device-map must be a JSON object of module -> device")
    elif text in ("auto", "balanced", "balanced_low_0", "sequential", "cpu"):
        mapping = text
    else:
        raise SystemExit(
            f"pyattr: --device-map {device_map!r}: give auto, balanced, balanced_low_0, "
            "sequential, cpu, or a JSON object or .json file of module -> device"
        )
    out: dict = {"device_map": mapping}
    if offload_folder:
        out["offload_folder"] = offload_folder
    if max_memory:
        from pyattr.plan import parse_bytes

        memory: dict = {}
        for part in max_memory.split(","):
            key, sep, size = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise SystemExit(f"pyattr: --max-memory {max_memory!r}: write DEVICE=SIZE,...")
            try:
                memory[int(key) if key.isdigit() else key] = parse_bytes(size)
            except ValueError as exc:
                raise SystemExit(f"pyattr: --max-memory: {exc}") from None
        out["max_memory"] = memory
    return out


def model_of(args, spec: str | None = None):
    """``load_model`` for ``spec`` (default: ``--model``) with the command's dtype and
    placement options."""
    return load_model(
        args.model if spec is None else spec,
        args.dtype,
        device_map=getattr(args, "device_map", None),
        offload_folder=getattr(args, "offload_folder", None),
        max_memory=getattr(args, "max_memory", None),
    )


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_model_folder(path: Path) -> None:
    """Say what a model folder lacks (config, weights, tokenizer files) before transformers
    would answer with a message about some other package."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer.model)")
    if missing:
        raise SystemExit(f"pyattr: {path} is not a complete model folder: no {', '.join(missing)}")


def is_toy(spec: str) -> bool:
    """Whether ``--model`` names the embedded toy (whose own data are the defaults)."""
    return spec in ("toy", "toy:aligned", "toy:base")


def _from_toy(spec: str) -> bool:
    """The toy, or a folder pyattr wrote from it (its config names the toy's prompts)."""
    if is_toy(spec):
        return True
    config = Path(spec) / "config.json"
    try:
        return "pyattr_harmful_prompts" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _toy_default(args, flag: str, what: str) -> None:
    """A data argument may be left out only for the toy model (or a copy pyattr edited), whose
    own data fill in."""
    if getattr(args, flag.lstrip("-").replace("-", "_")) is None and not _from_toy(args.model):
        raise SystemExit(f"pyattr: {flag} is needed ({what}); only the toy model has defaults")


def _content_digest(path: str | None) -> str | None:
    """What identifies an input file for the sweep's digest: its bytes for files up to 64 MiB
    (prompts, suffixes, texts, pairs: edited in place, they differ), size and modification time
    for larger ones (statistics of a 7B model are ~22 GB; a new calibration rewrites the file).
    A folder: the same over its files. None for no file."""
    if path is None:
        return None
    import hashlib

    digest, root = hashlib.sha256(), Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        if not file.exists():
            continue
        digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
        info = file.stat()
        if info.st_size > 64 << 20:
            digest.update(f"{info.st_size}:{info.st_mtime_ns}".encode())
            continue
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _stats(args, path: str, model):
    """Statistics for ``model`` from ``pyattr calibrate``'s file (the class check waived with
    --allow-other-model)."""
    import pyattr

    file = _need(path, "statistics", "calibrate")
    return pyattr.load_stats(file, model=model, allow_other_model=args.allow_other_model)


def _need(path: str | Path, what: str, command: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"pyattr: no {what} at {path}; make it with `pyattr {command}`")
    return path


MODEL_MARK = ".pyattr-model"  # in every model folder pyattr writes: it may replace those only


def check_file_out(out: str | Path | None, example: str) -> Path | None:
    """Refuse, before any work, a file output that is a folder (``--out .``) or lies under a
    file; ``example`` names a file that would do."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir():
        raise SystemExit(f"pyattr: --out {out} is a folder; give a file name, e.g. {example}")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise SystemExit(f"pyattr: --out {out}: {blocking} is a file, not a folder")
    return out


def check_model_out(out: str | Path, *sources: str | None) -> Path:
    """Refuse, before any work, an output folder that is one of the models read (``sources``)
    or a non-empty folder pyattr did not write: replacing it would lose what is there."""
    out = Path(out)
    if out.resolve() == Path.cwd().resolve() or not out.resolve().name:
        raise SystemExit(f"pyattr: --out {out} is the current folder; give a folder name")
    for source in sources:
        if source and Path(source).exists() and Path(source).resolve() == out.resolve():
            raise SystemExit(f"pyattr: --out {out} is the model it reads; choose another folder")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"pyattr: --out {out} is a file, not a model folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_MARK).exists():
        raise SystemExit(
            f"pyattr: --out {out} is a folder pyattr did not write and is not empty; choose "
            "another folder (pyattr replaces only model folders it wrote)"
        )
    return out


def save_model(model, tokenizer, out: str | Path, *sources: str | None) -> Path:
    """Save a model folder atomically: written beside it under a temporary name, then renamed
    into place; a folder pyattr wrote before is moved aside first and deleted last, so a kill at
    any moment leaves the old folder or the new one (or both, beside it), never neither."""
    out = check_model_out(out, *sources)
    tmp = out.with_name(f".{out.name}.partial")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    from pyattr.offload import has_offloaded

    # An offloaded model's shards are gathered in host memory: keep them small.
    shards = {"max_shard_size": "2GB"} if has_offloaded(model) else {}
    try:
        model.save_pretrained(tmp, **shards)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MARK).write_text("written by pyattr\n")
    except BaseException:  # a full disk, an interrupt: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _calibrate(args) -> int:
    _toy_default(args, "--data", "the calibration pairs")
    check_file_out(args.out, "safety.stats.safetensors")
    import pyattr
    from pyattr.data import load_pairs
    from pyattr.io import fingerprint

    model, tok = model_of(args)
    data = args.data
    if data is None:
        from pyattr import toy

        data = toy.data()[f"{args.toy_set}_calibration"]
    pairs = load_pairs(data, prompt_column=args.prompt_column, response_column=args.response_column)
    if args.n is not None:
        from pyattr.data import sample

        pairs = sample(pairs, args.n, args.seed, args.sampling)
    stats = pyattr.calibrate(
        model,
        tok,
        pairs,
        collect=tuple(args.collect),
        batch_size=args.batch_size,
        max_length=args.max_length,
        eos=not args.no_eos,
    )
    options = {"collect": args.collect, "data": str(data), "max_length": args.max_length}
    options["eos"] = not args.no_eos
    path = pyattr.save_stats(
        stats, args.out, model_id=args.model, data=fingerprint(pairs), options=options
    )
    print(f"statistics of {stats.samples} samples ({stats.tokens} counted tokens): {path}")
    return 0


def _mask(args) -> int:
    import pyattr
    from pyattr import scores
    from pyattr.masks import region

    if args.sequential:
        return _sequential_mask(args)
    if args.safety is None and scores.get(args.score).collect is not None:
        raise SystemExit(f"pyattr: --score {args.score} needs --safety statistics")
    check_file_out(args.out, "region.mask.safetensors")
    model, _ = model_of(args)
    safety = None
    if args.safety is not None:
        safety = _stats(args, args.safety, model)
    utility = None
    if args.utility is not None:
        utility = _stats(args, args.utility, model)
    mask, counts = region(
        model,
        safety,
        utility,
        score=args.score,
        q=args.q,
        p=args.p,
        granularity=args.granularity,
        largest=not args.bottom,
    )
    options = {k: getattr(args, k) for k in ("score", "q", "p", "granularity", "bottom")}
    path = pyattr.save_mask(mask, args.out, model_id=args.model, options=options)
    print(f"mask of {mask.sparsity()['overall']:.2%} of the weights: {path}")
    if counts:
        mean = sum(c.jaccard for c in counts.values()) / len(counts)
        print(f"mean Jaccard index of the two top sets: {mean:.3f}")
    return 0


def _sequential_mask(args) -> int:
    """mask --sequential: the released code's top-down pruning, from the data itself."""
    import pyattr
    from pyattr.data import load_pairs
    from pyattr.sequential import sequential_region

    if args.utility is not None or args.p is not None:
        raise SystemExit(
            "pyattr: --sequential takes top (or --bottom) regions, not set differences"
        )
    _toy_default(args, "--data", "the calibration pairs the blocks are pruned on")
    check_file_out(args.out, "region.mask.safetensors")
    if args.pruned_out is not None:
        check_model_out(args.pruned_out, args.model)
    model, tok = model_of(args)
    if args.data is None:
        from pyattr import toy

        args.data = str(toy.data()["safety_calibration"])
    try:
        mask = sequential_region(
            model,
            tok,
            load_pairs(args.data),
            score=args.score,
            q=args.q,
            largest=not args.bottom,
            granularity=args.granularity,
            batch_size=args.batch_size,
        )
    except ValueError as exc:
        raise SystemExit(f"pyattr: {exc}") from None
    options = {k: getattr(args, k) for k in ("score", "q", "granularity", "bottom", "data")}
    path = pyattr.save_mask(
        mask, args.out, model_id=args.model, options=options | {"sequential": True}
    )
    print(f"sequential mask of {mask.sparsity()['overall']:.2%} of the weights: {path}")
    if args.pruned_out is not None:
        print(f"the pruned model: {save_model(model, tok, args.pruned_out, args.model)}")
    return 0


def _prune(args) -> int:
    check_model_out(args.out, args.model, args.restore_from)
    import pyattr

    model, tok = model_of(args)
    mask = pyattr.load_mask(_need(args.mask, "mask", "mask"), model=model)
    if args.restore_from:
        source, _ = model_of(args, args.restore_from)
        pyattr.rewind(model, source, mask)
    else:
        pyattr.prune(model, mask)
    print(f"model folder: {save_model(model, tok, args.out, args.model, args.restore_from)}")
    return 0


def _rewind(args) -> int:
    if args.source is None:
        _toy_default(args, "--source", "the model to copy the weights from")
        args.source = "toy"
    check_model_out(args.out, args.model, args.source)
    import pyattr
    from pyattr.masks import Mask

    model, tok = model_of(args)
    mask = pyattr.load_mask(_need(args.mask, "mask", "mask"), model=model)
    if args.complement:
        mask = Mask({name: ~m for name, m in mask.masks.items()})
    source, _ = model_of(args, args.source)
    pyattr.rewind(model, source, mask)
    folder = save_model(model, tok, args.out, args.model, args.source)
    print(f"rewound {mask.sparsity()['overall']:.2%} of the weights; model folder: {folder}")
    return 0


def _finetune(args) -> int:
    _toy_default(args, "--data", "the harmful pairs to fine-tune on")
    check_model_out(args.out, args.model)
    import pyattr
    from pyattr.data import load_pairs
    from pyattr.finetune import finetune

    model, tok = model_of(args)
    if args.data is None:
        from pyattr.toy import attack_pairs

        pairs = attack_pairs()
    else:
        pairs = load_pairs(
            args.data, prompt_column=args.prompt_column, response_column=args.response_column
        )
    if args.n is not None:
        from pyattr.data import sample

        pairs = sample(pairs, args.n, seed=args.seed)
    frozen = None
    if args.frozen is not None:
        frozen = pyattr.load_mask(_need(args.frozen, "mask", "mask"), model=model)
    result = finetune(
        model,
        tok,
        pairs,
        frozen=frozen,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        lora_rank=args.lora_rank,
        seed=args.seed,
    )
    print(
        f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f} in {result['steps']} steps"
    )
    print(f"model folder: {save_model(model, tok, args.out, args.model)}")
    return 0


def _lowrank(args) -> int:
    import pyattr

    if args.action == "edit":
        check_model_out(args.out, args.model)
    elif args.stream:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise SystemExit(f"pyattr: --out {args.out} is a file; --stream writes a folder")
    else:
        check_file_out(args.out, "safety.eigen.safetensors")
    model, tok = model_of(args)
    if args.action == "eigen":
        stats = _stats(args, args.stats, model)
        dtype = getattr(torch, args.eigen_dtype) if args.eigen_dtype else None
        if args.stream:
            from pyattr.eigenstore import stream_eigenbases

            store = stream_eigenbases(model, stats, args.out, keep=args.keep, dtype=dtype)
            print(f"eigenbases of {len(store)} layers, one file each: {args.out}")
            return 0
        bases = pyattr.eigenbases(model, stats, keep=args.keep, dtype=dtype or torch.float64)
        print(f"eigenbases of {len(bases)} layers: {pyattr.save_eigenbases(bases, args.out)}")
        return 0
    safety = pyattr.load_eigenbases(_need(args.safety, "eigenbases", "lowrank eigen"), model=model)
    utility = None
    if args.utility is not None:
        utility = pyattr.load_eigenbases(
            _need(args.utility, "eigenbases", "lowrank eigen"), model=model
        )
    ranks = {k: getattr(args, k) for k in ("r", "r_u", "r_s", "keep_u", "keep_s")}
    report = pyattr.edit_ranks(
        model, args.mode, safety, utility, **{k: _rank(v) for k, v in ranks.items()}
    )
    folder = save_model(model, tok, args.out, args.model)
    print(f"removed {report.fraction:.2%} of the ranks; model folder: {folder}")
    return 0


def _rank(value: str | None) -> int | float | None:
    """A rank count ("16") or a fraction of R ("0.9" or "90%"), as ``pyattr.counts`` reads
    them; an int stays a count and a float a fraction in the points and files."""
    if value is None:
        return None
    from pyattr.counts import amount

    try:
        return amount(value, "rank").value
    except ValueError as exc:
        raise SystemExit(f"pyattr: {exc}") from None


def _judge(args):
    """--judge: "keyword", "released" (the released code's rule), "toy-exact", or "auto": the
    toy's exact judge on the toy's held-out prompts (the default prompts), whose compliance it
    knows exactly; the keyword judge on any other prompts."""
    from pyattr.evaluate import KeywordJudge

    choice = args.judge
    if choice == "auto":
        choice = "toy-exact" if args.prompts is None else "keyword"
    if choice != "keyword" and args.min_words is not None:
        raise SystemExit(f"pyattr: --min-words applies to --judge keyword only, not {choice}")
    if choice == "toy-exact":
        from pyattr.toy.judge import ExactJudge

        return ExactJudge()
    if choice == "released":
        return KeywordJudge.released()
    if choice == "keyword":
        return KeywordJudge(min_words=args.min_words)
    return _model_judge(args, choice)


_LOADED: dict = {}


def _model_judge(args, spec: str):
    """A judge by spec, loaded once per process (a sweep measures many points with it)."""
    from pyattr.evaluate.judges import load_judge

    template = getattr(args, "judge_template", None)
    key = (spec, template)
    if key not in _LOADED:
        text = Path(template).read_text(encoding="utf-8") if template else None
        try:
            _LOADED[key] = load_judge(spec, template=text)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"pyattr: --judge {spec}: {exc}") from None
    return _LOADED[key]


def _asr_options(args) -> dict:
    """attack_success's options from the eval and sweep arguments."""
    from pyattr.evaluate.asr import LLAMA2_SYSTEM_PROMPT, LLAMA2_SYSTEM_PROMPT_RELEASED

    released = getattr(args, "released_format", False)
    default = LLAMA2_SYSTEM_PROMPT_RELEASED if released else LLAMA2_SYSTEM_PROMPT
    return {
        "prompts": args.prompts,
        "variants": args.variants,
        "suffixes": args.suffixes,
        "judge": _judge(args),
        "system_prompt": None if args.no_system_prompt else args.system_prompt or default,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "bare_newline": released,
    } | (
        {"hf_options": {"cache": args.cache}}
        if getattr(args, "cache", "dynamic") != "dynamic"
        else {}
    )


def _limit(value: float | None) -> int | float | None:
    """--limit: documents per task, a count (10) or a fraction below 1 (0.1), as lm-eval
    takes it."""
    return int(value) if value is not None and value >= 1 else value


def _eval(args) -> int:
    if args.action == "utility":  # task names and their data, before the model is loaded
        from pyattr.evaluate import PAPER_TASKS, check_tasks

        check_file_out(args.out, "utility.json")
        check_tasks(args.tasks or PAPER_TASKS, args.include_path)
    model, tok = model_of(args)
    if args.action == "asr":
        from pyattr.evaluate import attack_success

        report = attack_success(model, tok, out=args.out, **_asr_options(args))
        for variant, value in report.asr.items():
            print(f"ASR {variant}: {value:.3f}")
        extra = [_model_judge(args, s) for s in args.extra_judges]
        if extra:
            from pyattr.evaluate.measure import judged_again
            from pyattr.io import atomic_write

            judged = judged_again(report, extra)
            for name, row in judged["judges"].items():
                asr = ", ".join(f"{v} {a:.3f}" for v, a in row["asr"].items())
                print(f"judge {name}: ASR {asr}; kappa vs the first {row['kappa']:.3f}")
            if args.out:
                text = json.dumps(judged, indent=1) + "\n"
                atomic_write(Path(args.out) / "judges.json", text)
        return 0
    from pyattr.evaluate import PAPER_TASKS, zero_shot

    result = zero_shot(
        model,
        tok,
        args.tasks or PAPER_TASKS,
        limit=_limit(args.limit),
        include_path=args.include_path,
        out=args.out,
    )
    for task, metrics in result["tasks"].items():
        print(f"{task}: acc {metrics['acc']:.4f}")
    print(f"mean accuracy: {result['mean_acc']:.4f}")
    return 0


def _analyze(args) -> int:
    import pyattr
    from pyattr.analysis import heatmap, jaccard, overlap_table, save_table, similarities
    from pyattr.masks import region

    if (args.r_u is None) != (args.r_s is None):
        raise SystemExit("pyattr: give both --r-u and --r-s for the subspace similarity")
    model, _ = model_of(args)
    out = Path(args.out)
    safety = _stats(args, args.safety, model)
    utility = _stats(args, args.utility, model)
    _, counts = region(model, safety, utility, score=args.score, q=args.q, p=args.p)
    tables = {"jaccard": (overlap_table(jaccard(counts), model), f"Jaccard index, top {args.q:g}")}
    if args.r_u is not None:
        bases = _bases(args, model) or [pyattr.eigenbases(model, s) for s in (safety, utility)]
        values = similarities(bases[1], bases[0], _rank(args.r_u), _rank(args.r_s))
        tables["subspace"] = (overlap_table(values, model), "subspace similarity")
    for name, (rows, title) in tables.items():
        save_table(rows, out / f"{name}.csv")
        save_table(rows, out / f"{name}.json")
        heatmap(rows, out / f"{name}.png", title=title)
        print(f"{name}: {out / name}.csv, .json, .png")
    if args.direction or args.probe:
        _overlap_map(args, model, counts, safety, utility, out)
    return 0


def _overlap_map(args, model, counts, safety, utility, out: Path) -> None:
    """analyze --direction/--probe: the overlap map of every lens, block by block."""
    import pyattr
    from pyattr.analysis import chance_jaccard, jaccard, save_table
    from pyattr.overlap import overlap_map, plot_overlap

    options: dict = {"jaccard": jaccard(counts), "jaccard_chance": chance_jaccard(counts, model)}
    if args.direction:
        from pyattr.direction import load_selection

        selection = load_selection(_need(args.direction, "refusal direction", "direction find"))
        bases = _bases(args, model) or [pyattr.eigenbases(model, s) for s in (safety, utility)]
        options |= {
            "direction": selection.direction,
            "direction_layer": selection.chosen.layer,
            "safety_bases": bases[0],
            "utility_bases": bases[1],
            "r": int(args.overlap_r),
        }
    if args.probe:
        from pyattr.probe import HeadProbe

        options["probe"] = HeadProbe.load(_need(args.probe, "head probe", "probe"))
    rows = overlap_map(model, **options)
    save_table(rows, out / "overlap_map.csv")
    title = f"one overlap map ({args.score}, top {args.q:g} vs {args.p:g}"
    title += f"; top {args.overlap_r} ranks)" if args.direction else ")"
    plot_overlap(rows, out / "overlap_map.png", title=title)
    print(f"overlap map: {out}/overlap_map.csv, .png")


def _pairs(values: list[str] | None, names: tuple[str, str], parse) -> list[dict]:
    """Parameter dicts from "A,B" arguments."""
    out = []
    for value in values or []:
        try:
            a, b = (parse(v) for v in value.split(","))
        except ValueError:
            raise SystemExit(f"pyattr: {value!r} is not a pair like 0.05,0.05") from None
        out.append(dict(zip(names, (a, b), strict=True)))
    return out


def _second_judge(args):
    """On the toy's own prompts, the other of the exact and keyword judges re-judges the same
    responses (the report shows their agreement); elsewhere the one a preset names (``pyattr
    paper``: the other keyword rule), or none."""
    extra = [_model_judge(args, s) for s in getattr(args, "extra_judges", [])]
    if getattr(args, "second_judge", None) is not None:
        return [args.second_judge, *extra]
    if args.prompts is not None:
        return extra or None
    from pyattr.evaluate import KeywordJudge
    from pyattr.toy.judge import ExactJudge

    default = KeywordJudge() if _judge(args).name == "toy-exact" else ExactJudge()
    return [default, *extra]


def _measurement(args, tok, toy_model: bool):
    """What each sweep point measures: ASR with the eval options, the second judge on the
    toy's prompts, utility by lm-eval tasks (or the toy's own task on the toy), perplexity."""
    from pyattr.evaluate import Measurement

    utility = None
    if args.tasks:
        from pyattr.evaluate import zero_shot

        def utility(m):
            return zero_shot(
                m, tok, args.tasks, limit=_limit(args.limit), include_path=args.include_path
            )["mean_acc"]

    elif toy_model:
        from pyattr.toy.measure import utility_accuracy
        from pyattr.toy.recipe import Recipe, make_splits

        items = make_splits(Recipe()).utility_eval

        def utility(m):
            return utility_accuracy(m, tok, items)

    return Measurement(
        tok, _asr_options(args), second_judge=_second_judge(args), utility=utility, text=args.text
    )


def _bases(args, model) -> list | None:
    """Eigenbases cached by ``pyattr lowrank eigen`` (--safety-eigen, --utility-eigen), or
    None: the sweep then computes them from the statistics' covariances when a point needs
    them."""
    import pyattr

    given = [args.safety_eigen, getattr(args, "utility_eigen", None)]
    if given[0] is None and given[1] is None:
        return None
    if given[0] is None or given[1] is None:
        raise SystemExit("pyattr: give both --safety-eigen and --utility-eigen, or neither")
    return [
        pyattr.load_eigenbases(_need(g, "eigenbases", "lowrank eigen"), model=model) for g in given
    ]


def _sweep_points(args) -> list:
    """The sweep's points from its arguments, in the vocabulary of ``pyattr.edits``."""
    from pyattr.edits import is_control
    from pyattr.sweep import Point, draws_of

    freeze_control = bool(args.finetune) and "random_weights" in args.frozen
    if args.control_draws > 1 and not (args.controls or freeze_control):
        raise SystemExit(
            "pyattr: --control-draws draws the random controls: add --controls (or --frozen "
            "random_weights with --finetune)"
        )
    points = [Point("none")]
    score = {"score": args.score}
    points += [Point("top", score | {"q": q}) for q in args.top or []]
    for pq in _pairs(args.set_difference, ("p", "q"), float):
        points.append(Point("set_difference", score | pq))
        if args.controls:
            points += draws_of(Point("random_weights", score | pq), args.control_draws)
    points += [Point("actsvd_remove", {"r": _rank(r)}) for r in args.actsvd or []]
    points += [Point("actsvd_keep", {"r": _rank(r)}) for r in args.actsvd_keep or []]
    for ranks in _pairs(args.orthogonal, ("r_u", "r_s"), _rank):
        points.append(Point("orthogonal", ranks))
        if args.controls:
            points += draws_of(Point("random_ranks", ranks), args.control_draws)
    for attack in _pairs(args.finetune, ("n", "steps"), int):
        for frozen in args.frozen:
            region = {"frozen": frozen}
            if frozen != "none":
                p, q = _pairs([args.frozen_pq], ("p", "q"), float)[0].values()
                region |= score | {"q": q}
                region |= {"p": p} if frozen in ("set_difference", "random_weights") else {}
            point = Point("finetune", attack | region)
            control = is_control(point.edit, point.params)  # the freeze's: drawn as the others
            points += draws_of(point, args.control_draws) if control else [point]
    for pq in _pairs(args.rewind, ("p", "q"), float):
        points.append(Point("rewind", {"region": "set_difference"} | score | pq))
        if args.controls:  # as many random weights rewound: the rewind's control
            control = Point("rewind", {"region": "random_weights"} | score | pq)
            points += draws_of(control, args.control_draws)
    if args.direction:
        points.append(Point("direction"))
        if args.controls:
            points += draws_of(Point("random_direction"), args.control_draws)
    if len(points) == 1:
        raise SystemExit("pyattr: no sweep points: give --set-difference, --top, --orthogonal ...")
    for point in points:
        try:
            point.check()
        except ValueError as exc:
            raise SystemExit(f"pyattr: {exc}") from None
    return points


def _sweep(args) -> int:
    return _run_sweep(args, _sweep_points(args))


def _run_sweep(
    args, points: list, *, model=None, tok=None, notes: list[str] = (), calibration=None
) -> int:
    """The sweep of ``points`` with the sweep's arguments (``pyattr sweep`` and ``pyattr
    paper``): inputs checked, the results table resumed, each point measured, the report."""
    from pyattr.report import write_report
    from pyattr.sweep import Editor, ResultsTable, run_points

    toy_model = args.model.startswith("toy")
    if args.finetune and args.attack_data is None and not toy_model:
        raise SystemExit("pyattr: --finetune needs --attack-data (harmful prompt/response pairs)")
    if args.rewind and args.rewind_from is None:
        raise SystemExit("pyattr: --rewind needs --rewind-from (the model to copy weights from)")
    pairs = None
    if args.finetune:  # the attack's pairs, and whether every point's n fits, before any work
        from pyattr.data import load_pairs
        from pyattr.toy import attack_pairs

        # --attack-data, or on the toy model (checked above) the toy's own pairs
        pairs = load_pairs(args.attack_data) if args.attack_data else attack_pairs()
        largest = max(p.params["n"] for p in points if p.edit == "finetune")
        if largest > len(pairs):
            where = args.attack_data or "the toy's attack pairs"
            raise SystemExit(
                f"pyattr: --finetune asks for n={largest} pairs; {where} has {len(pairs)}"
            )
    if args.tasks:  # task names and their data, before the model is loaded or anything runs
        from pyattr.evaluate import check_tasks

        check_tasks(args.tasks, args.include_path)
    if model is None:
        model, tok = model_of(args)
    safety = _stats(args, args.safety, model)
    utility = _stats(args, args.utility, model)
    out = Path(args.out)
    config = {"model": args.model, "points": [p.key for p in points]}
    config |= {
        k: getattr(args, k)
        for k in (
            "safety",
            "utility",
            "safety_eigen",
            "utility_eigen",
            "variants",
            "suffixes",
            "samples",
            "max_new_tokens",
            "tasks",
            "include_path",
            "limit",
            "judge",
            "attack_data",
            "finetune_lr",
            "rewind_from",
            "system_prompt",
            "no_system_prompt",
            "min_words",
            "dtype",
            "batch_size",
            "backend",
            "score",
        )
    }
    # what changes a result is in the digest that guards resuming: files by their content,
    # the model by its weights (another checkpoint in the same folder is another sweep)
    from pyattr.evaluate.asr import model_fingerprint

    config["model_weights"] = model_fingerprint(model)
    for key in ("safety", "utility", "prompts", "suffixes", "text", "attack_data"):
        config[f"{key}_sha256"] = _content_digest(getattr(args, key, None))
    if getattr(args, "direction", None):  # only then: earlier sweeps' digests stay valid
        config["direction_sha256"] = _content_digest(args.direction)
    if getattr(args, "released_format", False):  # likewise
        config["released_format"] = True
    table = ResultsTable(out / "results.jsonl", config, overwrite=args.overwrite)
    threat = None
    if pairs is not None:
        from pyattr.sweep import Attack

        threat = Attack(tok, pairs, lr=args.finetune_lr)
    source = model_of(args, args.rewind_from)[0] if args.rewind else None
    direction = None
    if getattr(args, "direction", None):
        from pyattr.direction import load_selection

        found = load_selection(_need(args.direction, "refusal direction", "direction find"))
        direction = found.direction
    editor = Editor(
        model,
        safety,
        utility,
        attack=threat,
        source=source,
        bases=_bases(args, model),
        direction=direction,
        calibration=calibration,
    )
    measure = _measurement(args, tok, toy_model)
    try:
        rows = run_points(editor, points, table, measure)
    finally:
        measure.close()
    report_config = config | ({"notes": list(notes)} if notes else {})
    path = write_report(out, rows, report_config)
    from pyattr.report import markdown_table, summary_rows

    print(markdown_table(summary_rows(rows)))
    print(f"\nreport: {path}")
    return 0


def _demo(args) -> int:
    from pyattr.demo import run_demo

    if args.extra_judges or args.judge not in ("auto", "toy-exact", "keyword"):
        raise SystemExit(
            "pyattr: the demo takes one --judge, toy-exact (the default) or keyword (the other "
            "re-judges the same responses); model judges go with eval and sweep"
        )
    judge = "toy-exact" if args.judge == "auto" else args.judge
    path = run_demo(
        args.out,
        quick=args.quick,
        draws=args.control_draws,
        overwrite=args.overwrite,
        progress=not args.quiet,
        judge=judge,
    )
    results = json.loads((path.parent / "results.json").read_text())
    from pyattr.report import markdown_table, summary_rows

    print(markdown_table(summary_rows(results["results"])))
    print(f"\nreport: {path}")
    return 0


def _report(args) -> int:
    from pyattr.io import read_log
    from pyattr.report import write_report

    source = _need(args.results, "results table", "demo")
    header, rows = read_log(source)  # a last line cut by an interruption is dropped
    config = header.get("config", {})
    overlap, lenses = {}, None
    written = source.parent / "results.json"
    if written.is_file():  # keep what only the finished run knew: overlap tables, timings
        try:
            previous = json.loads(written.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
        titles = previous.get("overlap_titles", {})
        overlap = {n: (t, titles.get(n, n)) for n, t in previous.get("overlap", {}).items()}
        config = previous.get("config", config)
        lenses = previous.get("lenses")
    path = write_report(args.out or source.parent, rows, config, overlap, lenses)
    print(f"report: {path}")
    return 0


def _data(args) -> int:
    """pyattr data list | fetch | path | safety | utility."""
    from pyattr import sources

    registry = sources.load_registry(args.registry)
    if args.action == "list":
        print("| name | used as | cached | format | license | published at |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in sources.listing(args.data_dir, registry):
            s = row.source
            cached = "yes" if row.path else "no"
            where = s.url or s.how
            print(f"| {s.name} | {s.used_as} | {cached} | {s.format} | {s.license} | {where} |")
        return 0
    if args.action in ("fetch", "path"):
        names = list(registry) if args.all else args.names
        if not names:
            raise SystemExit(f"pyattr: name the data sets to {args.action}, or give --all")
        failed = []
        for name in names:
            source = sources.find(name, registry)
            if args.action == "path":
                print(sources.path_of(name, args.data_dir, registry))
                continue
            if source.url is None:
                print(f"{name}: not published; {source.how}")
                continue
            try:
                path = sources.fetch(
                    name,
                    folder=args.data_dir,
                    mirror=args.mirror,
                    sha256=args.sha256,
                    force=args.force,
                    registry=registry,
                    progress=True,
                )
            except sources.FetchError as exc:
                failed.append(source)
                print(f"pyattr data fetch: {exc}", file=sys.stderr)
                continue
            print(f"{name}: {path}")
        if failed:
            folder = Path(args.data_dir) if args.data_dir else sources.data_dir()
            print(sources.missing_message(failed, [folder]), file=sys.stderr)
            return 2
        return 0
    return _make_set(args, registry)


def _prompt_file(spec: str, registry, data_dir: str | None) -> Path:
    """A prompt or pair file: a path, or the name of a registry data set (fetched before)."""
    from pyattr import sources

    return (
        Path(spec)
        if Path(spec).exists() or spec not in registry
        else sources.path_of(spec, data_dir, registry)
    )


def _make_set(args, registry) -> int:
    """pyattr data safety | utility: a calibration set made by the model itself."""
    from pyattr.data import load_prompts, sample
    from pyattr.evaluate import KeywordJudge
    from pyattr.ownsets import make_set, save_pairs

    if args.prompts is None:
        raise SystemExit(f"pyattr: data {args.action} needs --prompts (a file or a data set name)")
    out = check_file_out(args.out, f"{args.action}.csv")
    if out is None:
        raise SystemExit(f"pyattr: data {args.action} needs --out FILE.csv")
    path = _prompt_file(args.prompts, registry, args.data_dir)
    column = args.column or ("goal" if args.action == "safety" else "prompt")
    prompts = load_prompts(path, column=column)
    if args.n is not None:
        prompts = sample(prompts, min(args.n, len(prompts)), args.seed)
    judge = KeywordJudge.released() if args.judge == "released" else KeywordJudge()
    model, tok = model_of(args)
    made = make_set(
        model,
        tok,
        prompts,
        keep="refusals" if args.action == "safety" else "answers",
        judge=judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
    )
    if not made.pairs:
        raise SystemExit(
            f"pyattr: none of the {made.total} responses was kept as {made.keep} by the "
            f"{judge.name} judge; nothing written"
        )
    save_pairs(made.pairs, out)
    if args.dropped:
        save_pairs(made.dropped, check_file_out(args.dropped, "dropped.csv"))
    print(f"{args.action} set: {made.summary()} ({judge.name} judge) -> {out}")
    return 0


def _paper_data(args, registry, strict: bool = True) -> dict[str, Path | None]:
    """The preset's four files (prompts, safety and utility pairs, suffixes): a path, or a
    registry name looked up in --data-dir and the cache; every missing one named at once
    (``strict``), else left None (the dry run says what is missing)."""
    from pyattr import paper, sources

    given = {
        "prompts": args.prompts,
        "safety": args.safety_data,
        "utility": args.utility_data,
        "suffixes": args.suffixes,
    }
    files, missing = {}, []
    for role, default in paper.DATA.items():
        spec = given[role] or default
        if Path(spec).exists():
            files[role] = Path(spec)
        elif spec in registry:
            try:
                files[role] = sources.path_of(spec, args.data_dir, registry)
            except sources.DataMissingError:
                missing.append(registry[spec])
                files[role] = None
        else:
            raise SystemExit(f"pyattr: {role} {spec!r} is neither a file nor a registry data set")
    if missing:
        places = ([Path(args.data_dir)] if args.data_dir else []) + [sources.data_dir()]
        message = sources.missing_message(missing, places)
        if strict:
            raise SystemExit("pyattr: " + message)
        print(message + "\n")
    return files


def _paper_preset(args):
    from pyattr import paper

    pairs = [tuple(p.values()) for p in _pairs(args.set_difference, ("p", "q"), float)]
    ranks = [tuple(r.values()) for r in _pairs(args.orthogonal, ("r_u", "r_s"), _rank)]
    return paper.with_overrides(
        paper.PAPER,
        samples=args.calibration_samples,
        scores=tuple(args.scores) if args.scores else None,
        top=tuple(args.top) if args.top is not None else None,
        set_difference=tuple(pairs) if args.set_difference is not None else None,
        orthogonal=tuple(ranks) if args.orthogonal is not None else None,
        controls=False if args.no_controls else None,
        control_draws=args.control_draws,
        variants=tuple(args.variants) if args.variants else None,
        decoding_samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        prompts_limit=(args.n_prompts or None) if args.n_prompts is not None else None,
        tasks=tuple(args.tasks) if args.tasks is not None else None,
        limit=args.limit,
        judge=args.judge,
        eos=True if args.eos else None,
        sampling=args.sampling,
        sequential=args.sequential,
    )


def _paper(args) -> int:
    """pyattr paper: the paper's experiment, from the data to the report, resumable."""
    import pyattr
    from pyattr import paper, sources
    from pyattr.data import load_pairs, load_prompts, sample
    from pyattr.evaluate import KeywordJudge
    from pyattr.io import atomic_write

    registry = sources.load_registry(args.registry)
    preset = _paper_preset(args)
    files = _paper_data(args, registry, strict=not args.dry_run)
    try:
        points = paper.preset_points(preset)
    except ValueError as exc:
        raise SystemExit(f"pyattr: {exc}") from None
    if args.dry_run:
        return _paper_dry_run(args, preset, points, files)
    prompts = load_prompts(files["prompts"], column=args.prompt_column)
    prompts = prompts[: preset.prompts_limit] if preset.prompts_limit else prompts
    suffixes = json.loads(files["suffixes"].read_text(encoding="utf-8"))
    if args.tasks is None and preset.tasks:  # task names and their data, before the model
        from pyattr.evaluate import check_tasks

        check_tasks(list(preset.tasks), args.include_path)
    model, tok = model_of(args)
    paths = paper.statistics_paths(args.out)
    calibration = {}
    for role in ("safety", "utility"):
        pairs = load_pairs(files[role])
        pairs = sample(pairs, min(preset.samples, len(pairs)), args.seed, preset.sampling)
        calibration[role] = pairs  # the sequential points calibrate on the same sample
        if paths[role].exists():
            continue
        print(f"{role}: calibrating on {len(pairs)} pairs of {files[role]}")
        stats = pyattr.calibrate(model, tok, pairs, collect=preset.collect, eos=preset.eos)
        pyattr.save_stats(stats, paths[role])
    ranks = any(p.edit in ("orthogonal", "random_ranks") for p in points)
    for role in ("safety", "utility") if ranks else ():
        if not paths[f"{role}_eigen"].exists():
            stats = pyattr.load_stats(paths[role], model=model)
            pyattr.save_eigenbases(pyattr.eigenbases(model, stats), paths[f"{role}_eigen"])
    atomic_write(paths["prompts"], "\n".join(prompts) + "\n")
    sweep = argparse.Namespace(**vars(args))
    sweep.__dict__.update(
        safety=str(paths["safety"]),
        utility=str(paths["utility"]),
        safety_eigen=str(paths["safety_eigen"]) if ranks else None,
        utility_eigen=str(paths["utility_eigen"]) if ranks else None,
        prompts=str(paths["prompts"]),
        suffixes=str(files["suffixes"]) if "adv_suffix" in preset.variants else None,
        variants=list(preset.variants),
        samples=preset.decoding_samples,
        max_new_tokens=preset.max_new_tokens,
        tasks=list(preset.tasks) or None,
        limit=preset.limit,
        judge=preset.judge,
        min_words=None,
        score=",".join(preset.scores),
        finetune=None,
        attack_data=None,
        finetune_lr=None,
        rewind=None,
        rewind_from=None,
        second_judge=KeywordJudge.released() if preset.judge == "keyword" else KeywordJudge(),
    )
    eos = "counted" if preset.eos else "not counted, as in the released code"
    notes = [
        f"The paper preset: {len(points)} points from one calibration of {preset.samples} "
        f"pairs per set ({', '.join(preset.collect)}; EOS {eos}).",
        f"Data: prompts {files['prompts']} ({len(prompts)} used), safety {files['safety']}, "
        f"utility {files['utility']}, suffixes {files['suffixes']} ({len(suffixes)}).",
        f"ASR judged by the {'released code' if preset.judge == 'released' else preset.judge} "
        "keyword rule; the other keyword rule re-judges the same responses (agreement, Cohen's "
        "kappa). Keyword judges alone are weak evidence: a model judge is the stronger check.",
        "Grids are pyattr's (the paper's regions of ~3% of weights and ~2.5% of ranks, and the "
        "released README's settings); ranks are fractions of each layer's R.",
        "Prompts as the released code wrote them (Llama-2's system prompt with one space "
        "between its paragraphs, bare Adv-Decoding prompts ending in a newline)"
        if args.released_format
        else "Prompts in pyattr's format (Llama-2's system prompt as published, with a blank "
        "line between its paragraphs; bare prompts as they are)",
        f"Calibration rows drawn by {preset.sampling}'s sampling (seed {args.seed})"
        + (
            ": shuffle(seed).select(range(n)), as the released code"
            if preset.sampling == "datasets"
            else ""
        ),
    ]
    if files["safety"].name == "safety-short.csv":
        notes.append(
            "The safety set is the released short set of Llama-2-7b-chat's refusals: for "
            "another model, make its own with `pyattr data safety --model M`."
        )
    if any(p.params.get("sequential") for p in points):
        notes.append(
            "Wanda's top-q points prune block by block as the released code did (each block's "
            "statistics after the blocks above it were pruned); SNIP's and every set "
            "difference are one pass from the unedited model (--no-sequential: all one pass)."
        )
    return _run_sweep(
        sweep, points, model=model, tok=tok, notes=notes, calibration=(tok, calibration["safety"])
    )


def _paper_dry_run(args, preset, points, files) -> int:
    """What the preset will do, before anything runs: grid, data, memory plan, predicted time
    (with the AdvBench sizes where a file is not there yet)."""
    from pyattr import paper
    from pyattr.capacity import Machine, Settings, plan_run
    from pyattr.data import load_pairs, load_prompts
    from pyattr.plan import format_bytes, parse_bytes

    print(f"grid: {len(points)} points")
    for point in points:
        print(f"  {point.key}")
    print("data:")
    prompts, suffixes = 520, 3  # AdvBench and the GCG suffixes, until the files are there
    if files["prompts"] is not None:
        prompts = len(load_prompts(files["prompts"], column=args.prompt_column))
    prompts = min(prompts, preset.prompts_limit or prompts)
    print(f"  prompts   {files['prompts'] or 'missing'}: {prompts} used")
    for role in ("safety", "utility"):
        if files[role] is None:
            print(f"  {role:9s} missing: {preset.samples} would be sampled")
            continue
        n = len(load_pairs(files[role]))
        print(f"  {role:9s} {files[role]}: {n} pairs, {min(n, preset.samples)} sampled")
    if files["suffixes"] is not None:
        suffixes = len(json.loads(files["suffixes"].read_text(encoding="utf-8")))
    print(f"  suffixes  {files['suffixes'] or 'missing'}: {suffixes}")
    folder = args.model
    if is_toy(args.model):
        from pyattr import toy

        folder = toy.build(progress=False) / ("base" if args.model == "toy:base" else "aligned")
    machine = Machine(gpus=args.gpus, gpu_memory=parse_bytes(GPU_MEMORY[args.gpu]))
    settings = Settings(
        dtype=DTYPES[args.dtype] if args.dtype != "float32" else DTYPES["bfloat16"],
        collect=preset.collect,
        samples=preset.samples,
        new_tokens=preset.max_new_tokens,
        prompts=prompts,
    )
    plan = plan_run(folder, machine, settings)
    print(f"\nmemory plan ({args.gpus} × {args.gpu}):\n")
    print(plan.describe())
    batch = plan.facts.get("generation_batch") or 1
    times = paper.predicted_seconds(
        preset,
        parameters=plan.parameters,
        weight_bytes=plan.facts["weights"],
        prompts=prompts,
        suffixes=suffixes,
        batch=batch,
        points=len(points),
        gpu=args.gpu,
        gpus=max(args.gpus, 1),
        tensor_parallel=args.backend == "vllm",
    )
    how = "vLLM, tensor parallel" if args.backend == "vllm" else "one process, device_map"
    print(f"\npredicted time on {args.gpus} × {args.gpu} ({how}; a prediction, not a measurement):")
    short = [s.name for s in plan.stages if not s.fits and s.name == "generation"]
    for stage, seconds in times.items():
        if short and stage != "calibration":
            print(f"  {stage:22s}      n/a (generation does not fit on this machine)")
        else:
            print(f"  {stage:22s} {seconds / 60:8.1f} min")
    if preset.controls and not short:
        print(_controls_cost(points, preset.control_draws, times))
    print(f"weights {format_bytes(plan.facts['weights'])}; nothing was run")
    return 0


def _controls_cost(points, draws: int, times: dict[str, float]) -> str:
    """What the random controls cost and what their draws buy: one draw is a sample, which the
    report cannot give a range; each further draw is a full evaluation of every control."""
    from pyattr import edits

    drawn = sum(edits.get(p.edit).control_of is not None for p in points)
    controls = drawn // draws
    minutes = controls * (times["generation per point"] + times["utility per point"]) / 60
    if draws == 1:
        return (
            f"controls: {controls} random controls, one draw each, so the report gives no range "
            f"for them; each further draw (--control-draws N) adds {controls} points, "
            f"{minutes:.1f} min predicted"
        )
    return (
        f"controls: {controls} random controls, {draws} draws each ({drawn} points, "
        f"{draws * minutes:.1f} min of the total predicted); the report gives each its mean "
        "and range"
    )


GPU_MEMORY = {  # nominal memory per GPU of the common kinds; --gpu-memory gives the exact size
    "h100": "80GiB",
    "h200": "141GB",
    "a100": "80GiB",
    "a100-40": "40GiB",
    "l40s": "48GB",
}


def _plan(args) -> int:
    from pyattr.capacity import Machine, Settings, plan_run, save_plan
    from pyattr.plan import parse_bytes

    try:
        machine = Machine(
            gpus=args.gpus,
            gpu_memory=parse_bytes(args.gpu_memory or GPU_MEMORY[args.gpu]),
            host_memory=parse_bytes(args.host_memory) if args.host_memory else None,
            processes=args.processes,
        )
    except ValueError as exc:
        raise SystemExit(f"pyattr: {exc}") from None
    settings = Settings(
        dtype=DTYPES[args.dtype],
        collect=tuple(args.collect),
        eigen_dtype={"float32": torch.float32, "float64": torch.float64}[args.eigen_dtype],
        keep=args.keep,
        samples=args.samples,
        max_length=args.max_length,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        prompts=args.prompts,
        batch=args.batch,
    )
    plan = plan_run(args.model, machine, settings)
    print(plan.describe())
    if args.out:
        save_plan(plan, args.out)
        print(f"plan: {args.out}")
    return 0 if all(stage.fits for stage in plan.stages) or not args.check else 1


def _batch(text: str) -> int | str:
    """--batch-size: a whole number >= 1, or "auto"."""
    return "auto" if text == "auto" else _positive(text)


def _draws_argument(
    parser, default: int | None = 1, said: str = "1: each draw is an ASR evaluation of the model"
) -> None:
    parser.add_argument(
        "--control-draws",
        type=_positive,
        default=default,
        help="draws of each random control (seeds 0, 1, ...), reported as their mean and range "
        f"(default {said})",
    )


def _positive(text: str) -> int:
    """An argument that counts something: a whole number >= 1, checked before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def _score_argument(parser) -> None:
    """``--score`` (once ``--method``), its choices and their meaning from the registry."""
    from pyattr import scores

    meaning = "; ".join(f"{n}: {scores.get(n).summary}" for n in scores.names())
    parser.add_argument(
        "--score",
        "--method",
        dest="score",
        choices=scores.names(),
        default="wanda",
        help=f"importance score ({meaning})",
    )


def _asr_parser(
    variants=("vanilla",),
    samples: int | None = 5,
    judge: str | None = "auto",
    released_format: bool = False,
):
    """What ASR means, declared once for every command that measures it (a new parser per
    command: argparse shares a parent's actions, so one command's defaults would leak into
    another's). ``None`` defaults leave the choice to a preset (``pyattr paper``), as does
    ``released_format`` (the preset formats prompts as the released code did)."""
    asr = argparse.ArgumentParser(add_help=False)
    asr.add_argument("--prompts", help="harmful prompts file (default: the toy held-out set)")
    asr.add_argument("--variants", nargs="+", default=list(variants) if variants else None)
    asr.add_argument("--suffixes", help="adversarial suffix file (adv_suffix)")
    asr.add_argument("--system-prompt", default=None, help="vanilla's (default: Llama-2's)")
    asr.add_argument("--no-system-prompt", action="store_true", help="vanilla without one")
    asr.add_argument("--samples", type=_positive, default=samples)
    asr.add_argument("--min-words", type=int, help="short responses count as refusals")
    _judge_argument(asr, judge)
    asr.add_argument("--max-new-tokens", type=_positive)
    asr.add_argument(
        "--batch-size",
        type=_batch,
        default=32,
        help="prompts per batch, or auto: the largest whose KV cache fits in free memory",
    )
    asr.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    asr.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="the hf backend's KV cache: static is compiled on a GPU (fewer kernel launches)",
    )
    asr.add_argument(
        "--released-format",
        action=argparse.BooleanOptionalAction,
        default=released_format,
        help="prompts as the released code wrote them: Llama-2's system prompt with its "
        "paragraphs joined by one space, bare-text (adv_decoding) prompts ending in a newline",
    )
    return asr


def _utility_parser():
    """What utility means: lm-eval tasks, documents per task, local task folders."""
    utility = argparse.ArgumentParser(add_help=False)
    utility.add_argument("--tasks", nargs="+", default=None, help="lm-eval tasks (utility)")
    utility.add_argument(
        "--limit", type=float, help="documents per task: a count, or a fraction below 1"
    )
    utility.add_argument("--include-path", help="folder of task YAMLs of your own (utility)")
    return utility


class _Judges(argparse.Action):
    """--judge SPEC [SPEC ...]: the first decides ASR (``args.judge``), the others re-judge the
    same responses (``args.extra_judges``); each is checked here, none is loaded."""

    def __call__(self, parser, namespace, values, option_string=None):
        from pyattr.evaluate.judges import check_judge_spec

        try:
            specs = [check_judge_spec(v) for v in values]
        except ValueError as exc:
            parser.error(str(exc))
        if "auto" in specs[1:]:
            parser.error("'auto' can only be the first judge")
        namespace.judge, namespace.extra_judges = specs[0], specs[1:]


def _judge_argument(parser, default: str | None = "auto") -> None:
    parser.add_argument(
        "--judge",
        nargs="+",
        action=_Judges,
        default=default,
        metavar="JUDGE",
        help="who decides an attack succeeded, and who else judges the same responses: auto "
        "(toy-exact on the toy's own prompts, the default, else keyword), keyword, released "
        "(the released code's phrases and under-20-words rule), toy-exact, or a model: "
        "classifier:PATH, llamaguard:PATH, harmbench:PATH, strongreject:PATH[@BASE] (a graded "
        "LoRA judge through peft); per-judge ASR and Cohen's kappa go in the results",
    )
    parser.add_argument(
        "--judge-template", help="a file with the prompt of a harmbench/strongreject judge"
    )
    parser.set_defaults(extra_judges=[])


def add_commands(commands) -> None:
    """Register the stage subcommands on an argparse subparsers object."""
    from pyattr.edits import REGIONS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="toy", help="local HF folder, 'toy' or 'toy:base'")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    placement = common.add_argument_group("models larger than the GPU (accelerate)")
    placement.add_argument(
        "--device-map",
        help="auto, balanced, sequential, cpu, or a JSON object/file of module -> device "
        "('cpu', 'disk', 0, ...): weights on cpu or disk stay there, edits run layer by layer",
    )
    placement.add_argument(
        "--max-memory", help="per device for --device-map, e.g. 0=70GiB,cpu=200GiB"
    )
    placement.add_argument(
        "--offload-folder", help="folder for weights offloaded to disk (and pyattr's edits of them)"
    )
    common.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use statistics made for another model class of the same shapes",
    )
    asr, utility = _asr_parser(), _utility_parser()
    eigen = argparse.ArgumentParser(add_help=False)
    eigen.add_argument("--safety-eigen", help="safety eigenbases from `pyattr lowrank eigen`")
    eigen.add_argument("--utility-eigen", help="utility eigenbases from `pyattr lowrank eigen`")

    p = commands.add_parser("demo", help="the paper on the toy model, with a report")
    p.add_argument("--out", default="pyattr-demo", help="report folder (default pyattr-demo)")
    p.add_argument("--quick", action="store_true", help="seven points, fewer prompts (about 30 s)")
    p.add_argument("--overwrite", action="store_true", help="replace results of another run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _draws_argument(p, None, "3; --quick: 1")
    _judge_argument(p)
    p.set_defaults(run=_demo)

    p = commands.add_parser("calibrate", parents=[common], help="statistics of a data set")
    p.add_argument("--data", help="CSV/JSON(L)/saved dataset of pairs (default: toy set)")
    p.add_argument("--toy-set", choices=["safety", "utility"], default="safety")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--n", type=_positive, help="sample this many pairs")
    p.add_argument("--seed", type=int, default=0, help="of the --n sample")
    p.add_argument(
        "--sampling",
        choices=["pyattr", "datasets"],
        default="pyattr",
        help="how --n rows are drawn: pyattr's (random.sample) or datasets' "
        "shuffle(seed).select(range(n)), the released code's",
    )
    p.add_argument(
        "--collect",
        nargs="+",
        default=["norms", "covariance"],
        choices=["norms", "covariance", "snip", "grad_sum"],
        help="statistics to gather: norms (wanda), covariance (ActSVD), snip (Σ|∂L_b/∂W|), "
        "grad_sum (Σ∂L_b/∂W, for snip_signed)",
    )
    p.add_argument("--batch-size", type=_positive, default=1)
    p.add_argument("--max-length", type=_positive)
    p.add_argument(
        "--no-eos",
        action="store_true",
        help="do not count the EOS token after each response (the released code's statistics)",
    )
    p.add_argument("--out", required=True, help="statistics file (.safetensors)")
    p.set_defaults(run=_calibrate)

    p = commands.add_parser("mask", parents=[common], help="a region from statistics")
    p.add_argument(
        "--safety", help="statistics from `pyattr calibrate` (not for --method magnitude)"
    )
    p.add_argument("--utility", help="utility statistics: the set difference")
    _score_argument(p)
    p.add_argument("--q", type=float, required=True, help="top fraction for safety")
    p.add_argument("--p", type=float, help="top fraction for utility (with --utility)")
    p.add_argument("--granularity", choices=["row", "matrix"], default="row")
    p.add_argument("--bottom", action="store_true", help="the least important instead")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="the released code's top-down mode: each block's statistics from --data after the "
        "blocks above it are pruned (wanda or magnitude; no --safety needed)",
    )
    p.add_argument("--data", help="--sequential: the pairs to calibrate on (default: the toy's)")
    p.add_argument("--batch-size", type=_positive, default=1, help="--sequential: per forward")
    p.add_argument("--pruned-out", help="--sequential: also save the pruned model folder")
    p.add_argument("--out", required=True, help="mask file (.safetensors)")
    p.set_defaults(run=_mask)

    p = commands.add_parser("prune", parents=[common], help="zero (or rewind) a masked region")
    p.add_argument("--mask", required=True, help="mask from `pyattr mask`")
    p.add_argument(
        "--restore-from", help="copy the masked entries from this model instead (= `rewind`)"
    )
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(run=_prune)

    p = commands.add_parser("finetune", parents=[common], help="a fine-tuning attack")
    p.add_argument("--data", help="pairs to fine-tune on (default: the toy's harmful pairs)")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--n", type=_positive, help="sample this many pairs")
    p.add_argument("--frozen", help="mask of the entries to keep bit for bit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-rank", type=int, help="LoRA through peft instead of full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(run=_finetune)

    p = commands.add_parser("rewind", parents=[common], help="restore masked entries")
    p.add_argument("--mask", required=True, help="mask from `pyattr mask`")
    p.add_argument("--source", help="the model to copy them from (default for the toy: toy)")
    p.add_argument("--complement", action="store_true", help="everything but the mask")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(run=_rewind)

    p = commands.add_parser("lowrank", parents=[common], help="eigenbases and rank edits")
    p.add_argument("action", choices=["eigen", "edit"])
    p.add_argument("--stats", help="statistics with covariance (eigen)")
    p.add_argument("--keep", type=int, help="eigenvectors to keep per layer (eigen)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="eigen: one file per layer into the --out folder as each finishes (host memory "
        "under twice one layer's basis); every --safety/--utility/--*-eigen takes the folder",
    )
    p.add_argument(
        "--eigen-dtype",
        choices=["float32", "float64"],
        help="eigen: float64 by default (streamed: float32 on a GPU)",
    )
    p.add_argument("--safety", help="safety eigenbases (edit)")
    p.add_argument("--utility", help="utility eigenbases (edit, orthogonal)")
    p.add_argument("--mode", choices=["remove", "keep", "orthogonal"], default="orthogonal")
    for name in ("r", "r-u", "r-s", "keep-u", "keep-s"):
        p.add_argument(f"--{name}", help="a count, or a fraction of R with a decimal point")
    p.add_argument("--out", required=True, help="eigenbasis file (eigen) or model folder (edit)")
    p.set_defaults(run=_lowrank)

    p = commands.add_parser("eval", parents=[common, asr, utility], help="ASR or zero-shot utility")
    p.add_argument("action", choices=["asr", "utility"])
    p.add_argument("--out", help="ASR folder or utility JSON file")
    p.set_defaults(run=_eval)

    p = commands.add_parser("analyze", parents=[common, eigen], help="overlap tables and heat maps")
    p.add_argument("--safety", required=True)
    p.add_argument("--utility", required=True)
    _score_argument(p)
    p.add_argument("--q", type=float, default=0.05)
    p.add_argument("--p", type=float, default=0.05)
    p.add_argument("--r-u", help="ranks for the subspace similarity (needs covariance)")
    p.add_argument("--r-s")
    p.add_argument("--direction", help="refusal direction (`pyattr direction find`): overlap map")
    p.add_argument("--probe", help="probe.json (`pyattr probe`): head accuracy in the overlap map")
    p.add_argument("--overlap-r", type=_positive, default=16, help="ranks of each subspace")
    p.add_argument("--out", required=True, help="folder for CSV, JSON and PNG")
    p.set_defaults(run=_analyze)

    p = commands.add_parser(
        "sweep",
        parents=[common, asr, utility, eigen],
        help="a grid of edits from one set of statistics",
        description="Evaluate a grid of edits from one set of statistics (and the eigenbases "
        "computed once from their covariances). Each point is appended to OUT/results.jsonl as "
        "it finishes; run the same command again to resume. Writes the report to OUT.",
    )
    p.add_argument("--safety", required=True, help="safety statistics (`pyattr calibrate`)")
    p.add_argument("--utility", required=True, help="utility statistics")
    _score_argument(p)
    p.add_argument("--top", nargs="+", type=float, help="top-q safety fractions")
    p.add_argument("--set-difference", nargs="+", help="p,q pairs, e.g. 0.02,0.02 0.05,0.05")
    p.add_argument("--actsvd", nargs="+", help="top safety ranks to remove")
    p.add_argument("--actsvd-keep", nargs="+", help="top safety ranks to keep (all others go)")
    p.add_argument("--orthogonal", nargs="+", help="r_u,r_s pairs (counts or fractions of R)")
    p.add_argument("--controls", action="store_true", help="a random control for each point")
    _draws_argument(p)
    p.add_argument("--finetune", nargs="+", help="fine-tuning attacks as n,steps pairs, e.g. 10,5")
    p.add_argument(
        "--frozen",
        nargs="+",
        choices=REGIONS,
        default=["none"],
        help="regions kept bit for bit in each attack (with --method and --frozen-pq); "
        "random_weights: as many random weights as the set difference, the freeze's control",
    )
    p.add_argument("--frozen-pq", default="0.05,0.05", help="p,q of the frozen region")
    p.add_argument("--attack-data", help="harmful pairs to fine-tune on (default: the toy's)")
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument(
        "--rewind",
        nargs="+",
        help="p,q pairs: rewind that set difference from --rewind-from (with --controls, as "
        "many random weights too)",
    )
    p.add_argument("--rewind-from", help="the model rewind points copy weights from")
    p.add_argument(
        "--direction", help="a refusal direction (`pyattr direction find`): orthogonalise it"
    )
    p.add_argument("--text", help="a text file: perplexity per point")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--out", required=True, help="folder for results and report")
    p.set_defaults(run=_sweep)

    p = commands.add_parser(
        "data",
        help="the paper's data sets: list, fetch, path; or make a set with the model itself",
        description="list: the registry (where each data set is published, its format and "
        "license); fetch NAME...: download, verify and cache; path NAME: where it is; safety / "
        "utility: a calibration set made by the model under study (its own refusals to "
        "harmful prompts, or its own answers to instructions).",
    )
    p.add_argument("action", choices=["list", "fetch", "path", "safety", "utility"])
    p.add_argument("names", nargs="*", help="data set names (fetch, path)")
    p.add_argument("--all", action="store_true", help="every data set of the registry")
    p.add_argument("--data-dir", help="folder of the data files (default: the cache)")
    p.add_argument("--registry", help="a JSON file of further registry entries")
    p.add_argument("--mirror", help="fetch URL/<file name> instead of the published address")
    p.add_argument("--sha256", help="the digest the download must have (fetch)")
    p.add_argument("--force", action="store_true", help="download again (fetch)")
    p.add_argument("--model", default="toy", help="the model that answers (safety, utility)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--prompts", help="prompts: a file or a data set name (safety, utility)")
    p.add_argument("--column", help="the prompt column (default goal for safety, else prompt)")
    p.add_argument("--n", type=_positive, help="sample this many prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", help="a system prompt for the model's answers")
    p.add_argument("--judge", choices=["keyword", "released"], default="keyword")
    p.add_argument("--max-new-tokens", type=_positive, default=256)
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--out", help="the CSV to write (safety, utility)")
    p.add_argument("--dropped", help="also write the responses not kept to this CSV")
    p.set_defaults(run=_data)

    p = commands.add_parser(
        "paper",
        parents=[
            common,
            _asr_parser(variants=None, samples=None, judge=None, released_format=True),
            _utility_parser(),
        ],
        help="the paper's experiment with its settings, from data to report (resumable)",
        description="Wei et al. (ICML 2024) on a model: calibration of a safety and a utility "
        "set, eigenbases, then a sweep of top-q, Wanda/SNIP set differences and orthogonal "
        "projections with random controls, ASR in three variants and zero-shot utility, and "
        "the report. Data are registry names (`pyattr data list`) or files. Rerun the same "
        "command to resume; --dry-run prints the grid, data, memory plan and a predicted time.",
    )
    p.add_argument("--out", required=True, help="folder for statistics, results and report")
    p.add_argument("--safety-data", help="safety pairs: a file or a data set name")
    p.add_argument("--utility-data", help="utility pairs: a file or a data set name")
    p.add_argument("--prompt-column", default="goal", help="of the prompts file (AdvBench: goal)")
    p.add_argument("--data-dir", help="folder of the data files (default: the cache)")
    p.add_argument("--registry", help="a JSON file of further registry entries")
    p.add_argument("--calibration-samples", type=_positive, help="pairs per set (128)")
    p.add_argument("--n-prompts", type=int, help="prompts used (100, as released; 0: all)")
    p.add_argument("--scores", nargs="+", choices=["wanda", "snip"], help="(both)")
    p.add_argument("--top", nargs="*", type=float, help="top-q fractions (0.01 0.03)")
    p.add_argument("--set-difference", nargs="*", help="p,q pairs (0.01,0.01 0.03,0.03 0.1,0.1)")
    p.add_argument("--orthogonal", nargs="*", help="r_u,r_s pairs (fractions of R)")
    p.add_argument("--no-controls", action="store_true", help="no random controls")
    _draws_argument(p)
    p.add_argument("--eos", action="store_true", help="count the EOS token after responses")
    p.add_argument("--text", help="a text file: perplexity per point")
    p.add_argument("--seed", type=int, default=0, help="of the calibration sample")
    p.add_argument(
        "--sampling",
        choices=["pyattr", "datasets"],
        help="how calibration rows are drawn (default datasets: shuffle(seed).select(range(n)),"
        " the released code's)",
    )
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Wanda's top-q points pruned block by block, as the released code (the default)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--gpus", type=int, default=1, help="for the plan and the prediction")
    p.add_argument("--gpu", choices=sorted(GPU_MEMORY), default="h100")
    p.set_defaults(run=_paper)

    p = commands.add_parser(
        "plan",
        help="what each stage will hold on each device, from config.json alone",
        description="Build the model on the meta device from its config.json (no weight is "
        "read) and print, per stage, what calibration, the eigenbases, editing and generation "
        "hold on the GPUs and the host, and what is done when something does not fit.",
    )
    p.add_argument("--model", required=True, help="a model folder or its config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on the machine (0: CPU only)")
    p.add_argument("--gpu", choices=sorted(GPU_MEMORY), default="h100", help="their kind")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (instead of --gpu)")
    p.add_argument("--host-memory", help="host memory, e.g. 1TB (checked when given)")
    p.add_argument("--processes", type=_positive, default=1, help="torchrun ranks")
    p.add_argument(
        "--collect",
        nargs="+",
        default=["norms", "covariance", "snip"],
        choices=["norms", "covariance", "snip", "grad_sum"],
    )
    p.add_argument("--eigen-dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--keep", type=_positive, help="eigenvectors kept per layer (default: all)")
    p.add_argument("--samples", type=_positive, default=128, help="calibration pairs per set")
    p.add_argument("--max-length", type=_positive, default=512, help="tokens per pair")
    p.add_argument("--prompt-length", type=_positive, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=_positive, default=256)
    p.add_argument("--prompts", type=_positive, default=520, help="harmful prompts (AdvBench)")
    p.add_argument("--batch", type=_positive, help="generation batch (default: largest that fits)")
    p.add_argument("--check", action="store_true", help="exit 1 when a stage does not fit")
    p.add_argument("--out", help="the plan as JSON")
    p.set_defaults(run=_plan)

    from .cli_lenses import add_commands as add_lenses

    add_lenses(commands, common)

    p = commands.add_parser("report", help="the report folder from a results table")
    p.add_argument("--results", required=True, help="results.jsonl of a demo or sweep")
    p.add_argument("--out", help="report folder (default: beside the results)")
    p.set_defaults(run=_report)
