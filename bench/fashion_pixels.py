"""Fashion-MNIST at iteration 0: the same random real images (1 per class) scored through the
old pixel pipeline and the faithful one, with the same evaluation networks.

old:      what an image folder of Fashion-MNIST gave before: gray copied to 3 channels,
          computed per-channel statistics, first convolution padded by 1 (28 -> 14 -> 7 -> 3,
          1,152 classifier features, the last row and column dropped by the third pooling);
faithful: one channel, the customary constants (0.2861, 0.3530), first convolution padded by
          3 (the network runs at 32x32 with 2,048 features), as DC/DSA/MTT do.

    python bench/fashion_pixels.py [--draws 5] [--epochs 300]
Last line: fashion_pixels_gain_points=<mean faithful minus old, percentage points>.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import torch  # noqa: E402

from bench.common import print_table, save_table  # noqa: E402
from mct_ray.config import load_config  # noqa: E402
from mct_ray.data import load_data  # noqa: E402
from mct_ray.evaluate import evaluate  # noqa: E402
from mct_ray.nets import Network, make_spec  # noqa: E402
from mct_ray.rng import generator  # noqa: E402
from mct_ray.synthetic import SyntheticSet, init_synthetic  # noqa: E402


def old_pipeline(data):
    """Gray copied to RGB and standardised with computed statistics (the old imagefolder)."""
    def rgb(x):  # undo the constants, copy to 3 channels
        return (x * 0.3530 + 0.2861).repeat(1, 3, 1, 1)

    train, test = rgb(data.train_x), rgb(data.test_x)
    mean, std = train.mean((0, 2, 3)), train.std((0, 2, 3))
    norm = lambda x: (x - mean[:, None, None]) / std[:, None, None]  # noqa: E731
    return dataclasses.replace(data, train_x=norm(train), test_x=norm(test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("fashion-mnist-ipc1", [f"eval.epochs={args.epochs}", "eval.num_eval=1"])
    faithful = load_data(cfg.data)
    pipelines = {"old": old_pipeline(faithful), "faithful": faithful}
    rows = []
    for draw in range(args.draws):
        draw_cfg = cfg.replace(seed=draw)  # the evaluation networks' seed
        for name, data in pipelines.items():
            spec = make_spec(cfg.net, data.shape, data.num_classes)
            images, labels = init_synthetic(data.train_x, data.train_y, data.num_classes, 1,
                                            generator(draw, "synthetic-init"))
            syn = SyntheticSet(images, labels, cfg.distill.lr_teacher, {"iteration": 0})
            acc = evaluate(draw_cfg, Network(spec), data, syn).mean
            rows.append({"draw": draw, "pipeline": name, "channels": data.shape[0],
                         "features": dict(spec.param_shapes())["classifier.weight"][1],
                         "acc": 100 * acc})
            print(f"draw {draw} {name}: {100 * acc:.2f} %", flush=True)
    save_table("fashion_pixels", rows)
    print_table(rows)
    gains = [b["acc"] - a["acc"] for a, b in zip(rows[::2], rows[1::2])]
    for name in pipelines:
        accs = [r["acc"] for r in rows if r["pipeline"] == name]
        print(f"{name}: {statistics.fmean(accs):.2f} +- {statistics.pstdev(accs):.2f} %")
    print(f"fashion_pixels_gain_points={statistics.fmean(gains):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
