"""``detexp data synth``: write the generated shapes dataset wherever the user asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def data_synth(cfg: Any) -> Path:
    """Write the generated shapes dataset to ``cfg.out``; print how to train on it."""
    from detexp.data.shapes import generate_shapes

    out = Path(cfg.out).expanduser().resolve()
    s = cfg.synth
    generate_shapes(out, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed)
    print(f"wrote {s.num_train} train + {s.num_val} val images to {out}")
    print(f"train on it with:  python -m detexp train dataset=voc dataset.root={out} "
          "'dataset.classes=[circle,square,triangle,cross]'")
    return out
