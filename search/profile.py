"""Profiling: per-sample attention influence of every (layer, head), saved for the optimiser.

For each calibration sample: forward the dense model over prompt + answer, take the mean
cross-entropy of the model's own answer tokens, backpropagate through the influence attention
(``influence.py``) and keep, per (layer, head), the exact diagonal sums of the influence
(float32 [layers, heads, n_tokens]). A rule's influence on a sample is a suffix sum of that
vector at the rule's span at the sample's own total length (semantics: N = tokens in the
forward call); the optimiser averages it over the samples of each nominal length.

Output folder: ``profile.json`` (model, shape, lengths, sink, block size, samples with their
lengths and dense losses, calibration settings) and ``influence.safetensors`` (one tensor per
sample). Both are rewritten atomically every ``CHECKPOINT_SECONDS`` and at the end: an
interrupted run resumes from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_plan.io import MAX_RESULT_BYTES, read_bytes_limited, read_json_limited, write_atomic
from moa_plan.plan import PlanError

META = "profile.json"
CHECKPOINT_SECONDS = 30.0  # an interrupted run loses at most this much work
TENSORS = "influence.safetensors"


@dataclass
class Profile:
    meta: dict[str, Any]
    diags: dict[str, Any]  # sample id -> torch float32 [layers, heads, n_tokens]

    @property
    def lengths(self) -> list[int]:
        return sorted({s["length"] for s in self.meta["samples"]})


def _save(out: Path, meta: dict[str, Any], diags: dict[str, Any]) -> None:
    from safetensors.torch import save

    write_atomic(out / TENSORS, save({k: v.contiguous() for k, v in diags.items()}))
    write_atomic(out / META, json.dumps(meta, indent=1) + "\n")


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile folder; located errors for missing or inconsistent files."""
    from safetensors.torch import load

    path = Path(path)
    if not (path / META).is_file():
        raise PlanError([("--profile", f"{path} has no {META} (run `moa-plan profile` first)")])
    try:
        meta = read_json_limited(path / META, MAX_RESULT_BYTES)
        diags = load(read_bytes_limited(path / TENSORS, None)) if (path / TENSORS).exists() else {}
    except PlanError as exc:
        raise PlanError(exc.problems, source=str(exc.source or path / META)) from None
    except (OSError, ValueError) as exc:  # safetensors' own errors
        raise PlanError([("", f"cannot read influence tensors: {exc}")], source=str(path / TENSORS)) from None
    samples = meta.get("samples") if isinstance(meta, dict) else None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), str)
                                                and isinstance(s.get("length"), int) for s in samples):
        raise PlanError([("samples", "must be a list of {id, length, ...} objects (not a profile of this "
                          "moa-plan?)")], source=str(path / META))
    missing = [s["id"] for s in meta.get("samples", []) if s["id"] not in diags]
    if missing:
        raise PlanError([("--profile", f"{path}: samples {missing[:3]} lack influence tensors")])
    return Profile(meta, diags)


def _fingerprint(sample: dict[str, Any]) -> str:
    """Hash of a calibration sample's tokens: a resumed profile reuses only unchanged samples."""
    blob = json.dumps([sample["prompt_ids"], sample["answer_ids"], sample.get("loss_mask")]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def answer_loss(logits: Any, answer_ids: list[int], loss_mask: list[int] | None) -> Any:
    """Mean cross-entropy of the answer tokens (``loss_mask`` 1) given ``logits`` [len(answer), V]."""
    import torch

    target = torch.tensor(answer_ids, device=logits.device)
    if loss_mask is not None:
        target = target.masked_fill(torch.tensor(loss_mask, device=logits.device) == 0, -100)
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-100)


def profile_sample(model: Any, prompt_ids: list[int], answer_ids: list[int], recorder: Any,
                   loss_mask: list[int] | None = None) -> tuple[float, Any]:
    """Dense loss of the answer and the diag sums [layers, heads, n] of one sample."""
    import torch
    from moa_plan.search import influence

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


def run_profile(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, sink: int = 64,
                block_size: int = 64, chunk: int = 256, overwrite: bool = False, progress: bool = True,
                signed: bool = False, device: str = "auto") -> Path:
    """Profile every calibration sample (resuming finished ones); returns the profile folder."""
    from moa_plan.search import calibration, influence
    from moa_plan.search import model as model_mod
    from tqdm import tqdm

    if sink < 0:
        raise PlanError([("--sink", "must be >= 0")])
    if block_size < 1 or chunk < 1:
        raise PlanError([("--block-size/--chunk", "must be >= 1")])
    settings, samples = calibration.load_dataset(data)
    if not samples:
        raise PlanError([("--data", f"{data} holds no samples")])
    shape = model_mod.model_shape(model_dir)
    out = Path(out)
    base = {"model": model_mod.model_name(model_dir), "model_shape": shape.model_dump(mode="json"),
            "sink": sink, "block_size": block_size, "calibration": Path(data).name,
            "influence": "signed" if signed else "absolute",
            "calibration_settings": settings,
            "convention": "influence = estimated loss increase of hiding key j from query i "
                          "(A_ij (S_i - G_ij) / (1 - A_ij)); diag[d] sums it (its absolute value unless "
                          "'influence' is 'signed', as the MoA reference does) over i - j = d, j >= sink"}
    meta: dict[str, Any] = {**base, "samples": [], "seconds": 0.0}
    diags: dict[str, Any] = {}
    strict = ("model", "model_shape", "sink", "influence")
    if (out / META).is_file() and not overwrite:
        old = load_profile(out)
        if any(old.meta.get(k) != base[k] for k in strict):
            raise PlanError([("--out", f"{out} holds a profile with another model, sink or influence sign; "
                              "pass --overwrite or another --out")])
        # keep the profiled samples that are still in the data, unchanged (same fingerprint)
        prints = {s["id"]: _fingerprint(s) for s in samples}
        kept = [m for m in old.meta["samples"] if prints.get(m["id"]) == m.get("fingerprint")]
        meta = {**base, "samples": kept, "seconds": old.meta.get("seconds", 0.0)}
        diags = {m["id"]: old.diags[m["id"]] for m in kept}
    done = {s["id"] for s in meta["samples"]}
    todo = [s for s in samples if s["id"] not in done]
    if not todo:
        _save(out, meta, diags)
        return out
    influence.register_attention()
    model, _ = model_mod.load(model_dir, attn_implementation=influence.ATTN_NAME, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    recorder = influence.InfluenceRecorder(sink=sink, chunk=chunk, signed=signed)
    saved = time.perf_counter()
    for s in tqdm(todo, desc="profile", disable=not progress):
        t0 = time.perf_counter()
        loss, diag = profile_sample(model, s["prompt_ids"], s["answer_ids"], recorder, s.get("loss_mask"))
        diags[s["id"]] = diag
        meta["samples"].append({"id": s["id"], "task": s.get("task"), "length": s["length"],
                                "n_tokens": len(s["prompt_ids"]) + len(s["answer_ids"]), "loss": loss,
                                "seconds": round(time.perf_counter() - t0, 2), "fingerprint": _fingerprint(s)})
        meta["seconds"] = meta.get("seconds", 0.0) + time.perf_counter() - t0
        if time.perf_counter() - saved >= CHECKPOINT_SECONDS:  # the whole file is rewritten: not per sample
            _save(out, meta, diags)
            saved = time.perf_counter()
    _save(out, meta, diags)
    return out


def influence_table(profile: Profile, cands: list[Any], lengths: list[int]) -> Any:
    """float64 [layers*heads, rules, len(lengths)]: mean influence of each rule at each nominal length.

    Each sample contributes the suffix sum of its diag at the rule's span at the sample's own
    token count; samples are grouped by their nominal length.
    """
    import torch
    from moa_plan.search.influence import rule_influence

    shape = profile.meta["model_shape"]
    units = shape["num_layers"] * shape["num_attention_heads"]
    table = torch.zeros(units, len(cands), len(lengths), dtype=torch.float64)
    for k, n in enumerate(lengths):
        group = [s for s in profile.meta["samples"] if s["length"] == n]
        if not group:
            raise PlanError([("lengths", f"the profile has no samples of length {n} "
                              f"(it has {profile.lengths})")])
        for s in group:
            spans = [c.span(s["n_tokens"]) for c in cands]
            diag = profile.diags[s["id"]].to(torch.float64).reshape(units, -1)
            table[:, :, k] += rule_influence(diag, spans)
        table[:, :, k] /= len(group)
    return table


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
        out[str(n)] = {"heads_x_rules": round(_spearman(a.reshape(-1), b.reshape(-1)), 4),
                       "across_heads": round(sum(across) / max(1, len(across)), 4)}
    return out
