"""The hostile inputs of the fuzz harness (``fuzz_cli.py``): mutated and special plan files, MoA
files and special paths, each drawn from a ``random.Random`` so a (seed, case) pair reproduces."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SHAPE = {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
VALID = {
    "format_version": 1,
    "model": dict(SHAPE, max_position_embeddings=4096),
    "sink": 2,
    "default": {"alpha": 3, "beta": 0.25},
    "layers": [
        {"overrides": {"1": {"alpha": -4, "beta": 1}}},
        {
            "heads": [
                {"alpha": 0, "beta": 0.5},
                {"alpha": 8, "beta": 0},
                {"alpha": 1, "beta": 1},
                {"alpha": -64, "beta": 0.75},
            ]
        },
    ],
    "provenance": {"method": "fuzz seed"},
}
FIELDS = {
    "": ["format_version", "model", "sink", "block_size", "default", "layers", "provenance"],
    "model": [
        "num_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "name",
        "revision",
        "max_position_embeddings",
    ],
}


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value, hostile leaning: huge / negative / fractional numbers, odd strings."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**40, 2**40 + 1, 2**53 + 1, 2**63, -(2**63), 10 ** rng.randrange(1, 400)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e-300, 1e300, 2.5, -7.25, 1.0, 64.0])
    if kind == 4:
        return rng.choice(
            [
                "",
                "64",
                "\ud800",
                "\udfff x",
                "a\x1b[31mred",
                "line\nbreak",
                "\u202e",
                "x" * 5000,
                "é",
                "\x00",
                "dense",
                "uniform:0.5",
            ]
        )
    if kind in (5, 6, 7):
        return rng.randrange(-3, 70)
    if kind in (8, 9):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {
        rng.choice(["alpha", "beta", "heads", "default", "overrides", "0", "1", "\ud800", "x"]): _value(rng, depth + 1)
        for _ in range(rng.randrange(0, 4))
    }


def _nested(depth: int, rng: random.Random):
    value: object = rng.choice([1, "x", []])
    for _ in range(depth):
        value = {"a": value} if rng.random() < 0.5 else [value]
    return value


def _mutated(rng: random.Random) -> dict:
    data = json.loads(json.dumps(VALID))
    for _ in range(rng.randrange(1, 4)):
        where = rng.choice(["", "model", "layer", "rule"])
        if where == "":
            data[rng.choice(FIELDS[""])] = _value(rng)
        elif where == "model" and isinstance(data.get("model"), dict):
            data["model"][rng.choice(FIELDS["model"])] = _value(rng)
        elif where == "layer" and isinstance(data.get("layers"), list) and data["layers"]:
            data["layers"][rng.randrange(len(data["layers"]))] = _value(rng)
        elif isinstance(data.get("default"), dict):
            data["default"][rng.choice(["alpha", "beta", "gamma"])] = _value(rng)
        if rng.random() < 0.1:
            data.pop(rng.choice(FIELDS[""]), None)
    return data


def _special(rng: random.Random) -> dict:
    """The shapes of the issue-15 findings, with random sizes."""
    data = json.loads(json.dumps(VALID))
    kind = rng.randrange(10)
    if kind == 0:  # a huge model in a few bytes
        data["model"] = {
            "num_layers": rng.choice([64, 512, 1024]),
            "num_attention_heads": rng.choice([128, 1024]),
            "num_key_value_heads": 1,
            "head_dim": 64,
        }
        data.pop("layers")
    elif kind == 1:
        data["provenance"] = {"deep": _nested(rng.randrange(20, 800), rng)}  # json.dumps recurses
    elif kind == 2:
        data["model"][rng.choice(["name", "revision"])] = rng.choice(["\ud800", "a\udc80b", "\x1b]0;title\x07"])
    elif kind == 3:
        data["provenance"] = {rng.choice(["\ud800", "ok"]): rng.choice(["\udfff", "ok", 1])}
    elif kind == 4:
        data["sink"] = rng.choice([2**40, 2**40 + 1, 10 ** rng.randrange(12, 4000)])
    elif kind == 5:
        data["default"]["alpha"] = rng.choice([1e300, -1e300, 2**40, -(2**40) - 1, 10 ** rng.randrange(20, 300)])
    elif kind == 6:  # very many bad overrides: one problem each
        data["layers"][0] = {"overrides": {f"0{i}": {"alpha": 1, "beta": 0} for i in range(rng.randrange(60, 20000))}}
    elif kind == 7:
        data["model"]["head_dim"] = rng.choice([65536, 65537, 10**30])
    elif kind == 8:
        data["model"]["num_layers"] = rng.choice([1024, 1025])
        data["model"]["num_attention_heads"] = rng.choice([64, 65, 1024])
        data.pop("layers")
    else:
        data["block_size"] = rng.choice([2**40, 2**41, 0])
    return data


def plan_bytes(rng: random.Random) -> bytes:
    """One hostile plan file's content."""
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    text = json.dumps(_mutated(rng) if kind < 5 else _special(rng) if kind < 8 else VALID)
    if kind == 8:  # textual damage: truncation, a duplicated key, NaN, a BOM, a stray byte
        choice = rng.randrange(5)
        if choice == 0:
            text = text[: rng.randrange(len(text))]
        elif choice == 1:
            text = text.replace('"sink": 2', '"sink": 2, "sink": 3')
        elif choice == 2:
            text = text.replace('"alpha": 3', '"alpha": NaN')
        elif choice == 3:
            text = "\ufeff" + text
        else:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(["\x00", "\\", '"', "{", "\udcff"]) + text[i + 1 :]
    return text.encode("utf-8", "surrogatepass")


def moa_bytes(rng: random.Random) -> bytes:
    """One hostile MoA reference file ({"alphas", "betas"} for the 2 x 4 fuzz model)."""
    data = {
        "alphas": [[rng.randrange(-64, 4096) for _ in range(4)] for _ in range(2)],
        "betas": [[rng.random() for _ in range(4)] for _ in range(2)],
    }
    for _ in range(rng.randrange(0, 3)):
        key = rng.choice(["alphas", "betas"])
        if rng.random() < 0.3:
            data[key] = _value(rng)
        elif isinstance(data[key], list) and data[key]:
            row = data[key][rng.randrange(len(data[key]))]
            if isinstance(row, list) and row:
                row[rng.randrange(len(row))] = _value(rng)
    text = json.dumps(data)
    return (text[: rng.randrange(len(text))] if rng.random() < 0.05 else text).encode("utf-8", "surrogatepass")


def special_path(rng: random.Random, folder: Path) -> Path | None:
    """Sometimes not a regular file at all: a FIFO, a link to a device, a folder, nothing."""
    kind = rng.randrange(40)
    path = folder / f"special{kind}.json"
    if kind == 0:
        os.mkfifo(path)
    elif kind == 1:
        path.symlink_to(rng.choice(["/dev/zero", "/dev/urandom", "/dev/null"]))
    elif kind == 2:
        path.mkdir()
    elif kind == 3:
        pass  # missing
    else:
        return None
    return path
