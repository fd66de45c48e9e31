"""quakeray: earthquake magnitude from Sentinel-1 SAR pairs, trained and searched on Ray."""

__version__ = "0.1.0"

__all__ = ["__version__"]
