"""What un-whitening costs a ZCA set: MTT with ZCA on BreastMNIST at IPC 1 and 10 (reduced budget), each set
scored in ZCA space (the reference's way, the default) and as stored, un-whitened; prints JSON and writes
it to results/zca_cost.json (or --out).

    python benchmarks/zca_cost.py --buffer-root runs/zca/experts [--data-root $MEDISTILL_DATA] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: python benchmarks/zca_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.data import load_dataset
from medistill.methods import RunContext, distill
from medistill.pipeline import score_set
from medistill.train import TrainProtocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffer-root", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-models", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=300)
    add_out_argument(parser, "zca_cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("breastmnist", root=args.data_root, progress=False)
    settings = dict(iterations=args.iterations, syn_steps=10, expert_epochs=2, max_start_epoch=1, num_experts=2, buffer_epochs=3,
                    zca=True, eval_every=0, buffer_root=args.buffer_root, checkpoint_every=10)
    protocol = TrainProtocol(epochs=args.eval_epochs, augment="color_crop_cutout_flip_scale_rotate")
    out = {"settings": settings, "eval_models": args.eval_models, "eval_epochs": args.eval_epochs}
    for ipc in (1, 10):
        began = time.time()
        synthetic = distill("mtt", data, ipc, dict(settings), context=RunContext(seed=0, log=lambda m: print(m, file=sys.stderr)))
        scores = {space: score_set(synthetic, data, protocol, num_models=args.eval_models, seed=0, progress=False,
                                   zca_space=space == "zca_space").summary() for space in ("zca_space", "unwhitened")}
        out[f"ipc{ipc}"] = {**scores, "learned_lr": synthetic.learned_lr,
                            "loss_first_last": [synthetic.extra["loss"][0], synthetic.extra["loss"][-1]], "seconds": time.time() - began}
    print(json.dumps(out, indent=1))
    write_result("zca_cost", out, path=args.out)


if __name__ == "__main__":
    main()
