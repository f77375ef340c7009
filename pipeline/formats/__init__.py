"""The files stages hand to each other, one module per artifact: its schema, only writer, only reader.

- :mod:`~pipeline.formats.prepared`: the prepared transfer set (``kd-prepared/1``, HDF5)
- :mod:`~pipeline.formats.cache`: the soft-target cache (``kd-cache/1``, HDF5)
- :mod:`~pipeline.formats.checkpoint`: teacher-member and student weights (``kd-checkpoint/1``, HDF5)
- :mod:`~pipeline.formats.onnx_model`: ONNX models: versions, pre-run checks, ``metadata_props``
- :mod:`~pipeline.formats.bench_report`: the edge benchmark's JSON (``kd-bench/1``)
- :mod:`~pipeline.formats.h5seal`: the seal (``content_sha256``) and untrusted opening of HDF5 files

Readers verify the seal and the schema before returning anything.  This package imports numpy,
h5py and onnx, never torch, onnxruntime or a stage (``tests/unit/test_layering.py``).  The schemas are
described for users in docs/formats.md.
"""
