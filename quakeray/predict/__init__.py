"""``quakeray predict``: magnitude estimates for new Sentinel-1 pairs, one event or a manifest.

- :mod:`~quakeray.predict.model`: a checkpoint, run id or ``models:/NAME@ALIAS`` to a model.
- :mod:`~quakeray.predict.rasters`: GeoTIFF bands, units and grids to ``(4, h, w)`` windows.
- :mod:`~quakeray.predict.tiles`: the tile lattice, batched prediction, the event estimate.
- :mod:`~quakeray.predict.outputs`: GeoJSON, GeoTIFF and JSON, written whole or not at all.
- :mod:`~quakeray.predict.pair`: one event end to end.
- :mod:`~quakeray.predict.manifest`: many events on Ray actors.
- :mod:`~quakeray.predict.command`: the command's arguments to the calls above.

Nothing is imported here: ``quakeray --help`` reads the command's arguments from
:mod:`~quakeray.predict.command` without loading torch or rasterio.
"""

__all__ = ["command", "manifest", "model", "outputs", "pair", "rasters", "tiles"]
