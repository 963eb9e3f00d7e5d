"""The near-copy screen (src/medistill/audit/screen.py) measured: what it catches, what it refuses wrongly, how fast.

    python benchmarks/near_copy_screen.py           # everything, ~20 min of one core -> results/near_copy_screen.json
    python benchmarks/near_copy_screen.py --quick --out /tmp/screen.json   # 20 images per attack, IPC 1 and 10

(a) Detection: for every transformation of the screen's family and every attack testers got through the old
    screen, 100 real images (34 train, 33 val, 33 test; 10 for the 2x larger images, 50 for the RGB ones, whose
    search costs more) of BreastMNIST and of the Pneumonia subset are transformed and screened against every real
    image of every split. Recorded per attack: the images caught (raw |NCC| >= NCC_THRESHOLD or blurred whole-frame
    |NCC| >= NCC_SMOOTHED_THRESHOLD), per split, both scores of every image, whether the prefilter kept the true
    source among its candidates, and the detections it lost (the exact search on the true source alone catches the
    image, the screen does not). Four attacks outside the family show where it ends.
(b) False refusals: DC, DSA, DM and MTT at IPC 1, 10 and 50, from noise and from real images (MTT always starts
    from real images), at budgets cut for one CPU core (each set's settings are in the file: DC / DSA 2
    iterations with outer_loop 2, inner_loop 1, batch_real 64; DM 20 iterations, batch_real 64; MTT 5 iterations
    on a one-expert buffer), plus one DM set from noise at IPC 10 with 200 iterations, each screened exactly as
    `export` does (`screen_set`). A set from real images that is refused stayed too close to its initial images.
    Real test images screened against the train and val images show how close other patients' images come.
(c) Time: process CPU time of the screen per set and per attack batch, 1 torch thread.

`threshold_choice` applies the rule that picked the thresholds to these scores: for each measure, the midpoint
between the highest score of any image of a set distilled from noise and the lowest score of any attack image
that measure must catch (raw: the family and tester attacks but noise mixing; blurred: the 0.9 / 0.1 mix).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: python benchmarks/near_copy_screen.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result

torch.set_num_threads(1)

from medistill.audit.neighbours import NCC_SMOOTHED_THRESHOLD, NCC_THRESHOLD  # noqa: E402
from medistill.audit.screen import Found, ScreenFamily, Search, real_pixels, screen_set  # noqa: E402
from medistill.data import load_dataset  # noqa: E402
from medistill.data.dataset import SPLITS, Dataset  # noqa: E402
from medistill.methods import distill  # noqa: E402

MEDMNIST = os.environ.get("MEDISTILL_DATA", "../shared/data/medmnist")  # from the repository root
PNEUMONIA = os.environ.get("PNEUMONIA_NPZ", "../shared/data/unofficial/pneumoniamnist_balanced.npz")
DATASETS = {"breast": "breastmnist", "pneumonia": PNEUMONIA}
PER_SPLIT = {"train": 34, "val": 33, "test": 33}
# Fewer images where the search costs more (one core, < 25 min in all): the 2x larger images (16x the windows) and
# the RGB images (4 channel views against each real image).
FEWER = {"double": {"train": 4, "val": 3, "test": 3}, "rgb": {"train": 17, "val": 17, "test": 16}}
LONGER_DM_ITERATIONS = 200  # one noise-initialised DM set per dataset at 10x the short budget: where do honest sets go?

Attack = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]  # (x, three other reals, rng) -> image


def resized(image: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng))


def integer(rng: torch.Generator, low: int, high: int) -> int:
    """A whole number in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=rng))


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels, zeros coming in."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    target = (..., slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    out[target] = x[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def random_shift(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    while True:
        dy, dx = integer(rng, -3, 3), integer(rng, -3, 3)
        if (dy, dx) != (0, 0):
            return shift(x, dy, dx)


def random_pose(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    pose = integer(rng, 1, 7)
    return torch.rot90(x.flip(-1) if pose >= 4 else x, pose % 4, dims=(-2, -1))


def affine(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    a = uniform(rng, 0.2, 3.0) * (1 if float(torch.rand((), generator=rng)) < 0.5 else -1)
    return a * x + uniform(rng, -1.0, 1.0)


def mixed(share: float) -> Attack:
    return lambda x, _, rng: share * x + (1 - share) * torch.rand(x.shape, generator=rng)


def zoom(low: float, high: float) -> Attack:
    def attack(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        side = x.shape[-1]
        crop = max(3, round(uniform(rng, low, high) * side))
        top, left = integer(rng, 0, side - crop), integer(rng, 0, side - crop)
        return resized(x[..., top : top + crop, left : left + crop], side)

    return attack


def placed(low: float, high: float) -> Attack:
    """x scaled by a factor in [low, high] and placed anywhere on a background of uniform noise."""

    def attack(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        side = x.shape[-1]
        size = round(uniform(rng, low, high) * side)
        out = torch.rand(x.shape, generator=rng)
        top, left = integer(rng, 0, side - size), integer(rng, 0, side - size)
        out[..., top : top + size, left : left + size] = resized(x, size)
        return out

    return attack


def tiles(x: torch.Tensor, others: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    """x and three other real images at half size in a 2x2 grid (x at a corner chosen by the caller's order)."""
    side = x.shape[-1]
    half = side // 2
    out = torch.zeros_like(x)
    for (top, left), image in zip([(0, 0), (0, half), (half, 0), (half, half)], [others[0:1], others[1:2], x, others[2:3]]):
        out[..., top : top + half, left : left + half] = resized(image, half)
    return out


def rotated(degrees: float) -> Attack:
    def attack(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        angle = math.radians(degrees) * (1 if float(torch.rand((), generator=rng)) < 0.5 else -1)
        theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
        grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return attack


def blurred(sigma: float) -> Attack:
    def attack(x: torch.Tensor, _: torch.Tensor, __: torch.Generator) -> torch.Tensor:
        radius = math.ceil(3 * sigma)
        taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
        taps = taps / taps.sum()
        padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        return F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))

    return attack


def one_channel(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    out = torch.rand(1, 3, *x.shape[-2:], generator=rng)
    out[:, integer(rng, 0, 2)] = x[:, 0]
    return out


def window_in_larger(x: torch.Tensor, _: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    out = torch.rand(1, 1, 2 * side, 2 * side, generator=rng)
    top, left = integer(rng, 0, side), integer(rng, 0, side)
    out[..., top : top + side, left : left + side] = x
    return out


# name -> (group, attack, kind of set it makes: "grey" at the source size, "rgb", or "double" the source side)
ATTACKS: dict[str, tuple[str, Attack, str]] = {
    "copy": ("family", lambda x, _, __: x, "grey"),
    "flip or rotation (random of 7)": ("family", random_pose, "grey"),
    "shift <= 3 px (random, zeros in)": ("family", random_shift, "grey"),
    "affine a*x + b, |a| in [0.2, 3]": ("family", affine, "grey"),
    "zoom: crop 0.7-1, anywhere, resized": ("family", zoom(0.7, 1.0), "grey"),
    "scaled 0.5-1, anywhere on noise": ("family", placed(0.5, 1.0), "grey"),
    "real-size window of a 2x larger image": ("family", window_in_larger, "double"),
    "flipped left-right": ("tester", lambda x, _, __: x.flip(-1), "grey"),
    "shifted by 2 px": ("tester", lambda x, _, __: shift(x, 2, -2), "grey"),
    "scaled x0.5": ("tester", placed(0.5, 0.5), "grey"),
    "inverted (1 - x)": ("tester", lambda x, _, __: 1 - x, "grey"),
    "mixed 0.9 / 0.1 with noise": ("tester", mixed(0.9), "grey"),
    "cropped 0.8 and resized": ("tester", zoom(0.8, 0.8), "grey"),
    "4 tiled at x0.5": ("tester", tiles, "grey"),
    "one channel of an RGB image": ("tester", one_channel, "rgb"),
    "mixed 0.8 / 0.2 with noise": ("outside", mixed(0.8), "grey"),
    "mixed 0.7 / 0.3 with noise": ("outside", mixed(0.7), "grey"),
    "rotated by 10 degrees": ("outside", rotated(10), "grey"),
    "blurred (Gaussian sigma 1.5 px)": ("outside", blurred(1.5), "grey"),
}


def pick_sources(dataset: Dataset, where: list[tuple[str, int]], count: dict[str, int], seed: int) -> list[int]:
    """Indices (into all splits) of real images: `count[split]` from each split."""
    generator = torch.Generator().manual_seed(seed)
    offsets, start = {}, 0
    for name in SPLITS:
        offsets[name] = start
        start += len(dataset.split(name))
    chosen = []
    for name, n in count.items():
        order = torch.randperm(len(dataset.split(name)), generator=generator)[:n]
        chosen += [offsets[name] + int(i) for i in order]
    return chosen


def detection(datasets: dict[str, Dataset], count: dict[str, int], family: ScreenFamily) -> dict[str, Any]:
    """(a): every attack on `count` real images per split, screened against every real image of every split."""
    out: dict[str, Any] = {}
    for key, dataset in datasets.items():
        real, where = real_pixels(dataset)
        native = dataset.source.size or dataset.image_size
        variants = {"grey": real, "rgb": real.expand(-1, 3, -1, -1), "double": resized(real, 2 * real.shape[-1])}
        rows = {}
        for number, (name, (group, attack, kind)) in enumerate(ATTACKS.items()):
            generator = torch.Generator().manual_seed(1000 * number + 7)
            per_split = {k: min(n, FEWER[kind][k]) for k, n in count.items()} if kind in FEWER else count
            sources = pick_sources(dataset, where, per_split, seed=number)
            images, candidates = [], []
            for source in sources:
                others = [i for i in torch.randperm(len(real), generator=generator)[:4].tolist() if i != source][:3]
                images.append(attack(real[source : source + 1], real[others], generator))
                candidates.append([source, *others] if attack is tiles else [source])
            start = time.process_time()
            search = Search(torch.cat(images), variants[kind], native_side=native, family=family)
            found = search.run()
            seconds = time.process_time() - start
            raw, smoothed = scores_of(found)
            kept = torch.zeros(len(sources), dtype=torch.bool)
            source_rows = torch.tensor(candidates)[:, :1]
            if any(search.band_candidates(band) < search.real_count for band in search.bands):
                for band_rows in search.prefilter():
                    kept |= (band_rows // search.real_views == source_rows).any(1)
            else:
                kept[:] = True
            oracle_raw, oracle_smoothed = scores_of(search.run(candidates=torch.tensor(candidates)))
            caught = (raw >= NCC_THRESHOLD) | (smoothed >= NCC_SMOOTHED_THRESHOLD)
            oracle_caught = (oracle_raw >= NCC_THRESHOLD) | (oracle_smoothed >= NCC_SMOOTHED_THRESHOLD)
            named = [f.hits(NCC_THRESHOLD, NCC_SMOOTHED_THRESHOLD) or f.raw for f in found]
            right = torch.tensor([m.real in c for m, c in zip(named, candidates)])
            rows[name] = {
                "group": group,
                "images": len(sources),
                "by_split": dict(per_split),
                "caught": int(caught.sum()),
                "caught_by_split": {
                    split: int(caught[[i for i, s in enumerate(sources) if where[s][0] == split]].sum()) for split in per_split
                },
                "caught_by_raw": int((raw >= NCC_THRESHOLD).sum()),
                "found_the_source": int((right & caught).sum()),
                "ncc_min": float(raw.min()),
                "ncc_median": float(raw.median()),
                "ncc_smoothed_min": float(smoothed.min()),
                "source_kept_by_prefilter": int(kept.sum()),
                "lost_by_prefilter": int((oracle_caught & ~caught).sum()),
                "oracle_raw": [round(float(v), 4) for v in oracle_raw],
                "oracle_smoothed": [round(float(v), 4) for v in oracle_smoothed],
                "raw": [round(float(v), 4) for v in raw],
                "smoothed": [round(float(v), 4) for v in smoothed],
                "seconds": round(seconds, 2),
            }
            print(
                f"  {key} {name}: {rows[name]['caught']}/{len(sources)} caught, lowest {raw.min():.3f} / {smoothed.min():.3f}, "
                f"prefilter kept {int(kept.sum())}, {seconds:.1f} s",
                flush=True,
            )
        out[key] = rows
    return out


def scores_of(found: list[Found]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and blurred best |NCC| of each image (0 where the blurred search did not run)."""
    raw = torch.tensor([f.raw.score for f in found])
    return raw, torch.tensor([f.smoothed.score if f.smoothed else 0.0 for f in found])


def honest_settings(method: str, init: str, buffer_root: str) -> dict[str, Any]:
    """Each method's settings at the budget this benchmark can afford on one CPU core (recorded in the file)."""
    if method in ("dc", "dsa"):
        return {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 64, "init": init}
    if method == "dm":
        return {"iterations": 20, "batch_real": 64, "init": init}
    return {  # mtt: a one-expert buffer of a width-16 ConvNet, as tests/test_mtt.py; always from real images
        "iterations": 5,
        "syn_steps": 4,
        "expert_epochs": 1,
        "max_start_epoch": 2,
        "num_experts": 1,
        "buffer_epochs": 3,
        "lr_img": 10.0,
        "lr_lr": 1e-6,
        "model_kwargs": {"width": 16},
        "buffer_root": buffer_root,
        "eval_every": 0,
    }


def honest_sets(datasets: dict[str, Dataset], ipcs: list[int]) -> dict[str, Any]:
    """(b) and (c): honestly distilled sets screened as export does, with the screen's CPU time."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="near-copy-experts-") as buffer_root:
        for key, dataset in datasets.items():
            rows = []
            runs = [(m, i, ipc, "short") for m in ("dc", "dsa", "dm") for i in ("noise", "real") for ipc in ipcs]
            runs += [("mtt", "real", ipc, "short") for ipc in ipcs] + [("dm", "noise", 10, "longer")]
            for method, init, ipc, budget in runs:
                settings = honest_settings(method, init, buffer_root)
                if budget == "longer":
                    settings["iterations"] = LONGER_DM_ITERATIONS
                start = time.process_time()
                synthetic = distill(method, dataset, ipc, settings)
                made = time.process_time() - start
                start = time.process_time()
                screen = screen_set(synthetic, dataset)
                seconds = time.process_time() - start
                row = {
                    "method": method,
                    "init": init,
                    "budget": budget,
                    "ipc": ipc,
                    "images": len(synthetic),
                    "settings": {k: v for k, v in settings.items() if k != "buffer_root"},
                    "refused": not screen["passed"],
                    "near_copies": screen["near_copies"],
                    "highest_ncc": screen["highest_ncc"],
                    "highest_ncc_smoothed": screen["highest_ncc_smoothed"],
                    "highest_ssim": screen["highest_ssim"],
                    "lowest_rms_distance": screen["lowest_rms_distance"],
                    "nearest": screen["nearest"]["transform"],
                    "refused_by": sorted({rule for m in screen["matches"] for rule in m["rules"]}),
                    "distill_seconds": round(made, 1),
                    "screen_seconds": round(seconds, 2),
                }
                rows.append(row)
                print(
                    f"  {key} {method} {init} ipc {ipc}: {'refused' if row['refused'] else 'passed'} "
                    f"({row['near_copies']}/{row['images']}), highest |NCC| {row['highest_ncc']:.3f} / "
                    f"{row['highest_ncc_smoothed']:.3f}, "
                    f"screen {seconds:.1f} s, distil {made:.0f} s",
                    flush=True,
                )
            out[key] = rows
    return out


def natural(datasets: dict[str, Dataset], count: int, family: ScreenFamily) -> dict[str, Any]:
    """Real test images screened against the train and val images: how close other patients' images come by nature."""
    out = {}
    for key, dataset in datasets.items():
        others = torch.cat([dataset.denormalize(dataset.train.images), dataset.denormalize(dataset.val.images)])
        test = dataset.denormalize(dataset.test.images[:count])
        start = time.process_time()
        raw, smoothed = scores_of(Search(test, others, native_side=dataset.source.size, family=family).run())
        refused = (raw >= NCC_THRESHOLD) | (smoothed >= NCC_SMOOTHED_THRESHOLD)
        out[key] = {
            "images": len(test),
            "refused": int(refused.sum()),
            "ncc_median": float(raw.median()),
            "ncc_smoothed_median": float(smoothed.median()),
            "ncc_p95": float(raw.quantile(0.95)),
            "ncc_smoothed_p95": float(smoothed.quantile(0.95)),
            "raw": [round(float(v), 4) for v in raw],
            "smoothed": [round(float(v), 4) for v in smoothed],
            "seconds": round(time.process_time() - start, 1),
        }
        print(f"  {key} natural: {out[key]['refused']} of {len(test)} would be refused", flush=True)
    return out


def choose_threshold(attacks: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Each threshold between what must pass and what must be caught, from the measured scores.

    Must pass: every image of every set distilled from noise (short and longer budgets). Must be caught: for the raw
    |NCC|, every image of every family and tester attack except noise mixing; for the blurred |NCC|, every image mixed
    0.9 / 0.1 with noise; each scored by the exact search on its true source (what the measure can see; what the
    prefilter loses is counted apart). The threshold is the midpoint, rounded to 0.001; where the two overlap, the
    lowest attack score (every attack caught, the honest images above it refused). Real held-out images are
    reported beside it.
    """
    choice = {}
    for measure, noise_only in (("raw", False), ("smoothed", True)):
        caught = [
            min(r[f"oracle_{measure}"])
            for rows in attacks.values()
            for name, r in rows.items()
            if r["group"] != "outside" and (name.startswith("mixed 0.9") == noise_only)
        ]
        key = "highest_ncc_smoothed" if noise_only else "highest_ncc"
        low, high = max(r[key] for rows in sets.values() for r in rows if r["init"] == "noise"), min(caught)
        suggested = round((low + high) / 2, 3) if low < high else round(high, 3)
        choice[measure] = {"must_pass_up_to": low, "must_catch_from": high, "suggested": suggested}
    choice["in_use"] = {"raw": NCC_THRESHOLD, "smoothed": NCC_SMOOTHED_THRESHOLD}
    return choice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 images per attack, IPC 1 and 10: a smoke run")
    parser.add_argument("--only", choices=sorted(DATASETS), help="one dataset only")
    parser.add_argument("--parts", default="attacks,sets,natural", help="comma-separated: attacks, sets, natural")
    add_out_argument(parser, "near_copy_screen")
    args = parser.parse_args()
    family = ScreenFamily()
    started = time.process_time()
    chosen = {k: v for k, v in DATASETS.items() if args.only in (None, k)}
    root = MEDMNIST
    datasets = {k: load_dataset(v, root=root, progress=False) for k, v in chosen.items()}
    count = {s: max(1, n // 5) for s, n in PER_SPLIT.items()} if args.quick else dict(PER_SPLIT)
    ipcs = [1, 10] if args.quick else [1, 10, 50]
    parts = set(args.parts.split(","))
    payload: dict[str, Any] = {
        "threshold": {"raw": NCC_THRESHOLD, "smoothed": NCC_SMOOTHED_THRESHOLD},
        "family": family.describe(28),
        "datasets": {k: {"name": d.name, "splits": {s: len(d.split(s)) for s in SPLITS}} for k, d in datasets.items()},
        "torch_threads": torch.get_num_threads(),
    }
    if "attacks" in parts:
        print("(a) attacks", flush=True)
        payload["attacks"] = detection(datasets, count, family)
    if "sets" in parts:
        print("(b) honest sets", flush=True)
        payload["sets"] = honest_sets(datasets, ipcs)
    if "natural" in parts:
        print("natural similarity of real images", flush=True)
        payload["natural"] = natural(datasets, 100 if not args.quick else 20, family)
    if {"attacks", "sets"} <= parts:
        payload["threshold_choice"] = choose_threshold(payload["attacks"], payload["sets"])
        print(payload["threshold_choice"], flush=True)
    payload["cpu_seconds"] = round(time.process_time() - started, 1)
    path = write_result("near_copy_screen", payload, path=args.out)
    print(f"wrote {path} ({payload['cpu_seconds']} s of CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
