"""ferry: move model versions from the MLflow Model Registry into Triton as one safe state transition."""

__version__ = "0.1.0"
