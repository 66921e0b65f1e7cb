"""Image-classifier pipeline: ingest -> validate -> split -> train -> evaluate -> quantize -> export."""

__version__ = "0.1.0"
