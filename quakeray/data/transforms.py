"""Batched, vectorised transforms: NaN fill, dB, normalisation, flips, resize.

The dataset returns raw linear backscatter with NaN kept; :class:`BatchTransform` turns a
whole batch into network input in a few tensor operations, on whatever device the batch is
on (the GPU when there is one). Normalisation uses per-polarisation statistics computed once
on the train split (:func:`compute_stats`, ``quakeray data stats FILE``) and stored as JSON
beside the data; the same VV/VH statistics apply to both acquisitions so that the pre/post
change is preserved.

**Gaps.** A pixel that holds no valid measurement is a gap, filled with ``data.nan_fill``:
NaN (swath edges), and also +-inf and, when the input is linear backscatter (``to_db``),
negative values, which no sensor reports and a broken export does. The transform and
:func:`compute_stats` treat them alike, so one poisoned array neither reaches the network
as 3.4e38 nor moves the normalisation statistics; ``quakeray data inspect`` counts them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quakeray import storage
from quakeray.data.quakeset import BufferPool
from quakeray.errors import DataError

if TYPE_CHECKING:
    from quakeray.config import DataConfig
    from quakeray.data.quakeset import Layout

__all__ = [
    "STATS_VERSION",
    "BatchTransform",
    "ChannelStats",
    "build_transform",
    "compute_stats",
    "default_stats_path",
    "fill_gaps",
]

STATS_VERSION = 1


@dataclass
class ChannelStats:
    """Per-polarisation statistics (VV, VH) in the transformed domain.

    Attributes:
        mean: Mean of VV and VH after NaN fill (and dB when ``to_db``).
        std: Standard deviation of VV and VH in the same domain.
        to_db: Whether the statistics are of ``10*log10(x + eps)`` values.
        eps: The dB offset used.
        nan_fill: The value NaN pixels were replaced with before the dB transform.
        count: Pixels per channel that went into the statistics.
        split: File split they were computed on.
        source: Name of the data file.
    """

    mean: list[float]
    std: list[float]
    to_db: bool = True
    eps: float = 1e-9
    nan_fill: float = 0.0
    count: int = 0
    split: str = "train"
    source: str = ""
    version: int = STATS_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON and ``weights_only`` checkpoints."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON (atomically) and return the path.

        Raises:
            DataError: The file cannot be written (read-only or missing directory, ...).
        """
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with storage.replaced_atomically(out) as tmp:
                tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            # E.g. data on a read-only share: say where to write instead of a traceback.
            raise DataError(
                f"cannot write statistics to {out} ({exc.strerror or exc}); pass --out "
                "(or set data.stats_path) to a writable file"
            ) from None
        return out

    @classmethod
    def load(cls, path: str | Path) -> ChannelStats:
        """Read statistics written by :meth:`save`.

        Raises:
            DataError: Missing file, not JSON, missing keys, or unusable values.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"{p}: statistics file not found; compute it with 'quakeray data stats DATA.h5'"
            )
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{p}: not a statistics JSON ({exc}); recompute it") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"mean", "std"} <= raw.keys():
            raise DataError(f"{p}: statistics need 'mean' and 'std' lists; recompute them")
        try:
            stats = cls(**{k: v for k, v in raw.items() if k in known})
            mean = [float(v) for v in stats.mean]
            std = [float(v) for v in stats.std]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{p}: malformed statistics ({exc}); recompute them") from None
        if len(mean) != 2 or len(std) != 2:
            raise DataError(f"{p}: expected 2 values (VV, VH) for mean and std; recompute them")
        if not all(math.isfinite(v) for v in mean) or not all(
            math.isfinite(v) and v > 0 for v in std
        ):
            raise DataError(f"{p}: mean must be finite and std > 0, got {mean} / {std}")
        stats.mean, stats.std = mean, std
        return stats

    def format_mean(self) -> str:
        """``[VV, VH]`` means, 4 decimals."""
        return "[" + ", ".join(f"{v:.4f}" for v in self.mean) + "]"

    def format_std(self) -> str:
        """``[VV, VH]`` standard deviations, 4 decimals."""
        return "[" + ", ".join(f"{v:.4f}" for v in self.std) + "]"


def default_stats_path(data_path: str | Path) -> Path:
    """Where the statistics of ``data_path`` live by default: ``<data_path>.stats.json``."""
    p = Path(data_path)
    return p.with_name(p.name + ".stats.json")


def fill_gaps(image: np.ndarray, fill: float, *, linear: bool) -> np.ndarray:
    """A copy of ``image`` with its gaps (NaN, +-inf, negatives if ``linear``) set to ``fill``."""
    out: np.ndarray = np.nan_to_num(image, nan=fill, posinf=fill, neginf=fill)
    if linear:
        out[out < 0] = fill
    return out


def compute_stats(
    path: str | Path,
    *,
    split: str = "train",
    to_db: bool = True,
    eps: float = 1e-9,
    nan_fill: float = 0.0,
    progress: bool = True,
) -> ChannelStats:
    """Per-polarisation mean/std of what the network sees, over one split.

    Every sample's two acquisitions count (as in training), after the gaps are filled
    (:func:`fill_gaps`, as the transform does) and the dB transform. Accumulated in
    float64 with Chan's pairwise merge, in file order, so the same file always gives
    identical numbers.

    Args:
        path: QuakeSet-format file.
        split: ``train``, ``val`` or ``test``.
        to_db: Statistics of ``10*log10(x + eps)`` rather than linear values.
        eps: dB offset.
        nan_fill: Value for NaN pixels.
        progress: Show a progress bar on stderr.

    Raises:
        DataError: Bad file or split, or a split without samples.
    """
    from tqdm import tqdm

    from quakeray.data.quakeset import QuakeSetDataset

    ds = QuakeSetDataset(path, split, layout="stacked")  # type: ignore[arg-type]
    if len(ds) == 0:
        raise DataError(f"{path}: the {split} split has no samples; cannot compute statistics")
    h, w = ds.image_size
    image = np.empty((4, h, w), dtype=np.float32)
    n = 0
    mean = np.zeros(2)
    m2 = np.zeros(2)
    for i in tqdm(range(len(ds)), desc="stats", unit="sample", disable=not progress):
        ds._read_into(i, image)
        filled = fill_gaps(image, nan_fill, linear=to_db).reshape(2, 2, h * w)
        if to_db:
            filled = 10.0 * np.log10(np.maximum(filled, 0.0) + eps)
        # (time, pol, pixels) -> (pol, time * pixels): both acquisitions count per channel.
        x = filled.transpose(1, 0, 2).reshape(2, -1).astype(np.float64)
        k = x.shape[1]
        batch_mean = x.mean(axis=1)
        batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(axis=1)
        delta = batch_mean - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + batch_m2 + delta**2 * (n * k / total)
        n = total
    ds.close()
    std = np.sqrt(m2 / max(n - 1, 1))
    return ChannelStats(
        mean=[float(v) for v in mean],
        std=[float(max(v, 1e-12)) for v in std],
        to_db=to_db,
        eps=eps,
        nan_fill=nan_fill,
        count=int(n),
        split=split,
        source=Path(path).name,
    )


class BatchTransform(nn.Module):
    """NaN fill -> dB -> normalise -> random flips (training only) -> resize.

    Works on a whole batch ``(B, 4, H, W)`` (or ``(B, 2, 2, H, W)``, or the dataset's
    ``raw`` ``(B, 2, H, W, 2)`` with ``layout="raw"``) on any device, in a few vectorised
    operations: the first writes one new tensor (gaps filled, raw batches transposed on the
    way; on the CPU its memory is recycled once the caller drops it), the rest run in place,
    and on the CPU each drawn sample is flipped on its own. Flips are drawn per sample and
    only applied in training mode (``module.train()``); call ``.eval()`` for validation and
    inference. The output is always finite: gaps (NaN, +-inf, negative linear values) are
    filled and the fill is clamped at 0 before the logarithm, so even an entirely NaN patch
    gives a constant, finite image.

    Args:
        nan_fill: Value for NaN pixels.
        to_db: Apply ``10*log10(x + eps)``.
        eps: dB offset.
        mean: Per-polarisation (VV, VH) means to subtract, or None to skip normalisation.
        std: Per-polarisation standard deviations to divide by.
        flips: Random horizontal and vertical flips in training mode.
        image_size: Resize to ``image_size x image_size`` (bilinear, antialiased); 0 keeps
            the native size.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        *,
        nan_fill: float = 0.0,
        to_db: bool = True,
        eps: float = 1e-9,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = False,
        image_size: int = 0,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise DataError("normalisation needs both mean and std (or neither)")
        self.nan_fill = float(nan_fill)
        self.to_db = to_db
        self.eps = float(eps)
        self.normalize = mean is not None
        self.flips = flips
        self.image_size = int(image_size)
        # Per polarisation, repeated for both acquisitions: [VV, VH, VV, VH].
        m = torch.tensor((mean or [0.0, 0.0]) * 2, dtype=torch.float32).view(1, 4, 1, 1)
        s = torch.tensor((std or [1.0, 1.0]) * 2, dtype=torch.float32).view(1, 4, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """Transform a batch; returns float32 of the same layout (resized if asked).

        Args:
            x: The batch.
            layout: The dataset layout it is in; None tells ``stacked`` (4-D) and
                ``temporal`` (5-D) apart by shape. A ``raw`` batch comes back ``stacked``.
        """
        temporal = x.dim() == 5 and layout != "raw"
        src = self._time_pol(x, layout)
        b, h, w = src.shape[0], src.shape[-2], src.shape[-1]
        # One new tensor, then in place: the input is never modified, and a CPU batch of
        # 16 x 4 x 512 x 512 is not copied five times over. The same operations, in the same
        # order, as a pass per step would do: the output is bit-identical to that.
        out = self._new_output(src)
        fill = self.nan_fill
        src = src if src.dtype == torch.float32 else src.float()
        torch.nan_to_num(src, nan=fill, posinf=fill, neginf=fill, out=out)  # gaps, see above
        x = out.view(b, 4, h, w)
        if self.to_db:
            if fill <= 0:  # negatives -> fill, then clamp at 0: both are the clamp alone
                x.clamp_(min=0.0)
            else:  # (nothing is below 0 after this: no clamp needed)
                x.masked_fill_(x < 0, fill)
            x.add_(self.eps).log10_().mul_(10.0)
        if self.normalize:
            x.sub_(self.mean).div_(self.std)
        if self.training and self.flips:
            x = self._flip(x)
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            down = x.shape[-1] > self.image_size or x.shape[-2] > self.image_size
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=down,
            )
        if temporal:
            x = x.reshape(x.shape[0], 2, 2, *x.shape[-2:])
        return x

    @staticmethod
    def _time_pol(x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
        """``x`` seen as ``(B, time, polarisation, H, W)``: a view, strided for ``raw``."""
        shape = tuple(x.shape)
        if layout == "raw":
            if x.dim() != 5 or shape[1] != 2 or shape[4] != 2:
                raise DataError(f"a raw batch is (B, 2, H, W, 2), got {shape}")
            return x.permute(0, 1, 4, 2, 3)
        if x.dim() == 4 and shape[1] == 4 and layout in (None, "stacked"):
            return x.view(shape[0], 2, 2, *shape[2:])
        if x.dim() == 5 and shape[1:3] == (2, 2) and layout in (None, "temporal"):
            return x
        raise DataError(
            f"BatchTransform expects (B, 4, H, W), (B, 2, 2, H, W) or, with layout='raw', "
            f"(B, 2, H, W, 2); got {shape}" + (f" for layout {layout!r}" if layout else "")
        )

    def _new_output(self, src: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous float32 tensor shaped like ``src``, on its device.

        On the CPU its memory comes from a pool: a fresh 64 MB tensor per batch costs
        thousands of page faults, more than a pass of the transform.
        """
        if src.device.type != "cpu":
            return torch.empty(src.shape, dtype=torch.float32, device=src.device)
        pool: BufferPool | None = self.__dict__.get("_pool")
        if pool is None:
            pool = self.__dict__["_pool"] = BufferPool()
        return torch.from_numpy(pool.get(tuple(src.shape)))

    @staticmethod
    def _flip(x: torch.Tensor) -> torch.Tensor:
        """Per-sample random horizontal and vertical flips."""
        coins = torch.rand(x.shape[0], 2, device=x.device) < 0.5
        if x.device.type == "cpu":
            # One sample at a time: a 4 MB temporary that stays in cache, not the big
            # gathers and scatters of the batched form (several times slower on a CPU).
            for i, (flip_w, flip_h) in enumerate(coins.tolist()):
                dims = [d for d, drawn in ((-1, flip_w), (-2, flip_h)) if drawn]
                if dims:
                    x[i] = x[i].flip(dims)
            return x
        # Only the drawn samples are gathered, flipped and written back.
        h = coins[:, 0].nonzero().squeeze(1)
        x[h] = x[h].flip(-1)
        v = coins[:, 1].nonzero().squeeze(1)
        x[v] = x[v].flip(-2)
        return x

    def extra_repr(self) -> str:
        """Settings shown by ``print(module)``."""
        return (
            f"nan_fill={self.nan_fill}, to_db={self.to_db}, eps={self.eps}, "
            f"normalize={self.normalize}, flips={self.flips}, image_size={self.image_size}"
        )


def build_transform(cfg: DataConfig, stats: ChannelStats | None) -> BatchTransform:
    """The batch transform a :class:`~quakeray.config.DataConfig` asks for.

    Args:
        cfg: Data settings (``nan_fill``, ``to_db``, ``db_eps``, ``normalize``, ``flips``,
            ``image_size``).
        stats: Train-split statistics; required when ``cfg.normalize``.

    Raises:
        DataError: Normalisation asked without statistics, or statistics computed in a
            different domain (dB vs linear, another eps or NaN fill).
    """
    mean: list[float] | None = None
    std: list[float] | None = None
    if cfg.normalize:
        if stats is None:
            raise DataError(
                "data.normalize is on but no statistics were given; run "
                "'quakeray data stats FILE' or set data.normalize=false"
            )
        mismatch = _mismatch(cfg, stats)
        if mismatch:
            raise DataError(
                f"statistics of {stats.source or 'the data'} were computed with {mismatch}; "
                "recompute them with 'quakeray data stats FILE'"
            )
        mean, std = list(stats.mean), list(stats.std)
    return BatchTransform(
        nan_fill=cfg.nan_fill,
        to_db=cfg.to_db,
        eps=cfg.db_eps,
        mean=mean,
        std=std,
        flips=cfg.flips,
        image_size=cfg.image_size,
    )


def _mismatch(cfg: DataConfig, stats: ChannelStats) -> str:
    problems: list[str] = []
    if stats.to_db != cfg.to_db:
        problems.append(f"to_db={stats.to_db} (config: {cfg.to_db})")
    if cfg.to_db and not math.isclose(stats.eps, cfg.db_eps, rel_tol=1e-9):
        problems.append(f"eps={stats.eps} (config data.db_eps: {cfg.db_eps})")
    if not math.isclose(stats.nan_fill, cfg.nan_fill, rel_tol=1e-9, abs_tol=1e-12):
        problems.append(f"nan_fill={stats.nan_fill} (config: {cfg.nan_fill})")
    return ", ".join(problems)
