"""``quakeray predict``: arguments in, a prediction (or a manifest of them) out, an exit code."""

from __future__ import annotations

import argparse
from pathlib import Path

from quakeray import storage
from quakeray.errors import DataError

__all__ = ["add_predict_arguments", "run_predict"]


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``quakeray predict``."""
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint folder, run folder, MLflow run id, or models:/NAME@ALIAS",
    )
    parser.add_argument(
        "--pre",
        action="append",
        metavar="TIF",
        help="pre-event image: a VV+VH GeoTIFF, or give --pre twice (a VV and a VH file)",
    )
    parser.add_argument("--post", action="append", metavar="TIF", help="post-event image, same")
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="CSV",
        help="many events: columns pre,post[,event_id,lon,lat]",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: predictions/<name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--epicentre",
        metavar="LON,LAT",
        help="estimate the event from the tiles within --radius-km of this point",
    )
    parser.add_argument("--radius-km", type=float, default=20.0)
    parser.add_argument("--overlap", type=int, default=0, metavar="PX", help="tile overlap")
    parser.add_argument(
        "--units",
        choices=["auto", "linear", "db"],
        default="auto",
        help="input backscatter units (auto: dB when most pixels are negative, said so)",
    )
    parser.add_argument(
        "--band-order", metavar="VV,VH", help="polarisations of the bands (or files) in order"
    )
    parser.add_argument(
        "--resampling", default="bilinear", help="for a post image on another grid (rasterio name)"
    )
    parser.add_argument(
        "--min-valid",
        type=float,
        default=0.5,
        help="share of a tile's pixels that must hold data for it to be predicted (0: all)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="manifest: Ray actors (0: auto)")
    parser.add_argument("--tracking-uri", help="MLflow store of a run id or model URI")


def run_predict(args: argparse.Namespace) -> int:
    """Run ``quakeray predict``; 0 when every event was predicted, 1 when some failed.

    Raises:
        QuakerayError: Bad arguments, inputs or model reference (exit code 2).
    """
    from quakeray.predict.model import load_predictor
    from quakeray.predict.pair import predict_pair

    options = _options(args)
    single = bool(args.pre or args.post)
    if single == bool(args.manifest):
        raise DataError("give either --pre and --post (one event) or --manifest CSV (many)")
    if single and not (args.pre and args.post):
        raise DataError("give both --pre and --post (each a VV+VH file, or twice: VV and VH)")
    out = args.out or Path("predictions") / _default_name(args)
    if args.manifest is not None:
        from quakeray.predict.manifest import predict_manifest, read_manifest

        rows = read_manifest(args.manifest)  # a bad manifest is refused before the model loads
        predictor = load_predictor(args.model, tracking_uri=args.tracking_uri)
        result = predict_manifest(
            predictor,
            rows,
            out,
            options,
            workers=args.workers,
            overwrite=args.overwrite,
        )
        print(result.format())
        return 1 if result.failed else 0
    predictor = load_predictor(args.model, tracking_uri=args.tracking_uri)
    print(f"model: {predictor.source} ({predictor.tile_size} px tiles)")
    pair = predict_pair(predictor, args.pre, args.post, out, options, overwrite=args.overwrite)
    print(pair.format())
    return 0


def _options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from quakeray.predict.pair import PredictOptions

    epicentre = None
    if args.epicentre:
        try:
            lon, lat = (float(v) for v in args.epicentre.split(","))
        except ValueError:
            raise DataError(
                f"--epicentre {args.epicentre!r} is not LON,LAT (e.g. 13.38,42.35)"
            ) from None
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise DataError(f"--epicentre {args.epicentre} is out of range; give LON,LAT")
        epicentre = (lon, lat)
    if not 0 <= args.min_valid <= 1:
        raise DataError(f"--min-valid must be between 0 and 1, got {args.min_valid}")
    if args.batch_size < 1 or args.radius_km <= 0:
        raise DataError("--batch-size and --radius-km must be positive")
    from rasterio.enums import Resampling

    if args.resampling not in Resampling.__members__:
        raise DataError(
            f"--resampling {args.resampling!r} is unknown; use e.g. bilinear, nearest, cubic"
        )
    order = (
        tuple(v.strip().upper() for v in args.band_order.split(",")) if args.band_order else None
    )
    return PredictOptions(
        overlap=args.overlap,
        units=args.units,
        band_order=order,
        resampling=args.resampling,
        batch_size=args.batch_size,
        min_valid=args.min_valid,
        epicentre=epicentre,
        radius_km=args.radius_km,
    )


def _default_name(args: argparse.Namespace) -> str:
    source = str(args.manifest) if args.manifest is not None else args.pre[0]
    return storage.name(source).split(".")[0] or "prediction"
