"""`moa-plan search / calibrate / profile / optimize` end to end on a tiny random Llama (CPU)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("pyomo")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import char_tokenizer, save_tiny  # noqa: E402

from moa_plan.cli import main  # noqa: E402
from moa_plan.errors import UsageError  # noqa: E402
from moa_plan.io import load_plan  # noqa: E402
from moa_plan.search import calibration, calibration_tasks  # noqa: E402
from moa_plan.search.profile import held_out_ids  # noqa: E402
from moa_plan.search.settings import CalibrateSettings  # noqa: E402

COMMON = [
    "--samples",
    "1",
    "--tasks",
    "kv,multihop,copy",
    "--keep-wrong-answers",  # a random model answers none right
    "--sink",
    "16",
    "--block-size",
    "16",
    "--max-answer-tokens",
    "4",
    "--chunk",
    "64",
    "--quiet",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_search_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "search",
            "--model",
            str(tiny_dir),
            "--density",
            "0.5",
            "--lengths",
            "256,512",
            "--validation-length",
            "768",
            "--out",
            str(out),
            *COMMON,
            "--samples",
            "2",
            "--hold-out",
            "1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    plan = load_plan(out)
    prov = plan.provenance
    for n in (256, 512, 768):  # every profiled length within budget, by the plan's own exact density
        assert plan.density(n) <= 0.5
        assert prov["achieved_density"][str(n)] == pytest.approx(plan.density(n), abs=1e-7)
    rules = {(r.alpha, r.beta) for layer in plan.rules() for r in layer}
    assert len(rules) > 1, "plan should be heterogeneous across heads"
    assert prov["budget"] == {"256": 0.5, "512": 0.5}
    # a plan is a shared file: the model by name, never a path on this machine
    assert prov["model"] == plan.model.name == tiny_dir.name and str(tiny_dir) not in out.read_text()
    assert set(prov["estimated_loss"]) == {"256", "512", "768"}
    assert prov["solver"]["name"] == "glpk" and prov["solver"]["termination"] == "optimal"
    # the profile left the last sample of each length out; the search measured every Pareto plan on
    # those and on the validation length's samples, and chose by the mean loss ratio to dense
    profile_meta = json.loads((tmp_path / "plan.json.work" / "profile" / "profile.json").read_text())
    held = set(profile_meta["settings"]["held_out"])
    assert held == {"n256-1", "n512-1", "n768-1"} and not held & {c["id"] for c in profile_meta["cells"].values()}
    rule = prov["selection"]["rule"]
    assert rule.startswith("lowest measured loss of the compressed model relative to dense")
    assert "1 at 256, 1 at 512, 2 at 768" in rule
    chosen = prov["selection"]["pareto"][prov["selection"]["chosen_index"]]
    assert all(chosen["measured_score"] <= p["measured_score"] for p in prov["selection"]["pareto"])
    assert set(chosen["measured_loss"]) == {"256", "512", "768"}
    validation = json.loads((tmp_path / "plan.validation.json").read_text())
    assert set(validation["settings"]["samples"]) == {"n768-0", "n768-1", "n256-1", "n512-1"}
    # every Pareto plan is kept beside the table; the chosen one is the plan written
    kept = sorted((tmp_path / "plan.candidates").glob("*.json"))
    assert len(kept) == prov["selection"]["pareto_size"]
    assert load_plan(kept[prov["selection"]["chosen_index"]]).rules() == plan.rules()
    for n in (256, 512):  # the density floor: each optimisation length uses >= 0.9 x its budget
        assert plan.density(n) >= 0.45 - 1e-9
    assert plan.density(1536) <= 0.5  # the extension length (2 x 768) is constrained too
    assert prov["extension_lengths"] == [1536] and prov["max_rules_per_layer"] == 2
    for layer in plan.rules():
        assert len({(r.alpha, r.beta) for r in layer}) <= 2
    assert set(prov["profile_split_half_spearman"]) == set()  # one sample per length: no halves
    table = (tmp_path / "plan.candidates.md").read_text()
    assert "measured loss" in table and "**yes**" in table
    # the uniform window at the same budget is measured on the same held-out samples, beside them
    ref = prov["selection"]["uniform_reference"]
    assert ref["density"] == 0.5 and set(ref["measured_loss"]) == {"256", "512", "768"} and ref["score"] > 0
    assert "| uniform (reference) |" in table and f"{ref['score']:.4f}" in table and "| dense |" in table
    assert (tmp_path / "plan.pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plan.spans.png").read_bytes()[:4] == b"\x89PNG"

    # the profile is reused: another budget, GQA mode and a rule cap are a cheap optimize call
    work = tmp_path / "plan.json.work"
    out2 = tmp_path / "plan25.json"
    rc = main(
        [
            "optimize",
            "--profile",
            str(work / "profile"),
            "--density",
            "0.3",
            "--validation-length",
            "768",
            "--gqa",
            "--max-rules-per-layer",
            "2",
            "--out",
            str(out2),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    plan2 = load_plan(out2)
    for n in (256, 512, 768):
        assert plan2.density(n) <= 0.3
    for layer in plan2.rules():
        assert len({(r.alpha, r.beta) for r in layer}) <= 2
        g = plan2.model.group_size
        for kv in range(plan2.model.num_key_value_heads):
            assert len({(r.alpha, r.beta) for r in layer[kv * g : (kv + 1) * g]}) == 1

    # infeasible budget: exit 1, one line per length naming the smallest reachable density, no plan written
    capsys.readouterr()
    out3 = tmp_path / "never.json"
    rc = main(
        [
            "optimize",
            "--profile",
            str(work / "profile"),
            "--density",
            "0.01",
            "--validation-length",
            "768",
            "--out",
            str(out3),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.splitlines()[0] == (
        "moa-plan: --density: 0.01 is infeasible at length 256: with sink 16 the sparsest rule there has density 0.1250"
    )
    assert not out3.exists()

    # missing solver: exit 1 with a clear line
    rc = main(
        [
            "optimize",
            "--profile",
            str(work / "profile"),
            "--density",
            "0.5",
            "--solver",
            "nosuchsolver",
            "--out",
            str(out3),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "solver 'nosuchsolver' is not installed" in err

    # the reference's rule: measured loss at the validation length alone
    out4 = tmp_path / "ref.json"
    flags = ["--density", "0.5", "--validation-length", "768", "--model", str(tiny_dir)]
    flags += ["--data", str(work / "calibration.json"), "--select", "validation", "--out", str(out4), "--quiet"]
    assert main(["optimize", "--profile", str(work / "profile"), *flags]) == 0, capsys.readouterr().err
    sel = load_plan(out4).provenance["selection"]
    assert "(2 at 768;" in sel["rule"] and all(set(p["measured_loss"]) == {"768"} for p in sel["pareto"])

    # holding out every sample of a length leaves nothing to profile: one line, usage exit status
    capsys.readouterr()
    rc = main(
        ["profile", "--model", str(tiny_dir), "--data", str(work / "calibration.json"), "--hold-out", "2"]
        + ["--sink", "16", "--block-size", "16", "--out", str(tmp_path / "p2"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err  # a bad option: usage exit status
    assert err.strip() == "moa-plan profile: --hold-out: 2 per length leaves no sample to profile"
    # more than a length has holds out all of it, never a part
    s = [{"id": "a", "length": 1}, {"id": "b", "length": 1}, {"id": "c", "length": 2}]
    assert held_out_ids(s, 3) == {"a", "b", "c"} and held_out_ids(s, 1) == {"b", "c"} and held_out_ids(s, 0) == set()


def test_bad_model_folder_is_one_line(tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tmp_path / "nope"), "--lengths", "256", "--out", str(tmp_path / "c.jsonl")])
    err = capsys.readouterr().err
    assert (
        rc == 2 and err == f"moa-plan calibrate: --model: {tmp_path / 'nope'}: not a model folder or its config.json\n"
    )
    (tmp_path / "config.json").write_text("{}")
    rc = main(["calibrate", "--model", str(tmp_path / "config.json"), "--lengths", "256", "--out", str(tmp_path / "c")])
    assert rc == 2 and "has a config.json but no weights" in capsys.readouterr().err


def test_search_checks_every_option_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    """Infeasible budgets, a missing solver, a bad device or model fail at once, before calibration."""
    monkeypatch.setattr(calibration, "build", lambda *a, **k: pytest.fail("calibration started"))
    base = [
        "search",
        "--model",
        str(tiny_dir / "config.json"),
        "--lengths",
        "256,512",
        "--sink",
        "64",
        "--block-size",
        "16",
        "--out",
        str(tmp_path / "p.json"),
    ]
    # option errors exit 2 (one line each), found before any work
    assert main([*base, "--density", "0.1", "--validation-length", "1024"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "moa-plan search: --density: 0.1 is infeasible at length 256: with sink 64 the sparsest rule there "
        "has density 0.3125"
    )  # (64 + a 16-token window) / 256
    assert len(err) == 2 and "at length 512" in err[1]  # 1024 and the extension length 2048 are reachable
    assert main([*base, "--density", "0.5", "--solver", "nosuchsolver"]) == 1
    assert "--solver: solver 'nosuchsolver' is not installed" in capsys.readouterr().err
    assert main([*base, "--density", "0.5", "--device", "nodevice"]) == 2
    assert "--device: not a torch device: 'nodevice'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--density", "0.5", "--validation-length", "0"])
    assert exc.value.code == 2 and "--validation-length: must be >= 1, got 0" in capsys.readouterr().err


def test_calibration_lengths_resume_and_user_text(tiny_dir, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("alpha beta gamma " * 200)
    (docs / "b.jsonl").write_text(
        json.dumps({"text": "one two three " * 200, "question": "Which word comes first?"}) + "\n"
    )
    out = tmp_path / "calib.jsonl"
    cfg = CalibrateSettings(
        model=tiny_dir,
        out=out,
        lengths=[300],
        samples=6,
        tasks=["kv", "copy"],
        seed=1,
        max_answer_tokens=3,
        text=str(docs),
        keep_wrong_answers=True,  # a random model gets every kv / copy answer wrong
        quiet=True,
    )
    calibration.build(cfg)
    settings, samples = calibration.load_dataset(out)
    assert settings["lengths"] == [300] and settings["chat_template"] is False
    assert [s["task"] for s in samples] == ["kv", "copy", "text", "kv", "copy", "text"]
    tok = char_tokenizer()
    for s in samples:
        assert s["n_tokens"] == len(s["prompt_ids"]) + len(s["answer_ids"]) <= 300
        assert len(s["prompt_ids"]) > 250  # filled close to the target
        assert 1 <= len(s["answer_ids"]) <= 3
    assert "Which word comes first?" in tok.decode(samples[5]["prompt_ids"])  # the .jsonl document
    assert samples[5]["questions"] == ["Which word comes first?"]
    assert samples[2]["questions"] == ["Summarize the text above in one sentence."]  # the .txt one
    assert all(sum(s["loss_mask"]) == len(s["answer_ids"]) for s in samples)  # one turn: all answer

    # resuming never reloads the model when everything is done
    from moa_plan.runtime import load as loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("model reloaded on resume"))
    calibration.build(cfg)
    # a different seed is refused instead of silently mixing datasets
    from moa_plan.errors import OptionError

    with pytest.raises(OptionError, match="seed is 1 there, 2 now"):
        calibration.build(
            CalibrateSettings(
                model=tiny_dir,
                out=out,
                lengths=[300],
                samples=4,
                tasks=["kv", "copy"],
                seed=2,
                max_answer_tokens=3,
                text=str(docs),
                keep_wrong_answers=True,
                quiet=True,
            )
        )


def test_samples_the_dense_model_answers_wrongly_are_left_out(tiny_dir, tmp_path, monkeypatch):
    """Model-aligned supervision of a task with an exact answer is only worth having where the
    dense model gets it right: kv samples answered wrongly are kept in the file (flagged) but not
    handed to the profile or the validation, unless asked for."""
    import re

    def answer(model, tok, texts, max_new_tokens):  # one batch of four: only the first answered right
        out = []
        for t in texts:
            key = re.findall(r"value of key (\w+)\?", t)[-1]
            value = re.search(rf"key {key}: value (\d+)\.", t).group(1)
            out.append(value if not out else "123")
        return out

    monkeypatch.setattr(calibration, "generate_answers", answer)
    out = tmp_path / "calib.json"
    cfg = CalibrateSettings(
        model=tiny_dir,
        out=out,
        lengths=[300, 400],
        samples=2,
        tasks=["kv"],
        max_answer_tokens=3,
        batch_size=4,
        quiet=True,
    )
    calibration.build(cfg)
    data = json.loads(out.read_text())["cells"]
    assert sorted(c["dense_correct"] for c in data.values()) == [False, False, False, True]
    assert all(c["expected"] in c["answers"][0] or not c["dense_correct"] for c in data.values())
    _, samples = calibration.load_dataset(out)
    assert [s["dense_correct"] for s in samples] == [True]
    kept = tmp_path / "kept.json"
    calibration.build(dataclasses.replace(cfg, out=kept, keep_wrong_answers=True))
    assert len(calibration.load_dataset(kept)[1]) == 4

    monkeypatch.setattr(calibration, "generate_answers", lambda m, t, texts, n: ["123"] * len(texts))
    wrong = tmp_path / "wrong.json"
    calibration.build(dataclasses.replace(cfg, out=wrong))
    with pytest.raises(UsageError, match="answered every sample wrongly"):
        calibration.load_dataset(wrong)


def test_task_answers_lie_far_back():
    import random

    for name, fn in calibration_tasks.SYNTHETIC.items():
        if name == "docs":
            continue  # natural text: tested in test_docs_calibration_is_a_multi_turn_chat
        context, question, expected = fn(random.Random(0), 90)
        if name == "needle":
            words = context.split()
            pos = next(i for i, w in enumerate(words) if w == f"{expected}.")
            assert words[pos - 1] == "number:" and "record number" in question, name
            assert pos <= 0.9 * len(words) + 2 and len(words) <= 90 + 10, name
            assert pos < 3 or words[pos - 3].endswith("."), name  # starts a sentence
            continue
        lines = context.splitlines()
        if name == "kv":
            key = question.split("key ")[1].split("?")[0]
            pos = next(i for i, line in enumerate(lines) if key in line)
            assert lines[pos].endswith(f"value {expected}."), name
        elif name == "multihop":
            var = question.split("what number is ")[1].split(" ")[0]
            pos = next(i for i, line in enumerate(lines) if line.startswith(var + " ="))
            chain = {a: b.rstrip(".") for a, _, b in (ln.partition(" = ") for ln in lines[1:])}
            value = var
            for _ in range(3):  # three hops end at the expected number
                value = chain[value]
            assert value == expected, name
        else:
            num = question.split("passage ")[1].split(" ")[0]
            pos = next(i for i, line in enumerate(lines) if line.startswith(f"Passage {num}:"))
            assert lines[pos] == f"Passage {num}: {expected}.", name
        assert pos <= len(lines) // 3 + 1, name


def test_docs_calibration_is_a_multi_turn_chat(tiny_dir, tmp_path):
    """The default task: natural text from the calibration part of the corpus, three questions,
    each answered by the model; the loss mask covers exactly the three answers."""
    from moa_plan.corpus import sections

    out = tmp_path / "docs.jsonl"
    calibration.build(
        CalibrateSettings(
            model=tiny_dir,
            out=out,
            lengths=[1500],
            samples=2,
            tasks=["docs"],
            max_answer_tokens=5,
            quiet=True,
            batch_size=2,
        )
    )
    _, samples = calibration.load_dataset(out)
    titles = {t for t, _ in sections("calibration")}
    tok = char_tokenizer()
    for s in samples:
        assert len(s["questions"]) == 3 and len(s["answers"]) == 3
        asked = (
            s["questions"][0]
            .removeprefix('Summarize the section "')
            .removesuffix('" of the text above in a few sentences.')
        )
        assert asked in titles
        text = tok.decode(s["prompt_ids"] + s["answer_ids"])
        assert text.index(asked) < len(text) // 2  # the section asked about lies in the first half
        answered = "".join(tok.decode([t]) for t, m in zip(s["answer_ids"], s["loss_mask"]) if m)
        assert answered == "".join(s["answers"])
        assert s["n_tokens"] <= 1500


def test_short_lengths_get_fewer_questions_not_an_error(tiny_dir, tmp_path):
    """Question turns take at most half a sample (512 tokens: one 128-token answer, 2048: three), a
    short length still gets one, so it can be profiled, and one that does not fit is a located error."""
    from moa_plan.errors import OptionError

    assert [calibration.questions_at(n, 128, 3) for n in (250, 400, 512, 1024, 2048, 4096)] == [1, 1, 1, 2, 3, 3]
    assert calibration.questions_at(170, 128, 3) == 0
    out = tmp_path / "short.jsonl"
    calibration.build(
        CalibrateSettings(
            model=tiny_dir,
            out=out,
            lengths=[470, 1500],
            samples=1,
            tasks=["docs"],
            max_answer_tokens=100,
            quiet=True,
            batch_size=2,
        )
    )
    _, samples = calibration.load_dataset(out)
    by_length = {s["length"]: s for s in samples}
    assert len(by_length[470]["questions"]) == len(by_length[470]["answers"]) == 1
    assert len(by_length[1500]["questions"]) == 3
    assert all(s["n_tokens"] <= s["length"] for s in samples)
    with pytest.raises(OptionError, match="too short for a prompt plus an answer"):
        calibration.build(
            CalibrateSettings(
                model=tiny_dir,
                out=tmp_path / "x.jsonl",
                lengths=[170],
                samples=1,
                tasks=["docs"],
                max_answer_tokens=128,
                quiet=True,
            )
        )


def test_search_flags_become_the_three_steps_settings(tmp_path):
    from moa_plan.cli import build_parser
    from moa_plan.search.cli import search_settings

    out = tmp_path / "plan.json"
    args = build_parser().parse_args(
        ["search", "--model", "m", "--lengths", "400,200,200", "--validation-length", "300", "--density", "0.5"]
        + ["--sink", "8", "--samples", "3", "--device", "cpu", "--quiet", "--out", str(out)]
    )
    s = search_settings(args)
    work = Path(str(out) + ".work")
    assert (s.calibrate.lengths, s.calibrate.out, s.calibrate.samples) == (
        [200, 400, 300],
        work / "calibration.json",
        3,
    )
    assert (s.profile.out, s.profile.data, s.profile.sink) == (work / "profile", None, 8)
    assert (s.optimize.lengths, s.optimize.validation_length, s.optimize.out) == ([200, 400], 300, str(out))
    assert s.optimize.extension(s.optimize.lengths) == [800]  # twice the longest of 200, 400, 300
    assert {s.calibrate.device, s.profile.device, s.optimize.device} == {"cpu"}
    assert s.calibrate.quiet and s.profile.quiet and s.optimize.quiet


def test_measured_block_cost_is_resumed_and_added_to_the_influence(tiny_dir, tmp_path, capsys, monkeypatch):
    """`--measure-blocks`: the loss increase of narrowing each layer block is measured once per
    (length, block, fraction), resumed, and added by the optimiser so that a head's cost still
    never grows with its span; a measurement made on other samples is refused."""
    import torch

    from moa_plan.search import loss, measured
    from moa_plan.search.profile import influence_table, load_profile
    from moa_plan.search.rules import Candidate

    out = tmp_path / "plan.json"
    flags = ["--model", str(tiny_dir), "--density", "0.5", "--lengths", "256", "--extension-length", "0"]
    flags += [*COMMON, "--samples", "2", "--measure-blocks", "1", "--measure-samples", "2", "--out", str(out)]
    assert main(["search", *flags]) == 0, capsys.readouterr().err
    folder = tmp_path / "plan.json.work" / "profile"
    data = json.loads((folder / "measured.json").read_text())
    layers = load_plan(out).model.num_layers
    assert len(data["cells"]) == 1 + layers * len(measured.FRACTIONS)  # dense + each (block, fraction) at 256
    assert [k.split("@")[0] for k in data["settings"]["samples"]["256"]] == ["n256-0", "n256-1"]
    narrowest = [c["loss"] for c in data["cells"].values() if c.get("fraction") == measured.FRACTIONS[0]]
    dense = data["cells"]["256|dense"]["loss"]
    assert any(abs(v - dense) > 1e-6 for v in narrowest)  # narrowing really changed the loss
    assert (folder / "measured.png").read_bytes()[:4] == b"\x89PNG"
    prov = load_plan(out).provenance
    assert prov["profile"]["measured"]["block_layers"] == 1 and "measured layer-block cost" in prov["method"]

    # resumed: a second run measures nothing again
    monkeypatch.setattr(loss, "plan_losses", lambda *a, **k: pytest.fail("measured again"))
    prof_flags = ["--model", str(tiny_dir), "--data", str(tmp_path / "plan.json.work" / "calibration.json")]
    prof_flags += ["--sink", "16", "--block-size", "16", "--chunk", "64", "--measure-blocks", "1"]
    assert main(["profile", *prof_flags, "--measure-samples", "2", "--out", str(folder), "--quiet"]) == 0
    monkeypatch.undo()

    prof = load_profile(folder)
    cands = [Candidate(alpha=0.0, beta=b / 8) for b in range(1, 9)]  # spans grow with beta
    first = influence_table(prof, cands, [256])
    mixed = influence_table(prof, cands, [256], measured_weight=1.0)
    extra = mixed - first
    assert (extra >= 0).all() and extra.sum() > 0
    assert (mixed[:, 1:] <= mixed[:, :-1] + 1e-12).all()  # still non-increasing in the span
    assert extra[:, -1].abs().max() < 1e-12  # the full span costs nothing
    # weight 1: at beta 1/2 both terms have the same total over heads
    assert float(extra[:, 3].sum()) == pytest.approx(float(first[:, 3].sum()), rel=1e-6)

    # the envelope: a narrower window never costs less, noise below dense counts as zero
    cells = {"d": {"length": 8, "loss": 1.0}}
    for f, v in zip(measured.FRACTIONS, (1.5, 0.9, 1.3, 1.1)):
        cells[str(f)] = {"length": 8, "loss": v, "layers": [0, 0], "fraction": f}
    inc = measured.increases({"settings": {"fractions": list(measured.FRACTIONS)}, "cells": cells})
    assert inc[8][(0, 0)] == pytest.approx([0.5, 0.3, 0.3, 0.1, 0.0])
    assert measured.interpolate([0.125, 0.25, 0.5, 0.75, 1.0], inc[8][(0, 0)], 0.625) == pytest.approx(0.2)
    assert torch.isfinite(mixed).all()

    # a measurement of samples the profile lacks is refused with one line
    capsys.readouterr()
    data["settings"]["samples"]["256"] = ["elsewhere"]
    (folder / "measured.json").write_text(json.dumps(data))
    opt = ["optimize", "--profile", str(folder), "--density", "0.5", "--extension-length", "0"]
    rc = main([*opt, "--out", str(tmp_path / "x.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "measured.json was measured on samples the profile lacks" in err and "Traceback" not in err
