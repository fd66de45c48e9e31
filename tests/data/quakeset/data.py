#!/usr/bin/env python3
"""Write ``earthquakes.h5``: a tiny QuakeSet-format fixture with the layout's corner cases.

Independent of quakeray's own generator on purpose (torchgeo's habit), so tests can compare
the dataset against torchgeo on a file neither of them wrote. Run from this folder:
``python data.py``. Seeded: the same numbers every time.

Corner cases it holds: 2 events per split; one event with 12 patches (``sorted()`` puts
``patch_10`` before ``patch_2``); ``before`` in some patches only; ``x``/``y`` entries beside
the patches; a NaN border; an entirely NaN patch; an event with no ``before`` at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

SIZE = 16
FILENAME = Path(__file__).with_name("earthquakes.h5")

# event id -> (split, magnitude, number of patches)
EVENTS = {
    "611645479": ("train", 4.3, 12),
    "611658170": ("train", 6.1, 2),
    "611684805": ("validation", 5.0, 1),
    "611744956": ("validation", 4.6, 2),
    "611798698": ("test", 7.2, 1),
    "611818836": ("test", 4.1, 2),
}


def main() -> None:
    rng = np.random.default_rng(0)
    FILENAME.unlink(missing_ok=True)
    with h5py.File(FILENAME, "w") as f:
        for key, (split, magnitude, patches) in EVENTS.items():
            event = f.create_group(key)
            event.attrs.create("magnitude", np.float32(magnitude))
            event.attrs.create("split", split)
            event.create_dataset("x", data=np.linspace(10.0, 10.1, SIZE))
            event.create_dataset("y", data=np.linspace(45.0, 45.1, SIZE))
            for i in range(patches):
                patch = event.create_group(f"patch_{i}")
                names = ["pre", "post"]
                if key != "611798698" and i % 2 == 0:
                    names.append("before")
                for name in names:
                    data = rng.gamma(4.0, 0.05, size=(SIZE, SIZE, 2)).astype(np.float32)
                    if key == "611645479" and i == 3:
                        data[:, :4] = np.nan  # swath edge
                    if key == "611658170" and i == 1:
                        data[...] = np.nan  # entirely NaN patch
                    patch.create_dataset(name, data=data)
    md5 = hashlib.md5(FILENAME.read_bytes()).hexdigest()
    print(f"{FILENAME.name}: {FILENAME.stat().st_size} bytes, md5 {md5}")


if __name__ == "__main__":
    main()
