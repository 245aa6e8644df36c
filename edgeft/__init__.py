"""edgeft: tune a language model cheaply, export it to quantized ONNX, run it on CPUs.

The three stages live in their own sub-packages:

- ``edgeft.tune``: frozen lower blocks in 8-bit, top blocks trained (torch).
- ``edgeft.export``: merge, export to ONNX, quantize, gate against PyTorch (torch).
- ``edgeft.runtime``: generation and classification on onnxruntime (never torch).

``edgeft.artifact`` holds the manifest, the one contract between the torch side and
the runtime. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
