"""Where a profile puts its influence: the share of all estimated influence on keys near the query
(distance < 1/4 of the sample), in the middle, and far back (> 3/4), averaged over samples, and
the heads with the most far influence. A profile that gives far keys ~1% of its mass cannot make
the optimiser keep a head's span over the whole context (search/results/smollm2/run6-holdout).

    python tools/influence_by_distance.py PROFILE_DIR [--top 12]
"""

from __future__ import annotations

import argparse

from moa_plan.search.profile import load_profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    import torch

    prof = load_profile(args.profile)
    for n in prof.lengths:
        group = [s for s in prof.meta["samples"] if s["length"] == n]
        bands = None
        for s in group:
            diag = prof.diags[s["id"]].double()  # [layers, heads, tokens]: influence per key distance
            t = diag.shape[-1]
            cut = [0, t // 4, 3 * t // 4, t]
            b = torch.stack([diag[..., cut[i] : cut[i + 1]].sum(-1) for i in range(3)], -1)
            bands = b if bands is None else bands + b
        bands /= len(group)
        share = bands.sum((0, 1)) / bands.sum()
        print(
            f"length {n} ({len(group)} samples): near {share[0]:.3f}, middle {share[1]:.3f}, far {share[2]:.3f}"
            " of all influence"
        )
        far = bands[..., 2]
        heads = far.shape[1]
        top = torch.topk(far.flatten(), min(args.top, far.numel()))
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            layer, head = divmod(i, heads)
            print(
                f"  layer {layer:2d} head {head}: far influence {v:.4f} "
                f"({v / bands[layer, head].sum().item():.1%} of the head's)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
