"""Profiling: per-sample attention influence of every (layer, head), saved for the optimiser.

For each calibration sample: forward the dense model over prompt + answer, take the mean
cross-entropy of the model's own answer tokens, backpropagate through the influence attention
(``influence.py``) and keep, per (layer, head), the exact diagonal sums of the influence
(float32 [layers, heads, n_tokens]). A rule's influence on a sample is a suffix sum of that
vector at the rule's span at the sample's own total length (semantics: N = tokens in the
forward call); the optimiser averages it over the samples of each nominal length.

Output folder: ``profile.json``, a ``moa_plan.run`` result file (settings: model, shape, sink,
block size, influence sign, calibration settings; one cell per sample with its length and dense
loss) and ``influence/<id>.safetensors`` (the sample's diag tensor), each written atomically
before its cell is recorded: an interrupted run resumes after the last finished sample.
With ``--measure-blocks`` the folder also holds ``measured.json``, the measured cost of
narrowing layer blocks (``measured.py``), which the optimiser adds to the influence.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_plan.errors import OptionError, Problems, UsageError
from moa_plan.files import read_bytes_limited, write_atomic
from moa_plan.run import HEADER, Run, read_result
from moa_plan.search.settings import ProfileSettings

META = "profile.json"
TENSORS = "influence"  # one safetensors file per sample: <id>.safetensors


@dataclass
class Profile:
    meta: dict[str, Any]
    diags: dict[str, Any]  # sample id -> torch float32 [layers, heads, n_tokens]
    measured: dict[str, Any] | None = None  # measured.json's content (``measured.py``), if any

    @property
    def lengths(self) -> list[int]:
        return sorted({s["length"] for s in self.meta["samples"]})


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile folder; located errors for missing or inconsistent files."""
    from safetensors.torch import load

    from moa_plan.search import measured

    path = Path(path)
    if not (path / META).is_file():
        raise OptionError([("--profile", f"{path} has no {META} (run `moa-plan profile` first)")])
    data = read_result(path / META, "profile")
    samples = list(data["cells"].values())
    if not all(
        isinstance(s, dict) and isinstance(s.get("id"), str) and isinstance(s.get("length"), int) for s in samples
    ):
        raise UsageError([("cells", "each must be a {id, length, ...} object")], source=str(path / META))
    diags = {}
    for s in samples:
        file = path / TENSORS / f"{s['id']}.safetensors"
        try:
            diags[s["id"]] = load(read_bytes_limited(file, None))["diag"]
        except Problems as exc:
            raise UsageError([("--profile", f"sample {s['id']} lacks its influence tensor ({exc})")]) from None
        except (OSError, ValueError, KeyError) as exc:  # safetensors' own errors
            raise UsageError([("", f"cannot read influence tensors: {exc}")], source=str(file)) from None
    meta = {**data["settings"], **{k: v for k, v in data.items() if k not in HEADER}, "samples": samples}
    meta["calibration_settings"] = {**meta.get("calibration_settings", {}), **meta.pop("calibration_grid", {})}
    return Profile(meta, diags, measured.load_measured(path, set(diags)))


def sample_fingerprint(sample: dict[str, Any]) -> str:
    """Hash of a calibration sample's tokens: a resumed profile reuses only unchanged samples."""
    blob = json.dumps([sample["prompt_ids"], sample["answer_ids"], sample.get("loss_mask")]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def profile_sample(
    model: Any, prompt_ids: list[int], answer_ids: list[int], recorder: Any, loss_mask: list[int] | None = None
) -> tuple[float, Any]:
    """Dense loss of the answer and the diag sums [layers, heads, n] of one sample."""
    import torch

    from moa_plan.search import influence
    from moa_plan.search.loss import answer_loss

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    a = len(answer_ids)
    recorder.reset()
    influence.set_recorder(recorder)
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, logits_to_keep=a + 1, use_cache=False)
        loss = answer_loss(out.logits[0, :a], answer_ids, loss_mask)
        loss.backward()
    finally:
        influence.set_recorder(None)
    layers = model.config.num_hidden_layers
    missing = [l for l in range(layers) if l not in recorder.diag]
    if missing:
        raise RuntimeError(f"influence attention did not run in layers {missing}")
    diag = torch.stack([recorder.diag[l] for l in range(layers)]).float().cpu()
    return float(loss.detach()), diag


def run_profile(job: ProfileSettings) -> Path:
    """Profile every calibration sample (a ``moa_plan.run`` job: a cell per sample, keyed by its
    id and token fingerprint, its tensor in ``influence/<id>.safetensors``); returns the folder."""
    from safetensors.torch import save

    from moa_plan.runtime import load as loader
    from moa_plan.search import calibration, influence

    model_dir, data, out, sink, block_size = job.model, job.data, job.out, job.sink, job.block_size
    chunk, signed, device = job.chunk, job.signed_influence, job.device
    if sink < 0:
        raise OptionError([("--sink", "must be >= 0")])
    if block_size < 1 or chunk < 1:
        raise OptionError([("--block-size/--chunk", "must be >= 1")])
    calib, samples = calibration.load_dataset(data)
    if not samples:
        raise UsageError([("--data", f"{data} holds no samples")])
    if job.hold_out < 0:
        raise OptionError([("--hold-out", "must be >= 0")])
    if job.measure_blocks < 0 or job.measure_samples < 1:
        raise OptionError([("--measure-blocks/--measure-samples", "must be >= 0 / >= 1")])
    held = held_out_ids(samples, job.hold_out)
    samples = [s for s in samples if s["id"] not in held]
    if not samples:
        raise OptionError([("--hold-out", f"{job.hold_out} per length leaves no sample to profile")])
    out = Path(out)
    settings = {
        "model": loader.model_name(model_dir),
        "model_shape": loader.model_shape(model_dir).model_dump(mode="json"),
        "sink": sink,
        "block_size": block_size,
        "influence": "signed" if signed else "absolute",
        "calibration_settings": {k: v for k, v in calib.items() if k not in calibration.GRID},
        "convention": "influence = estimated loss increase of hiding key j from query i "
        "(A_ij (S_i - G_ij) / (1 - A_ij)); diag[d] sums it (its absolute value unless "
        "'influence' is 'signed', as the MoA reference does) over i - j = d, j >= sink",
    }
    if held:  # not profiled: the optimiser measures candidate plans on them (select "all")
        settings["held_out"] = sorted(held)
    keys = {f"{s['id']}@{sample_fingerprint(s)}": s for s in samples}
    with Run(out / META, "profile", settings, overwrite=job.overwrite, quiet=job.quiet) as run:
        todo = run.todo(keys)
        if todo:
            influence.register_attention()
            model, _ = loader.load(model_dir, attn_implementation=influence.ATTN_NAME, device=device)
            for p in model.parameters():
                p.requires_grad_(False)
            recorder = influence.InfluenceRecorder(sink=sink, chunk=chunk, signed=signed)
            with run.progress(len(todo), "profile", unit="sample") as bar:
                for key in todo:
                    s = keys[key]
                    t0 = time.perf_counter()
                    loss, diag = profile_sample(model, s["prompt_ids"], s["answer_ids"], recorder, s.get("loss_mask"))
                    write_atomic(out / TENSORS / f"{s['id']}.safetensors", save({"diag": diag.contiguous()}))
                    run.put(
                        key,
                        {
                            "id": s["id"],
                            "task": s.get("task"),
                            "length": s["length"],
                            "n_tokens": len(s["prompt_ids"]) + len(s["answer_ids"]),
                            "loss": loss,
                            "seconds": round(time.perf_counter() - t0, 2),
                        },
                    )
                    bar.update()
        run.finish(
            keys, calibration=Path(data).name, calibration_grid={k: calib[k] for k in calibration.GRID if k in calib}
        )
    if job.measure_blocks:
        from moa_plan.search.measured import run_measured

        shape = loader.model_shape(model_dir)
        run_measured(
            model_dir, shape, samples, out, sink, block_size, job.measure_blocks, job.measure_samples, device,
            job.overwrite, job.quiet,
        )  # fmt: skip
    return out


def held_out_ids(samples: list[dict[str, Any]], per_length: int) -> set[str]:
    """The ids of the last ``per_length`` samples of each length (file order): left out of the
    profile so that the search can measure its candidate plans at the optimisation lengths on
    samples the profile never saw."""
    by_length: dict[int, list[str]] = {}
    for s in samples:
        by_length.setdefault(s["length"], []).append(s["id"])
    return {i for ids in by_length.values() for i in ids[max(0, len(ids) - per_length) :]} if per_length else set()


def influence_table(profile: Profile, cands: list[Any], lengths: list[int], measured_weight: float = 0.0) -> Any:
    """float64 [layers*heads, rules, len(lengths)]: mean influence of each rule at each nominal length.

    Each sample contributes the suffix sum of its diag at the rule's span at the sample's own
    token count; samples are grouped by their nominal length. With ``measured_weight`` > 0 and a
    measurement in the profile, each head's share of its block's measured cost is added, scaled
    per length so that at weight 1 the two terms have the same total when every head keeps half
    of its keys (the first-order sum overstates the real loss change many times over, so the
    measured term is brought to its scale rather than added in raw loss units).
    """
    import torch

    from moa_plan.search.influence import rule_influence

    shape = profile.meta["model_shape"]
    units = shape["num_layers"] * shape["num_attention_heads"]
    table = torch.zeros(units, len(cands), len(lengths), dtype=torch.float64)
    for k, n in enumerate(lengths):
        group = [s for s in profile.meta["samples"] if s["length"] == n]
        if not group:
            raise UsageError([("lengths", f"the profile has no samples of length {n} (it has {profile.lengths})")])
        for s in group:
            spans = [c.span(s["n_tokens"]) for c in cands]
            diag = profile.diags[s["id"]].to(torch.float64).reshape(units, -1)
            table[:, :, k] += rule_influence(diag, spans)
        table[:, :, k] /= len(group)
    if measured_weight and profile.measured is not None:
        table += measured_weight * _scaled_block_cost(profile, cands, lengths)
    return table


def _scaled_block_cost(profile: Profile, cands: list[Any], lengths: list[int]) -> Any:
    """``measured.block_cost`` brought to the first-order table's scale, per length: both terms
    summed over heads for the rule that keeps half of every head's keys (beta 1/2) are equal."""
    import torch

    from moa_plan.plan import ModelShape
    from moa_plan.search.measured import block_cost
    from moa_plan.search.rules import Candidate

    shape = ModelShape.model_validate(profile.meta["model_shape"])
    counts = {n: [s["n_tokens"] for s in profile.meta["samples"] if s["length"] == n] for n in lengths}
    half_rule = [Candidate(0.0, 0.5)]
    half = influence_table(profile, half_rule, lengths)[:, 0, :].sum(dim=0)
    measured_half = block_cost(profile.measured, shape, half_rule, counts).sum(dim=(0, 1))
    scale = torch.where(measured_half > 0, half / measured_half.clamp_min(1e-300), torch.zeros_like(half))
    return block_cost(profile.measured, shape, cands, counts) * scale


def _spearman(a: Any, b: Any) -> float:

    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def split_half_agreement(profile: Profile, cands: list[Any], lengths: list[int]) -> dict[str, dict[str, float]]:
    """How reproducible the profile is: per length, the Spearman correlation between the
    influence tables of two disjoint halves of the samples (even / odd position), over all
    (head, rule) pairs, and, stricter, across heads for each rule (mean over rules): the part
    the optimiser's choice between heads depends on."""
    out = {}
    for n in lengths:
        group = [s for s in profile.meta["samples"] if s["length"] == n]
        if len(group) < 2:
            continue
        halves = []
        for part in (group[0::2], group[1::2]):
            sub = Profile({**profile.meta, "samples": part}, profile.diags)
            halves.append(influence_table(sub, cands, [n])[:, :, 0])
        a, b = halves
        across = [_spearman(a[:, r], b[:, r]) for r in range(a.shape[1]) if float(a[:, r].abs().sum()) > 0]
        out[str(n)] = {
            "heads_x_rules": round(_spearman(a.reshape(-1), b.reshape(-1)), 4),
            "across_heads": round(sum(across) / max(1, len(across)), 4),
        }
    return out
