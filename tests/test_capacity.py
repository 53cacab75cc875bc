"""``pyattr plan``: what each stage holds, from a config.json alone, against hand counts for the
real sizes of Llama-2-7B, Llama-3-8B (grouped-query attention), Qwen2.5-7B (q/k/v biases, untied
embeddings) and Llama-2-70B (issue 17 item 4, issue 19 item 5). Only configurations are
written: the models are built on the meta device, so the 70B plan allocates nothing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from pyattr.capacity import Machine, Settings, plan_run

GiB = 2**30

# name: (config, published parameter count)
REAL = {
    "llama-2-7b": (
        dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000, tied=False),
        6_738_415_616,
    ),
    "llama-3-8b": (
        dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256, tied=False),
        8_030_261_248,
    ),
    "qwen2.5-7b": (
        dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False),
        7_615_616_512,
    ),
    "llama-2-70b": (
        dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=32000, tied=False),
        68_976_648_192,
    ),
}


def write_config(folder, name: str) -> dict:
    c, _ = REAL[name]
    common = dict(
        hidden_size=c["hidden"],
        intermediate_size=c["inter"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv"],
        vocab_size=c["vocab"],
        tie_word_embeddings=c["tied"],
        max_position_embeddings=4096,
    )
    if name.startswith("qwen"):
        config = transformers.Qwen2Config(**common, bos_token_id=151643, eos_token_id=151645)
    else:
        config = transformers.LlamaConfig(**common, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    return c


def hand_counts(c: dict, qkv_bias: bool) -> dict[str, int]:
    """Byte counts from the configuration's numbers, written out by hand."""
    h, i, L, heads, kv, v = c["hidden"], c["inter"], c["layers"], c["heads"], c["kv"], c["vocab"]
    hd = h // heads
    kvd = kv * hd
    # per block: q, k, v, o, gate, up, down; two RMSNorm weights; q/k/v biases for Qwen2
    block = h * h + 2 * h * kvd + h * h + 3 * h * i + 2 * h + ((h + 2 * kvd) if qkv_bias else 0)
    params = L * block + 2 * v * h + h  # embeddings, lm_head (untied), final norm
    # covariance: one fp32 d_in × d_in per input group (q/k/v, o, gate/up, down), norms fp64
    covariance = L * (3 * h * h + i * i) * 4
    norms = L * (3 * h + i) * 8
    snip = L * (2 * h * h + 2 * h * kvd + 3 * h * i) * 4
    # eigenbases, fp64: kept eigenvectors d_out × min(d_out, d_in) and min(d_out, d_in) values
    shapes = [(h, h), (kvd, h), (kvd, h), (h, h), (i, h), (i, h), (h, i)]
    eigen = L * sum((o * min(o, d) + min(o, d)) * 8 for o, d in shapes)
    kv_token = 2 * L * kv * hd * 2  # bf16 keys and values per token
    return dict(
        params=params, covariance=covariance, norms=norms, snip=snip, eigen=eigen, kv=kv_token
    )


@pytest.mark.parametrize("name", list(REAL))
def test_plans_match_hand_counts(tmp_path, name):
    c = write_config(tmp_path, name)
    want = hand_counts(c, qkv_bias=name.startswith("qwen"))
    assert want["params"] == REAL[name][1]  # the hand count is the published size
    plan = plan_run(tmp_path, Machine(gpus=1, gpu_memory=80 * GiB))
    assert plan.parameters == want["params"]
    assert plan.facts["weights"] == 2 * want["params"]
    assert plan.facts["groups"] == 4 * c["layers"]  # q/k/v and gate/up share an input
    assert plan.facts["kv_bytes_per_token"] == want["kv"]
    stages = {s.name: s for s in plan.stages}
    eigen = next(n for n in stages["eigenbases"].needs if n.what == "eigenbases of both sets")
    assert eigen.bytes == 2 * want["eigen"]
    statistics = want["covariance"] + want["norms"] + want["snip"]
    calib = [s for s in plan.stages if s.name.startswith("calibration")]
    if name == "llama-2-70b":  # 138 GB of weights: not resident on one 80 GiB GPU
        forward, snip = calib
        assert forward.fits and "layer by layer" in forward.decision
        finished = next(n for n in forward.needs if n.what == "finished statistics")
        assert finished.bytes == want["covariance"] + want["norms"]
        largest = next(n for n in forward.needs if n.what == "statistics, largest pass")
        assert (
            largest.bytes
            == (3 * c["hidden"] ** 2 + c["inter"] ** 2) * 4 + (3 * c["hidden"] + c["inter"]) * 8
        )  # one block's statistics
        assert not snip.fits and "at least 2 GPUs" in snip.decision
        assert not stages["generation"].fits
        editing = stages["editing"]  # weights on the host, one layer at a time on the GPU
        assert "layer by layer" in editing.decision and "stay on the host" in editing.decision
        gate = c["inter"] * c["hidden"]  # the largest layer; its basis keeps R = hidden columns
        (on_gpu,) = [n for n in editing.needs if n.where == "gpu"]
        assert on_gpu.bytes == 2 * gate + 2 * gate * 8 + gate * 8  # bf16 W, two fp64 bases, fp64 W
        assert [n.bytes for n in editing.needs if n.where == "host"] == [2 * want["params"]]
        small = plan_run(tmp_path, Machine(gpus=1, gpu_memory=80 * GiB, host_memory=64 * GiB))
        assert "stay on the disk" in small.stage("editing").decision
    else:
        (only,) = calib
        assert only.fits
        finished = next(n for n in only.needs if n.what == "finished statistics")
        assert finished.bytes in (0, statistics)  # 0 when one pass keeps them on the GPU
        generation = stages["generation"]
        assert generation.fits
        batch = plan.facts["generation_batch"]
        per_sequence = plan.facts["generation_bytes_per_sequence"]
        assert per_sequence >= want["kv"] * (128 + 256)
        room = int(0.9 * 80 * GiB) - 2 * want["params"]
        assert batch == min(520, room // per_sequence)


def test_the_70b_plan_on_an_h200_and_on_eight_gpus(tmp_path):
    c = write_config(tmp_path, "llama-2-70b")
    want = hand_counts(c, qkv_bias=False)
    weights = 2 * want["params"]
    h200 = plan_run(tmp_path, Machine(gpus=1, gpu_memory=141 * 10**9, host_memory=2 * 10**12))
    names = [s.name for s in h200.stages]
    assert names[:2] == ["calibration (norms, covariance)", "calibration (snip)"]
    assert not h200.stage("calibration (snip)").fits  # 138 GB + activations > 0.9 × 141 GB
    assert h200.stage("eigenbases").fits  # 862 GB of bases within 2 TB of host memory
    eight = plan_run(tmp_path, Machine(gpus=8, gpu_memory=80 * GiB, host_memory=2 * 10**12))
    calib = eight.stage("calibration")
    assert calib.fits and "spread over 8 GPUs" in calib.decision
    assert next(n for n in calib.needs if n.what == "weights").bytes == weights // 8
    assert eight.stage("generation").fits and eight.facts["generation_batch"] == 520
    small_host = plan_run(tmp_path, Machine(gpus=8, gpu_memory=80 * GiB, host_memory=512 * GiB))
    assert not small_host.stage("eigenbases").fits
    assert "keep fewer eigenvectors" in small_host.stage("eigenbases").decision
    kept = plan_run(
        tmp_path,
        Machine(gpus=8, gpu_memory=80 * GiB, host_memory=512 * GiB),
        Settings(keep=512, eigen_dtype=torch.float32),
    )
    assert kept.stage("eigenbases").fits
    torchrun = plan_run(tmp_path, Machine(gpus=8, gpu_memory=80 * GiB, processes=8))
    forward = torchrun.stage("calibration (norms, covariance)")
    assert "on each of 8 ranks" in forward.decision  # each rank holds one GPU: layer by layer


def test_the_command_line_prints_and_writes_the_plan(tmp_path, capsys):
    from pyattr.__main__ import main

    write_config(tmp_path / "m", "llama-3-8b")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tmp_path / "m"), "--gpu", "h100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8.03B parameters" in text and "| generation | KV cache" in text
    saved = json.loads(out.read_text())
    assert saved["parameters"] == REAL["llama-3-8b"][1]
    assert {s["name"] for s in saved["stages"]} >= {"calibration", "eigenbases", "generation"}
    write_config(tmp_path / "big", "llama-2-70b")
    assert main(["plan", "--model", str(tmp_path / "big"), "--check"]) == 1  # SNIP cannot fit
    capsys.readouterr()
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
    assert "no config.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read 'lots' as a size"):
        main(["plan", "--model", str(tmp_path / "m"), "--gpu-memory", "lots"])
