"""The Ray Data pipeline: sources -> decode (CPU tasks) -> encode + generate (model actors) -> Parquet.

Only :mod:`pipeline.graph` imports ``ray.data``; every stage is a plain callable (see
:mod:`pipeline.decode` and :mod:`pipeline.stages`). Entry points live in ``jobs/``.
"""
