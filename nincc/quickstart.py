"""`nincc quickstart`: the whole user journey on data the install brings.

scikit-learn ships 1,797 8x8 handwritten digits inside its package. The quickstart writes them
into Caffe LMDBs (1,497 train / 300 test, a seeded split), trains the zoo's Network-in-Network
for them (`zoo/nin_digits.prototxt` with its solver) exactly as `nincc train` does, and scores
the final snapshot with `nincc test`, as a user would with `caffe train` and `caffe test`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .errors import DataError

NET = "zoo/nin_digits.prototxt"
SNAPSHOT = "snapshots/nin_digits_iter_{}.caffemodel"
TEST_ITERATIONS = 3  # 3 x 100 = the 300 test digits


def write_digits(data_dir: str) -> None:
    """The digits train/test LMDBs under ``data_dir`` (replaced if present)."""
    from .data.convert import write_array_db
    from .data.datasets import read_digits

    data = read_digits(8, 300, 0)
    for split in ("train", "test"):
        x, y = data[split]
        path = os.path.join(data_dir, f"digits_{split}_lmdb")
        write_array_db(path, x, y, "lmdb", 8, True)
        print(f"wrote {len(x)} digits to {path}")


def quickstart(
    run: Callable[[Sequence[str]], int], data_dir: str = "data", max_iter: int | None = None
) -> int:
    """Run the three steps through the CLI entry ``run``; returns the first failing exit code."""
    if not os.path.exists(NET):
        raise DataError(f"{NET} not found: run the quickstart from the nincc source folder")
    os.makedirs(data_dir, exist_ok=True)
    write_digits(data_dir)
    from .prototxt import load_solver

    iters = max_iter or load_solver(NET.replace(".prototxt", "_solver.prototxt")).max_iter
    train = ["train", NET, "--seed", "1701"]
    if max_iter:
        train += ["--max-iter", str(max_iter)]
    code = run(train)
    if code:
        return code
    return run(["test", NET, "--weights", SNAPSHOT.format(iters), "--iterations",
                str(TEST_ITERATIONS)])
